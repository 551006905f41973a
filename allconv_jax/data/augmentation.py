"""On-device augmentation: random horizontal flips and translations with zero fill."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(key: jax.Array, images: jax.Array, *, flip: bool, translate: int) -> jax.Array:
  """Random horizontal flips (p=0.5) and translations by up to `translate` pixels (zero fill)."""
  if translate < 0:
    raise ValueError(f"translate must be >= 0, got {translate}")
  if not flip and translate == 0:
    return images
  flip_key, shift_key = jax.random.split(key)
  n, h, w, c = images.shape
  if translate:
    t = translate
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * t + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
  return images
