"""Data on the devices: a one-axis mesh over every device, replicated arrays and padded
evaluation batches (the dataset lives on the device; each batch is gathered there)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
  """A one-axis ('data') mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), ("data",))


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array with a full copy on every device (works across hosts)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """`replicate` for every leaf of a tree of host or single-device arrays.

  Through host memory on purpose: with several processes, `jax.device_put` of a single-device
  jax array onto a mesh that spans processes gives a broken array (seen with jax 0.10.2).
  """
  return jax.tree_util.tree_map(lambda x: replicate(np.asarray(x), mesh), tree)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """An evaluation split padded and cut into batches: (num_batches, batch, ...) plus a mask."""
  images: jax.Array
  labels: jax.Array
  mask: jax.Array
  size: int


def make_eval_set(images: np.ndarray, labels: np.ndarray, batch: int, mesh: Mesh) -> EvalSet:
  n = len(labels)
  batch = max(1, min(batch, n)) if n else 1
  batch = -(-batch // mesh.size) * mesh.size
  nb = max(1, -(-n // batch)) if n else 0
  pad = nb * batch - n
  imgs = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labs = np.concatenate([labels, np.zeros((pad,), labels.dtype)]).astype(np.int32)
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return EvalSet(replicate(imgs.reshape(nb, batch, *images.shape[1:]), mesh),
                 replicate(labs.reshape(nb, batch), mesh), replicate(mask.reshape(nb, batch),
                                                                     mesh), n)
