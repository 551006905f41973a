"""Test session setup: a persistent XLA compilation cache shared by every test, every pytest-xdist
worker and every subprocess, and kept between runs.

The tiny runs compile the same programs again and again; the cache turns most of those
compilations into reads. It lives in one place, `$TMPDIR/allconv-jax-xla-cache-<uid>` (or
`$ALLCONV_TEST_XLA_CACHE`); delete it to start cold.
"""

import os
import tempfile

_CACHE = os.environ.get("ALLCONV_TEST_XLA_CACHE") or os.path.join(
    tempfile.gettempdir(), f"allconv-jax-xla-cache-{os.getuid()}")
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Shared preprocessing statistics (data/preprocessing.py) go to a folder of this session.
os.environ.setdefault("ALLCONV_CACHE_DIR", tempfile.mkdtemp(prefix="allconv-jax-statistics-"))
