"""The choice of a learning rate from finished runs, shared by the sweep, the study and the report:
runs' numbers read back and checked, the winner per network, rates and accuracies as text.

A number in a results.json or metrics.jsonl that is not one (a damaged or hand-edited file) is
refused with one line naming the file and the field; nothing is chosen from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from allconv_jax import files
from allconv_jax.errors import UserError

OK_STATUSES = ("trained", "skipped")  # a point's statuses whose run is finished
# results.json numbers the tools read: required, or a number or null where they may be missing.
RESULTS_NUMBERS = {"test_accuracy": "required", "learning_rate": "number",
                   "width_multiplier": "number", "epochs": "number",
                   "best_val_accuracy": "or null", "final_val_accuracy": "or null"}
METRICS_NUMBERS = ("val_accuracy", "train_loss")  # numbers or null in metrics.jsonl records


def rate_name(rate: float) -> str:
  """A rate as folder-name text: 0.05 -> '0.05' (the shortest text that reads back exactly)."""
  return repr(float(rate))


def pct(x: float | None) -> str:
  """An accuracy as a percentage cell: 0.9123 -> '91.23'; None -> '—'."""
  return "—" if x is None else f"{100 * x:.2f}"


def error_pct(accuracy: float) -> str:
  """The error of an accuracy as a percentage cell: 0.9 -> '10.00'."""
  return f"{100 * (1 - accuracy):.2f}"


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _damaged(where: str, field: str, value: Any, what: str = "a number") -> UserError:
  return UserError(f"{where}: {field} is {value!r}, not {what} (a damaged or edited file: "
                   "restore it from a copy or train the run again)")


def check_results(results: dict[str, Any], path: str) -> dict[str, Any]:
  """`results` (read from `path`) if its numbers are numbers; UserError naming the first that
  is not."""
  for field, rule in RESULTS_NUMBERS.items():
    if field not in results and rule != "required":
      continue
    value = results.get(field)
    if not (_is_number(value) or (value is None and rule == "or null")):
      raise _damaged(path, field, value)
  return results


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl records (files.read_metrics), their epochs and the numbers the tools
  plot and choose from checked; UserError naming the first bad one."""
  path = files.path(workdir, files.METRICS)
  records = files.read_metrics(path)
  for record in records:
    epoch = record["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool)):
      raise _damaged(path, "a record's epoch", epoch, "a whole number")
    for field in METRICS_NUMBERS:
      value = record.get(field)
      if value is not None and not _is_number(value):
        raise _damaged(path, f"epoch {epoch}: {field}", value)
  return records


def read_results(workdir: str) -> dict[str, Any] | None:
  """A run's results.json (None if absent or unreadable, as files.read_results), checked."""
  results = files.read_results(workdir)
  return None if results is None else check_results(results, files.path(workdir, files.RESULTS))


def pick_winners(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
  """Per network, the finished point with the highest best-epoch validation accuracy.

  Ties go to the higher final validation accuracy, then to the rate listed first. A network
  without a finished, validated point gets None.
  """
  winners: dict[str, dict[str, Any] | None] = {}
  for rec in records:
    winners.setdefault(rec["network"], None)
    if rec["status"] not in OK_STATUSES or rec.get("best_val_accuracy") is None:
      continue
    best = winners[rec["network"]]
    key = (rec["best_val_accuracy"], rec.get("final_val_accuracy") or -1.0)
    if best is None or key > (best["best_val_accuracy"], best.get("final_val_accuracy") or -1.0):
      winners[rec["network"]] = rec
  return winners


def selection_record(record: dict[str, Any], epochs: int) -> dict[str, Any]:
  """A point's record judged on its first `epochs` epochs (all of them for 0): best and last
  validation accuracy from its metrics.jsonl, so a run continued past them is judged the same."""
  if not epochs or record["status"] not in OK_STATUSES:
    return record
  metrics = [m for m in read_metrics(record["workdir"])
             if m["epoch"] <= epochs and m.get("val_accuracy") is not None]
  if not metrics or metrics[-1]["epoch"] != epochs:
    return {**record, "status": "failed", "error": f"no validation record of epoch {epochs}"}
  return {**record, "best_val_accuracy": max(m["val_accuracy"] for m in metrics),
          "final_val_accuracy": metrics[-1]["val_accuracy"]}
