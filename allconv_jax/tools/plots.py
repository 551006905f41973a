"""Learning curves of runs from their metrics.jsonl records, as PNG figures (headless): one run's
validation accuracy and training loss, and the validation accuracy of many runs together."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LINE_STYLES = ("-", "--", ":", "-.")
Curves = Sequence[tuple[str, Sequence[dict[str, Any]]]]  # (legend label, metrics records)


def curve(metrics: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[
    list[int], list[float]]:
  """(epochs, values) of one metric, skipping epochs where it is missing."""
  points = [(m["epoch"], scale * m[key]) for m in metrics if m.get(key) is not None]
  return [e for e, _ in points], [v for _, v in points]


def plot_run(metrics: Sequence[dict[str, Any]], title: str, path: str) -> None:
  """Validation accuracy and training loss per epoch of one run, side by side."""
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
  epochs, acc = curve(metrics, "val_accuracy", 100.0)
  ax_acc.plot(epochs, acc, marker="." if len(epochs) < 30 else None, color="tab:blue")
  ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
  epochs, loss = curve(metrics, "train_loss")
  ax_loss.plot(epochs, loss, marker="." if len(epochs) < 30 else None, color="tab:red")
  ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
  for ax in (ax_acc, ax_loss):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not ax.lines[0].get_xdata().size:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def line_styles(n: int) -> list[tuple[Any, str]]:
  """n distinct (colour, line style) pairs: tab10 up to 10 runs, tab20 up to 20, then tab20
  again with dashed, dotted and dash-dot lines (80 pairs), then colours from turbo."""
  if n > 80:
    return [(plt.get_cmap("turbo")(i / (n - 1)), "-") for i in range(n)]
  colours = plt.get_cmap("tab10" if n <= 10 else "tab20").colors
  return [(colours[i % len(colours)], LINE_STYLES[i // len(colours)]) for i in range(n)]


def comparison_figure(curves: Curves) -> Any:
  """Validation accuracy per epoch of every run on one set of axes; the legend to the right
  of the axes (in columns of at most 25 runs), never over the curves."""
  columns = max(1, -(-len(curves) // 25))
  fig, ax = plt.subplots(figsize=(8 + 3 * columns, 5 + 0.1 * min(len(curves), 25)))
  for (label, metrics), (colour, style) in zip(curves, line_styles(len(curves)), strict=True):
    epochs, acc = curve(metrics, "val_accuracy", 100.0)
    ax.plot(epochs, acc, label=label, color=colour, linestyle=style,
            marker="." if len(epochs) < 30 else None)
  ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy per epoch")
  ax.grid(alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=columns,
            borderaxespad=0.0)
  fig.tight_layout()
  return fig


def plot_comparison(curves: Curves, path: str) -> None:
  """comparison_figure(curves), saved to `path`."""
  fig = comparison_figure(curves)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def file_names(labels: Sequence[str], taken: Sequence[str] = ()) -> dict[str, str]:
  """A distinct PNG file name per run label: 'all_cnn_c/lr0.05' -> 'all_cnn_c__lr0.05.png'."""
  names: dict[str, str] = {}
  for label in labels:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", label.replace("/", "__")) + ".png"
    while name in names.values() or name in taken:
      name = name.removesuffix(".png") + "_.png"
    names[label] = name
  return names

