"""allconv-jax: the All Convolutional Net family (Springenberg et al., 2015) in JAX/Flax."""

__version__ = "0.1.0"
