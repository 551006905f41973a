"""CIFAR metadata, the data sources, preprocessing and augmentation (see input_pipeline)."""
