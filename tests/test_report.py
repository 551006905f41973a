"""The report: its table (paper and course references, the last fifth of the epochs), plots,
hand-written findings, the runs below a root, one-line errors for damaged files."""

import json
import os
import shutil

import pytest

from allconv_jax import cli, models, paper
from allconv_jax.errors import UserError
from allconv_jax.tools import plots, report
from tests.tool_helpers import assert_png

# One worker for the three results-tools files (sweep, report, evaluate/visualize): they
# share conftest.py's `swept` and `model_a_run`; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("results_tools")]


@pytest.mark.slow
def test_report_table_and_plots(swept, model_a_run, tmp_path):
  sweep_root = swept[0]
  sweep_run = os.path.join(sweep_root, "all_cnn_c", "lr0.05")
  out = tmp_path / "report"
  path = report.write_report(report.load_runs([sweep_run, model_a_run]), str(out))
  assert path == str(out / "results.md")
  text = (out / "results.md").read_text()
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| Run |"))
  assert [c.strip() for c in header.strip("|").split("|")] == list(report.COLUMNS)
  rows = [line for line in lines if line.startswith("| ") and line not in (header,)]
  assert len(rows) == 2
  cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
  assert [c[1] for c in cells] == ["model_a (width x0.05)", "all_cnn_c (width x0.05)"]  # paper
  with open(os.path.join(model_a_run, "results.json")) as f:
    res = json.load(f)
  assert res["data_source"] == "synthetic"  # recorded, and shown beside the dataset
  last = f"{100 * res['final_val_accuracy']:.2f}"  # 1 epoch: its last fifth is that epoch
  assert cells[0][2:10] == ["CIFAR-10 (synthetic)", "0.01", "1", "0", "no", "meanstd",
                            f"{100 * res['best_val_accuracy']:.2f}", f"{last}-{last}"]
  assert cells[0][10] == f"{100 * (1 - res['test_accuracy']):.2f}"
  assert cells[0][11:] == ["—", "—"]  # synthetic data: no paper or course reference
  for run in (sweep_run, model_a_run):  # each run's folder, relative to the report
    assert f"`{os.path.relpath(run, out)}`" in text
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert len(pngs) == 3 and report.COMPARISON_PNG in pngs
  for name in pngs:
    assert_png(out / name)
    assert f"]({name})" in text


@pytest.mark.parametrize("n", [3, 14, 30, 90])
def test_comparison_plot_of_many_runs_has_distinct_lines_and_a_legend_beside_the_axes(n):
  records = [{"epoch": e, "val_accuracy": 0.1 + 0.01 * e} for e in (1, 2, 3)]
  fig = plots.comparison_figure([(f"net/lr{i}", records) for i in range(n)])
  try:
    ax = fig.axes[0]
    styles = [(tuple(line.get_color()) if not isinstance(line.get_color(), str)
               else line.get_color(), line.get_linestyle()) for line in ax.get_lines()]
    assert len(styles) == n and len(set(styles)) == n  # no two runs look alike
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # beside the axes: it hides no curve
    assert len(ax.get_legend().get_texts()) == n
  finally:
    plots.plt.close(fig)


@pytest.mark.slow
def test_report_finds_runs_below_a_root(swept, tmp_path):
  sweep_root = swept[0]
  runs = report.find_runs(sweep_root)
  assert runs == [os.path.join(sweep_root, "all_cnn_c", "lr0.05")]
  assert report.labels_for(runs, sweep_root) == ["all_cnn_c/lr0.05"]
  assert plots.file_names(["all_cnn_c/lr0.05"]) == {"all_cnn_c/lr0.05": "all_cnn_c__lr0.05.png"}
  with pytest.raises(UserError, match="^no runs found below "):
    report.find_runs(str(tmp_path))


def fake_results(model="all_cnn_c", dataset="cifar10", augment=False, source="tfds", **extra):
  return {"model": model, "dataset": dataset, "augment": augment, "subset": None,
          "learning_rate": 0.05, "epochs": 350, "preprocessing": "gcn_zca",
          "width_multiplier": 1.0, "test_accuracy": 0.9, "best_val_accuracy": 0.91,
          "transfer_source": None,
          "config": {"data": {"source": source, "max_train_examples": 0,
                              "max_test_examples": 0}}} | extra


@pytest.mark.parametrize("results, want", [
    (fake_results(), ("9.08", "83.28")),
    (fake_results(model="strided_cnn_a"), ("13.46", "—")),  # not in the course's Table 3
    (fake_results(model="convpool_cnn_c"), ("9.31", "85.88")),
    (fake_results(dataset="cifar100", subset="class2"), ("—", "68.45")),
    (fake_results(dataset="cifar100", subset="class1", transfer_source="/r",
                  config={"data": {"source": "local"}, "optimizer": {"freeze": "backbone/"}}),
     ("—", "52.10")),
    (fake_results(dataset="cifar100", subset="class2", transfer_source="/r",
                  config={"data": {"source": "local"}, "optimizer": {"freeze": ""}}),
     ("—", "75.10")),
    (fake_results(augment=True), ("7.25", "—")),
    (fake_results(dataset="cifar100"), ("33.71", "—")),
    (fake_results(model="model_a", augment=True), ("—", "—")),
    (fake_results(source="synthetic"), ("—", "—")),
    (fake_results(width_multiplier=0.5), ("—", "—")),
    (fake_results(dataset="cifar100", subset="vehicles"), ("—", "—")),
])
def test_paper_and_course_references(results, want):
  assert report.references(results) == want
  row = report.table_row(report.Run("run", "/x", results, []))
  assert row[-2:] == list(want) and row[10] == "10.00"


def test_the_last_fifth_of_the_epochs_and_hand_written_findings(tmp_path):
  records = [{"epoch": e, "val_accuracy": v} for e, v in
             enumerate((0.1, 0.2, 0.3, 0.5, 0.4, 0.6, 0.55, 0.7, 0.68, 0.69), 1)]
  assert report.last_fifth(records) == "68.00-69.00"  # epochs 9 and 10 of 10
  assert report.last_fifth(records[:3]) == "30.00-30.00" and report.last_fifth([]) == "—"
  run = report.Run("a/lr0.1", str(tmp_path / "a"), fake_results(), records)
  (tmp_path / report.FINDINGS).write_text("All-CNN-C beats Model C.\n")
  text = report.results_markdown([run], {"a/lr0.1": "a.png"}, str(tmp_path))
  assert text.startswith("# Results\n\n## Findings\n\nAll-CNN-C beats Model C.\n")


def test_paper_numbers_cover_the_twelve_networks():
  assert len(paper.NETWORKS) == 12 and set(paper.NETWORKS) == set(models.MODEL_NAMES)
  assert all(paper.paper_test_error(n, "cifar10", False) for n in paper.NETWORKS)
  assert paper.paper_test_error("all_cnn_c", "cifar10", False) == 9.08
  assert paper.course_accuracy("all_cnn_c", "cifar100", False) is None
  assert paper.course_accuracy("all_cnn_c", "cifar10", False) == 83.28
  assert len(paper.COURSE_CIFAR10) == 8 and set(paper.COURSE_CIFAR10) <= set(paper.NETWORKS)


@pytest.mark.slow
def test_report_with_malformed_files_or_an_unwritable_out_is_one_line(model_a_run, tmp_path,
                                                                      monkeypatch, capsys):
  bad = tmp_path / "bad"
  shutil.copytree(model_a_run, bad, ignore=shutil.ignore_patterns("checkpoints"))
  (bad / "metrics.jsonl").write_text('{"epoch": 1, "step": 8}\nnot json\n')
  run = report.load_run(str(bad), "bad")  # a damaged metrics line is skipped, the rest kept
  assert [m["epoch"] for m in run.metrics] == [1]
  (bad / "results.json").write_text("{trunc")
  with pytest.raises(UserError, match="results.json is unreadable"):
    report.load_run(str(bad), "bad")

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "results.md"))

  monkeypatch.setattr(report.files, "write_text", refuse)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    report.write_report(report.load_runs([model_a_run]), str(tmp_path / "out"))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: Permission denied") and "\n" not in err
