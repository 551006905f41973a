r"""What a trained network looks at: gradients, the deconvnet rule and guided backpropagation.

  python -m allconv_jax.tools.visualize --workdir=/tmp/allconv/all_cnn_c --out=/tmp/allconv/vis \
      [--checkpoint=latest|best] [--num_images=4] [--layer=backbone/stage2_conv1 --units=0,1,2]

For the first test images, the input gradient of a target under three backward rules at every
ReLU of the same network (paper section 3.4), computed with `models.create_model(...,
relu_rule=...)`:

- gradient:  the plain gradient (passes where the forward input was positive);
- deconvnet: passes where the incoming gradient is positive (Zeiler & Fergus);
- guided:    passes where both are positive (guided backpropagation).

Targets: the predicted class's score (OUT/predicted_class.png) and, with --layer, each unit of
that layer (OUT/<layer>_unit<u>.png): its maximal activation over space (--unit_objective=max,
the paper's choice) or its spatial sum (--unit_objective=sum), per image. Each PNG is a grid:
rows = images, columns = input image (raw uint8), gradient, deconvnet, guided. Each map is
scaled by its largest absolute value for display (zero = mid-grey). Only PNGs are written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags

from allconv_jax import checkpointing, cli, files, input_pipeline, models
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError

matplotlib.use("Agg")  # headless; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

# (relu rule, column title) of the three maps, in column order after the input image.
RULES: tuple[tuple[str, str], ...] = (
    ("standard", "gradient"), ("deconvnet", "deconvnet"), ("guided", "guided backprop"))
UNIT_OBJECTIVES = ("max", "sum")
DEFAULT_UNITS = (0, 1, 2)

Objective = Callable[[jax.Array, Any], jax.Array]


# ----------------------------------------------------------------------------- gradients


def intermediates(model: models.AllConvNet, params: Any, images: jax.Array) -> tuple[
    jax.Array, Any]:
  """(logits, the sown 'intermediates' collection) of a forward pass in evaluation mode."""
  logits, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  return logits, state["intermediates"]


def _shapes(model: models.AllConvNet, params: Any) -> Any:
  """The 'intermediates' collection's shapes for one image (no compute)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda p, x: intermediates(model, p, x)[1], params, x)


def layer_paths(model: models.AllConvNet, params: Any) -> dict[str, tuple[str, ...]]:
  """Every sown activation by name ('backbone/stage1_conv1', ..., 'classifier') -> its keys,
  in the network's order.

  Names drop the collection's '_act' suffix (models.py sows 'stage1_conv1_act'); `resolve_layer`
  accepts both spellings.
  """
  paths = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(_shapes(model, params))[0]:
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    paths["/".join(keys).removesuffix("_act")] = keys
  convs = [f"backbone/{layer.name}" for layer in models.layer_list(model.arch)
           if isinstance(layer, models.Conv)]
  rank = {name: i for i, name in enumerate(convs)}
  return dict(sorted(paths.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def resolve_layer(paths: dict[str, tuple[str, ...]], layer: str) -> tuple[str, tuple[str, ...]]:
  """(display name, collection keys) of a --layer value; UserError if there is no such layer."""
  name = layer.strip("/").removesuffix("_act")
  if name not in paths:
    raise UserError(f"unknown --layer {layer!r}; valid: {', '.join(paths)}")
  return name, paths[name]


def activation(inter: Any, keys: Sequence[str]) -> Any:
  """The activation under `keys` (e.g. ('backbone', 'stage2_conv1_act')) of 'intermediates'."""
  node = inter
  for key in keys:
    node = node[key]
  return node[0]  # sow keeps a tuple of the values sown


def num_units(model: models.AllConvNet, params: Any, keys: Sequence[str]) -> int:
  """The channel count of the activation under `keys`."""
  return int(activation(_shapes(model, params), keys).shape[-1])


def class_objective(classes: jax.Array) -> Objective:
  """Per image, its score (logit) for its class in `classes`."""
  def objective(logits: jax.Array, _: Any) -> jax.Array:
    return jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]
  return objective


def unit_objective(keys: Sequence[str], unit: int, reduce: str) -> Objective:
  """Per image, unit `unit` of a layer: its maximum over space ('max') or spatial sum ('sum')."""
  if reduce not in UNIT_OBJECTIVES:
    raise ValueError(f"unknown unit objective {reduce!r}; valid: {UNIT_OBJECTIVES}")

  def objective(_: jax.Array, inter: Any) -> jax.Array:
    act = activation(inter, keys)[..., unit].astype(jnp.float32)  # (N, H, W)
    return jnp.max(act, axis=(1, 2)) if reduce == "max" else jnp.sum(act, axis=(1, 2))
  return objective


def input_gradients(model: models.AllConvNet, params: Any, images: jax.Array,
                    objectives: Sequence[Objective]) -> np.ndarray:
  """(K, N, H, W, C): each objective's gradient w.r.t. each image under the model's ReLU rule.

  An objective's per-image values are summed before differentiating; in evaluation mode images
  do not interact, so each image gets the gradient of its own value. One jitted program.
  """
  def scores(p: Any, x: jax.Array) -> jax.Array:
    logits, inter = intermediates(model, p, x)
    return jnp.stack([jnp.sum(objective(logits, inter)) for objective in objectives])

  grads = jax.jit(jax.jacrev(scores, argnums=1))(params, images)
  return np.asarray(grads, dtype=np.float32)


def rule_models(model: models.AllConvNet, model_config: Any) -> dict[str, models.AllConvNet]:
  """The run's network with each backward rule (same module and parameters)."""
  return {rule: models.create_model(model_config, model.num_classes,
                                     model.options.convolutions, relu_rule=rule)
          for rule, _ in RULES}


def for_display(grad: np.ndarray) -> np.ndarray:
  """One map (H, W, 3) scaled into [0, 1] by its largest absolute value; zero -> 0.5."""
  peak = float(np.max(np.abs(grad)))
  if peak == 0.0:
    return np.full(grad.shape, 0.5, np.float32)
  return np.clip(0.5 + 0.5 * grad / peak, 0.0, 1.0)


# ----------------------------------------------------------------------------- figures


def save_grid(path: str, raw: np.ndarray, maps: Sequence[np.ndarray], row_labels: Sequence[str],
              title: str) -> None:
  """A PNG grid: rows = images, columns = raw image, then one column per map set."""
  n, cols = len(raw), 1 + len(maps)
  fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols, 2.0 * n + 0.6), squeeze=False)
  titles = ["input image", *(name for _, name in RULES)]
  for i in range(n):
    axes[i, 0].imshow(raw[i], interpolation="nearest")
    axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    for j, m in enumerate(maps, 1):
      axes[i, j].imshow(for_display(m[i]), interpolation="nearest")
    for j in range(cols):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(titles[j], fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _file_name(layer: str, unit: int) -> str:
  return f"{layer.replace('/', '_')}_unit{unit}.png"


def visualize(workdir: str, out: str, checkpoint: str = "latest", num_images: int = 4,
              layer: str = "", units: Sequence[int] = (),
              reduce: str = "max") -> list[str]:
  """Writes the PNG grids for a run's first `num_images` test images; returns their paths."""
  if checkpoint not in ("latest", "best"):
    raise UserError(f"--checkpoint must be 'latest' or 'best', got {checkpoint!r}")
  if num_images < 1:
    raise UserError(f"--num_images must be >= 1, got {num_images}")
  if units and not layer:
    raise UserError("--units needs --layer (e.g. --layer=backbone/stage2_conv1)")
  if reduce not in UNIT_OBJECTIVES:
    raise UserError(f"--unit_objective must be one of {', '.join(UNIT_OBJECTIVES)}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} exists and is not a folder")
  config, model, params = checkpointing.load_run(workdir, checkpoint)
  keys: tuple[str, ...] = ()
  if layer:
    layer, keys = resolve_layer(layer_paths(model, params), layer)
    units = tuple(units) or DEFAULT_UNITS
    channels = num_units(model, params, keys)
    bad = [u for u in units if not 0 <= u < channels]
    if bad:
      raise UserError(f"--units {', '.join(map(str, bad))} out of range: {layer} has "
                      f"{channels} units (0..{channels - 1})")

  splits = input_pipeline.load_splits(config.data, config.seed)
  if num_images > len(splits.test_labels):
    raise UserError(f"--num_images ({num_images}) exceeds the {len(splits.test_labels)} test "
                    "images")
  raw = splits.test_images[:num_images]
  stats = preprocessing.load_preprocessing(files.path(workdir, files.PREPROCESSING))
  images = jnp.asarray(input_pipeline.apply_preprocessing(stats, raw))
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  predicted = np.asarray(forward(params, images)).argmax(-1)
  names = splits.class_names
  labels = [f"#{i}: {names[t]}\npredicted {names[p]}"
            for i, (t, p) in enumerate(zip(splits.test_labels[:num_images], predicted,
                                           strict=True))]

  what = "maximal activation over space" if reduce == "max" else "spatial sum of the activation"
  targets = [(class_objective(jnp.asarray(predicted)), "predicted_class.png",
              f"{config.model.name}: score of the predicted class")]
  targets += [(unit_objective(keys, u, reduce), _file_name(layer, u),
               f"{config.model.name}: {layer} unit {u} ({what})") for u in (units if layer else ())]
  by_rule = rule_models(model, config.model)
  maps = [input_gradients(by_rule[rule], params, images, [t[0] for t in targets])
          for rule, _ in RULES]  # per rule: (targets, N, H, W, C)
  os.makedirs(out, exist_ok=True)
  written = []
  for k, (_, file_name, title) in enumerate(targets):
    path = os.path.join(out, file_name)
    save_grid(path, raw, [m[k] for m in maps], labels, title)
    written.append(path)
  return written


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "A trained run's folder.")
  flags.DEFINE_string("out", None, "Folder for the PNG grids.")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to load.")
  flags.DEFINE_integer("num_images", 4, "How many test images (the first ones).")
  flags.DEFINE_string("layer", "", "Also visualize units of this layer, e.g. "
                      "backbone/stage2_conv1 or classifier.")
  flags.DEFINE_list("units", None, "Units (channels) of --layer; default 0,1,2.")
  flags.DEFINE_enum("unit_objective", "max", list(UNIT_OBJECTIVES), "Per unit: gradient of its "
                    "maximal activation over space (max) or of its spatial sum (sum).")


def parse_units(values: Sequence[str] | None) -> tuple[int, ...]:
  """Unit indices from text; UserError if one is not a whole number."""
  try:
    return tuple(int(v) for v in values or ())
  except ValueError:
    raise UserError(f"--units must be whole numbers, got {','.join(values or ())}") from None


def main(argv: list[str]) -> None:
  cli.start(argv[1:])
  fl = flags.FLAGS
  with cli.user_errors():
    if not fl.workdir:
      raise UserError("--workdir is required (a trained run's folder)")
    if not fl.out:
      raise UserError("--out is required (the folder for the PNG grids)")
    written = visualize(fl.workdir, fl.out, fl.checkpoint, fl.num_images, fl.layer,
                        parse_units(fl.units), fl.unit_objective)
  for path in written:
    print(path)


def run() -> None:
  """The program (also a console command, see pyproject.toml)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
