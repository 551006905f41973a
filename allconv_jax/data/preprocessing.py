"""Preprocessing statistics: GCN + ZCA as pylearn2 computed them for the maxout paper (and,
through it, Springenberg et al. 2015), the course project's mean/std, fitted on the training
split and applied to every split; `write_preprocessing` and `load_preprocessing` are their file
format (a run keeps them as preprocessing.npz: files.py)."""

from __future__ import annotations

import os
from typing import IO, Any

import numpy as np

from allconv_jax.data.cifar import IMAGE_SHAPE, MEANSTD_MEAN, MEANSTD_STD, PIXELS
from allconv_jax.errors import UserError, one_line

CHUNK = 4096  # images per chunk in the preprocessing passes (bounds the float buffers)


def _check_images(images: np.ndarray) -> None:
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"expected images of shape (N, 32, 32, 3), got {images.shape}")


def _gcn(rows: np.ndarray, scale: float) -> np.ndarray:
  """pylearn2 global_contrast_normalize(scale=scale): zero mean, L2 norm `scale` per row."""
  x = rows.astype(np.float64)
  x -= x.mean(axis=1, keepdims=True)
  divisor = np.sqrt(np.square(x).sum(axis=1, keepdims=True)) / scale
  divisor[divisor < 1e-8] = 1.0
  x /= divisor
  return x


def _zca_matrix(
  centred: np.ndarray | None, cov: np.ndarray | None, n: int, eps: float
) -> np.ndarray:
  """W = V diag(1/sqrt(eig + eps)) V^T, from the covariance or (N < D) the N x N Gram matrix."""
  if cov is not None:
    eig, vec = np.linalg.eigh(cov)
    eig = np.maximum(eig, 0.0)
    return (vec * (1.0 / np.sqrt(eig + eps))) @ vec.T
  assert centred is not None
  # centred / sqrt(n) = U S V^T: the Gram matrix's eigenvectors are U with eigenvalues S^2, and
  # V = centred^T U / (sqrt(n) S). Directions with S = 0 (the null space) keep 1/sqrt(eps).
  eig, u = np.linalg.eigh(centred @ centred.T / n)
  keep = eig > eig.max() * 1e-12
  eig, u = eig[keep], u[:, keep]
  v = (centred.T @ u) / np.sqrt(n * eig)
  d = centred.shape[1]
  scale = 1.0 / np.sqrt(eig + eps) - 1.0 / np.sqrt(eps)
  return np.eye(d) / np.sqrt(eps) + (v * scale) @ v.T


def fit_preprocessing(data_config: Any, train_images: np.ndarray) -> dict[str, np.ndarray]:
  """Fits data.preprocessing on the training images only; returns numpy statistics."""
  kind = data_config.preprocessing
  stats: dict[str, np.ndarray] = {"kind": np.array(kind)}
  if kind == "none":
    return stats
  if kind == "meanstd":
    stats["mean"] = np.asarray(MEANSTD_MEAN, dtype=np.float32)
    stats["std"] = np.asarray(MEANSTD_STD, dtype=np.float32)
    return stats
  _check_images(train_images)
  n = len(train_images)
  if n < 2:
    raise UserError(f"gcn_zca needs at least 2 training images to fit (got {n})")
  scale = float(data_config.gcn_scale)
  eps = float(data_config.zca_epsilon)
  rows = train_images.reshape(n, PIXELS)
  if n < PIXELS:
    x = _gcn(rows, scale)
    mean = x.mean(axis=0)
    x -= mean
    whitening = _zca_matrix(x, None, n, eps)
  else:
    # Two passes over chunks (mean, then covariance of the centred data) in float64.
    total = np.zeros(PIXELS)
    for i in range(0, n, CHUNK):
      total += _gcn(rows[i : i + CHUNK], scale).sum(axis=0)
    mean = total / n
    cov = np.zeros((PIXELS, PIXELS))
    for i in range(0, n, CHUNK):
      x = _gcn(rows[i : i + CHUNK], scale) - mean
      cov += x.T @ x
    cov /= n  # pylearn2 divides by N
    whitening = _zca_matrix(None, cov, n, eps)
  stats.update(
    gcn_scale=np.array(scale),
    zca_epsilon=np.array(eps),
    mean=mean.astype(np.float32),
    whitening=whitening.astype(np.float32),
  )
  return stats


def _kind(stats: dict[str, Any]) -> str:
  if "kind" not in stats:
    raise ValueError("preprocessing statistics have no 'kind'")
  return str(np.asarray(stats["kind"]))


_REQUIRED_STATS = {
  "none": (),
  "meanstd": ("mean", "std"),
  "gcn_zca": ("gcn_scale", "zca_epsilon", "mean", "whitening"),
}


def apply_preprocessing(stats: dict[str, Any], images: np.ndarray) -> np.ndarray:
  """Maps uint8 images to float32 (N, 32, 32, 3) with fitted statistics, chunk by chunk."""
  _check_images(images)
  kind = _kind(stats)
  if kind not in _REQUIRED_STATS:
    raise ValueError(f"unknown preprocessing kind {kind!r}")
  n = len(images)
  out = np.empty(images.shape, dtype=np.float32)
  if kind == "gcn_zca":
    scale = float(stats["gcn_scale"])
    mean = np.asarray(stats["mean"], dtype=np.float32)
    whitening = np.asarray(stats["whitening"], dtype=np.float32)
    rows, flat = images.reshape(n, PIXELS), out.reshape(n, PIXELS)
    for i in range(0, n, CHUNK):
      x = _gcn(rows[i : i + CHUNK], scale).astype(np.float32) - mean
      np.matmul(x, whitening, out=flat[i : i + CHUNK])
    return out
  for i in range(0, n, CHUNK):
    x = images[i : i + CHUNK].astype(np.float32) / 255.0
    if kind == "meanstd":
      x = (x - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    out[i : i + CHUNK] = x
  return out


def write_preprocessing(f: IO[bytes], stats: dict[str, np.ndarray]) -> None:
  """Writes the statistics to an open binary file (.npz content)."""
  np.savez(f, **{k: np.asarray(v) for k, v in stats.items()})


def load_preprocessing(path: str) -> dict[str, np.ndarray]:
  """Reads statistics written by `write_preprocessing`; UserError if missing or damaged."""
  if not os.path.isfile(path):
    raise UserError(f"preprocessing statistics {path} not found")
  try:
    with np.load(path, allow_pickle=False) as f:
      stats = {k: f[k] for k in f.files}
  except Exception as e:  # zip/npy errors of a damaged file
    raise UserError(f"preprocessing statistics {path} are corrupt: {one_line(e)}") from e
  kind = str(stats["kind"]) if "kind" in stats else None
  if kind not in _REQUIRED_STATS or any(k not in stats for k in _REQUIRED_STATS[kind]):
    raise UserError(f"preprocessing statistics {path} are incomplete (kind={kind})")
  return stats
