"""The paper's shared protocol, every key at its default; the other configs start from it.

  python main.py --config=configs/default.py --workdir=/tmp/allconv/default

The defaults live in the library (allconv_jax/config.py: All-CNN-C on CIFAR-10, the paper's
section 3.1); the keys are documented in docs/config.md.
"""

from allconv_jax.config import get_config

__all__ = ["get_config"]
