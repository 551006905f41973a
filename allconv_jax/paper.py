"""Reference numbers to compare runs with: the paper's test errors and the course project's range.

Springenberg, Dosovitskiy, Brox and Riedmiller, "Striving for Simplicity: The All Convolutional
Net", ICLR 2015 workshop track (arXiv:1412.6806): CIFAR-10 test error (%) of the 12 networks
without data augmentation, All-CNN-C with augmentation, and All-CNN-C on CIFAR-100 (Table 5,
compared there with results obtained without augmentation).

The course project that reproduced the paper in PyTorch (CIFAR-10, batch size 4, no augmentation)
reached 79-86 % test accuracy over its networks; per-network numbers are not available, so only
that range is given.
"""

from __future__ import annotations

# The 12 networks in the paper's order (base nets A, B, C; each with its three derived nets).
NETWORKS: tuple[str, ...] = (
    "model_a", "strided_cnn_a", "convpool_cnn_a", "all_cnn_a",
    "model_b", "strided_cnn_b", "convpool_cnn_b", "all_cnn_b",
    "model_c", "strided_cnn_c", "convpool_cnn_c", "all_cnn_c",
)

# (network, dataset, augmentation) -> the paper's test error in %.
PAPER_TEST_ERROR: dict[tuple[str, str, bool], float] = {
    ("model_a", "cifar10", False): 12.47,
    ("strided_cnn_a", "cifar10", False): 13.46,
    ("convpool_cnn_a", "cifar10", False): 10.21,
    ("all_cnn_a", "cifar10", False): 10.30,
    ("model_b", "cifar10", False): 10.20,
    ("strided_cnn_b", "cifar10", False): 10.98,
    ("convpool_cnn_b", "cifar10", False): 9.33,
    ("all_cnn_b", "cifar10", False): 9.10,
    ("model_c", "cifar10", False): 9.74,
    ("strided_cnn_c", "cifar10", False): 10.19,
    ("convpool_cnn_c", "cifar10", False): 9.31,
    ("all_cnn_c", "cifar10", False): 9.08,
    ("all_cnn_c", "cifar10", True): 7.25,
    ("all_cnn_c", "cifar100", False): 33.71,
}

# The course project's CIFAR-10 test accuracy range (%) over its networks, and its setting.
COURSE_ACCURACY_RANGE: tuple[int, int] = (79, 86)
COURSE_DATASET = "cifar10"
COURSE_AUGMENT = False
COURSE_BATCH_SIZE = 4


def paper_test_error(network: str, dataset: str, augment: bool) -> float | None:
  """The paper's test error (%) for this network, dataset and augmentation, if it reports one."""
  return PAPER_TEST_ERROR.get((network, dataset, bool(augment)))


def course_accuracy(dataset: str, augment: bool) -> str | None:
  """The course project's accuracy range as text ('79-86 (course range)') where it applies."""
  if dataset != COURSE_DATASET or bool(augment) != COURSE_AUGMENT:
    return None
  low, high = COURSE_ACCURACY_RANGE
  return f"{low}-{high} (course range)"


def network_rank(network: str) -> int:
  """Position of a network in the paper's order (unknown names sort last)."""
  return NETWORKS.index(network) if network in NETWORKS else len(NETWORKS)
