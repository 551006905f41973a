"""CIFAR-10/100 metadata: class names, CIFAR-100 superclasses, the course project's subsets,
the on-disk layouts of the official archives, and the label space a data config selects."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

CIFAR10_CLASSES: tuple[str, ...] = (
  "airplane", "automobile", "bird", "cat", "deer",
  "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_FINE: tuple[str, ...] = (
  "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
  "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
  "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
  "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
  "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
  "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
  "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
  "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
  "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
  "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
  "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
  "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
  "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
  "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# The 20 superclasses in their standard label order, each with its 5 fine classes.
SUPERCLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("aquatic_mammals", ("beaver", "dolphin", "otter", "seal", "whale")),
  ("fish", ("aquarium_fish", "flatfish", "ray", "shark", "trout")),
  ("flowers", ("orchid", "poppy", "rose", "sunflower", "tulip")),
  ("food_containers", ("bottle", "bowl", "can", "cup", "plate")),
  ("fruit_and_vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper")),
  ("household_electrical_devices", ("clock", "keyboard", "lamp", "telephone", "television")),
  ("household_furniture", ("bed", "chair", "couch", "table", "wardrobe")),
  ("insects", ("bee", "beetle", "butterfly", "caterpillar", "cockroach")),
  ("large_carnivores", ("bear", "leopard", "lion", "tiger", "wolf")),
  ("large_man-made_outdoor_things", ("bridge", "castle", "house", "road", "skyscraper")),
  ("large_natural_outdoor_scenes", ("cloud", "forest", "mountain", "plain", "sea")),
  ("large_omnivores_and_herbivores", ("camel", "cattle", "chimpanzee", "elephant", "kangaroo")),
  ("medium_mammals", ("fox", "porcupine", "possum", "raccoon", "skunk")),
  ("non-insect_invertebrates", ("crab", "lobster", "snail", "spider", "worm")),
  ("people", ("baby", "boy", "girl", "man", "woman")),
  ("reptiles", ("crocodile", "dinosaur", "lizard", "snake", "turtle")),
  ("small_mammals", ("hamster", "mouse", "rabbit", "shrew", "squirrel")),
  ("trees", ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")),
  ("vehicles_1", ("bicycle", "bus", "motorcycle", "pickup_truck", "train")),
  ("vehicles_2", ("lawn_mower", "rocket", "streetcar", "tank", "tractor")),
)
CIFAR100_COARSE: tuple[str, ...] = tuple(name for name, _ in SUPERCLASSES)
# Coarse label of each fine label (index = fine label).
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
  next(ci for ci, (_, members) in enumerate(SUPERCLASSES) if fine in members)
  for fine in CIFAR100_FINE
)

# Two 10-class CIFAR-100 subsets (500 train + 100 test images per class) for transfer from
# CIFAR-10: class1 is close to CIFAR-10's vehicles and animals, class2 far from them.
SUBSETS: dict[str, tuple[str, ...]] = {
  "class1": (
    "bus", "pickup_truck", "streetcar", "train", "motorcycle",
    "leopard", "tiger", "wolf", "fox", "cattle",
  ),
  "class2": (
    "maple_tree", "orchid", "sunflower", "apple", "sweet_pepper",
    "chair", "table", "clock", "lamp", "keyboard",
  ),
}  # fmt: skip

SOURCES = ("tfds", "local", "synthetic")
DATASETS = ("cifar10", "cifar100")
LABEL_TYPES = ("fine", "coarse")
PREPROCESSINGS = ("meanstd", "gcn_zca", "none")

# The course project's per-channel constants for 'meanstd' (on x / 255).
MEANSTD_MEAN = (0.4914, 0.4822, 0.4465)
MEANSTD_STD = (0.2023, 0.1994, 0.2010)

IMAGE_SHAPE = (32, 32, 3)
PIXELS = 32 * 32 * 3

# On-disk layouts: (folder name, format, required files, optional meta files).
LAYOUTS: dict[str, tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]] = {
  "cifar10": (
    ("cifar-10-batches-py", "python",
     tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",), ("batches.meta",)),
    ("cifar-10-batches-bin", "binary",
     tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",),
     ("batches.meta.txt",)),
  ),
  "cifar100": (
    ("cifar-100-python", "python", ("train", "test"), ("meta",)),
    ("cifar-100-binary", "binary", ("train.bin", "test.bin"),
     ("fine_label_names.txt", "coarse_label_names.txt")),
  ),
}  # fmt: skip
DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
ARCHIVES = {
  "cifar10": ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"),
  "cifar100": ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Raw:
  """A dataset as read from its source, in the label space of data.label_type."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]


def parse_classes(text: str) -> tuple[str, ...]:
  """'a, b,c' -> ('a', 'b', 'c'); '' -> ()."""
  if not text or not text.strip():
    return ()
  return tuple(name.strip() for name in text.split(","))


def base_names(dataset: str, label_type: str) -> tuple[str, ...]:
  """The class names of a dataset's label space before any selection."""
  if dataset == "cifar10":
    return CIFAR10_CLASSES
  return CIFAR100_FINE if label_type == "fine" else CIFAR100_COARSE


def class_names(data_config: Any) -> tuple[str, ...]:
  """The label space after data.label_type and data.subset/classes (of a checked config)."""
  if data_config.subset:
    return SUBSETS[data_config.subset]
  names = parse_classes(data_config.classes)
  return names or base_names(data_config.dataset, data_config.label_type)


def num_classes(data_config: Any) -> int:
  """Number of classes the model must output."""
  return len(class_names(data_config))
