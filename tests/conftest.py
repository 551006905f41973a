"""Test session setup: a persistent XLA compilation cache shared by every test and subprocess.

The tiny runs compile the same programs again and again; the cache (a temporary folder for this
session) turns most of those compilations into reads.
"""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="allconv-jax-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
