"""Reference numbers to compare runs with: the paper's test errors and the course project's.

Springenberg, Dosovitskiy, Brox and Riedmiller, "Striving for Simplicity: The All Convolutional
Net", ICLR 2015 workshop track (arXiv:1412.6806): CIFAR-10 test error (%) of the 12 networks
without data augmentation, All-CNN-C with augmentation, and All-CNN-C on CIFAR-100 (Table 5,
compared there with results obtained without augmentation).

The course project that reproduced the paper in PyTorch (its report's Tables 3 and 4): CIFAR-10
test accuracy (%) of 8 networks (batch size 4, mean/std normalization, no augmentation, 350
epochs, one learning rate per segment of the paper's schedule), and its transfer study on two
10-class CIFAR-100 subsets. Pure data: configs import the rates from here.
"""

from __future__ import annotations

# The 12 networks in the paper's order (base nets A, B, C; each with its three derived nets).
NETWORKS: tuple[str, ...] = (
    "model_a", "strided_cnn_a", "convpool_cnn_a", "all_cnn_a",
    "model_b", "strided_cnn_b", "convpool_cnn_b", "all_cnn_b",
    "model_c", "strided_cnn_c", "convpool_cnn_c", "all_cnn_c",
)

# The paper's schedule (section 3.1): 350 epochs, the rate x0.1 after epochs 200, 250 and 300.
PAPER_EPOCHS = 350
PAPER_BOUNDARIES = (200, 250, 300)


def scaled_boundaries(epochs: int) -> tuple[float, ...]:
  """The paper's rate boundaries at the same fractions of a run of `epochs` epochs."""
  return tuple(b * epochs / PAPER_EPOCHS for b in PAPER_BOUNDARIES)


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

# The course project's Table 3: CIFAR-10 test accuracy (%) and the rate of each of the four
# segments of the schedule (epochs 0-200, 200-250, 250-300, 300-350), per network it trained.
COURSE_CIFAR10: dict[str, tuple[float, tuple[float, float, float, float]]] = {
    "model_a": (80.28, (0.025, 0.01, 0.005, 0.001)),
    "all_cnn_a": (80.05, (0.025, 0.01, 0.005, 0.001)),
    "model_b": (80.97, (0.1, 0.05, 0.01, 0.001)),
    "all_cnn_b": (79.11, (0.1, 0.05, 0.01, 0.001)),
    "model_c": (83.18, (0.1, 0.05, 0.01, 0.005)),
    "strided_cnn_c": (80.78, (0.01, 0.005, 0.001, 0.001)),
    "convpool_cnn_c": (85.88, (0.005, 0.001, 0.0005, 0.0001)),
    "all_cnn_c": (83.28, (0.005, 0.001, 0.0005, 0.0001)),
}
COURSE_BATCH_SIZE = 4
# Its Table 4: test accuracy (%) on the 1,000 test images of CIFAR-100 subset class1 / class2,
# by step: from scratch (350 epochs), step 1 (frozen backbone, 50 epochs), step 2 (all layers,
# 50 epochs); rates (0.025, 0.01, 0.005, 0.001) at epochs 0/200/250/300 for all three.
COURSE_TRANSFER: dict[tuple[str, str], float] = {
    ("scratch", "class1"): 68.75, ("scratch", "class2"): 68.45,
    ("step1", "class1"): 52.10, ("step1", "class2"): 38.65,
    ("step2", "class1"): 75.05, ("step2", "class2"): 75.10,
}
COURSE_TRANSFER_RATES = (0.025, 0.01, 0.005, 0.001)


def paper_test_error(network: str, dataset: str, augment: bool) -> float | None:
  """The paper's test error (%) for this network, dataset and augmentation, if it reports one."""
  return PAPER_TEST_ERROR.get((network, dataset, bool(augment)))


def course_accuracy(network: str, dataset: str, augment: bool) -> float | None:
  """The course project's CIFAR-10 test accuracy (%) for a network, if it trained that one."""
  if dataset != "cifar10" or augment or network not in COURSE_CIFAR10:
    return None
  return COURSE_CIFAR10[network][0]


def course_transfer_accuracy(step: str, subset: str) -> float | None:
  """The course project's test accuracy (%) for a transfer step ('scratch', 'step1', 'step2')
  on subset 'class1' or 'class2'."""
  return COURSE_TRANSFER.get((step, subset))


def network_rank(network: str) -> int:
  """Position of a network in the paper's order (unknown names sort last)."""
  return NETWORKS.index(network) if network in NETWORKS else len(NETWORKS)
