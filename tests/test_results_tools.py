"""The results tools: backward rules, the learning-rate sweep, the report, the visualizations,
evaluation. The tools are called in-process; the sweep's points are `python -m allconv_jax.launch`
processes (what the sweep is), and one sweep runs as a program for its exit status."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from allconv_jax import checkpointing, cli, cpu, files, input_pipeline, models, paper, train
from allconv_jax import config as config_lib
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError
from allconv_jax.tools import evaluate, invocations, plots, report, selection, sweep, visualize
from tests import helpers
from tests.helpers import ROOT, tiny_config, tiny_flags

# One worker: shared sweep and runs; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("results_tools")]

ALL_CNN_C = os.path.join(ROOT, "configs", "all_cnn_c.py")


def sweep_flags(**overrides):
  """tiny_flags for configs/all_cnn_c.py without the rate (the sweep sets it)."""
  return [f for f in tiny_flags(**overrides) if "optimizer.learning_rate" not in f]


def run_sweep(*args, **kwargs):
  """sweep.run_sweep in this process; (summary, the lines it echoed)."""
  lines = []
  summary = sweep.run_sweep(*args, echo=lines.append, **kwargs)
  return summary, "\n".join(lines)


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.size[0] > 50 and img.size[1] > 50


# ----------------------------------------------------------------------------- backward rules

X = jnp.array([-1.0, 2.0, 3.0, -4.0, 0.0])
G = jnp.array([5.0, -6.0, 7.0, 8.0, 9.0])


@pytest.mark.parametrize("rule, want", [
    ("standard", [0.0, -6.0, 7.0, 0.0, 0.0]),   # g where x > 0
    ("guided", [0.0, 0.0, 7.0, 0.0, 0.0]),      # g where x > 0 and g > 0
    ("deconvnet", [5.0, 0.0, 7.0, 8.0, 9.0]),   # max(g, 0), whatever x was
])
def test_relu_backward_rules_by_hand(rule, want):
  y, vjp = jax.vjp(lambda x: models.relu(x, rule), X)
  np.testing.assert_array_equal(y, [0.0, 2.0, 3.0, 0.0, 0.0])  # the forward pass is one ReLU
  np.testing.assert_array_equal(vjp(G)[0], want)


# x -> relu(W2 relu(W1 x)): z1 = W1 x = (1, 2, -1), h = (1, 2, 0), z2 = W2 h = (3, 1).
W1 = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
W2 = jnp.array([[1.0, 1.0, 1.0], [-1.0, 1.0, 0.0]])
X2 = jnp.array([1.0, 1.0])
G2 = jnp.array([1.0, -2.0])


@pytest.mark.parametrize("rule, want", [
    # dz2 = (1, -2); dh = W2^T dz2 = (3, -1, 1); dz1 = dh * [z1 > 0] = (3, -1, 0); W1^T dz1.
    ("standard", [3.0, -2.0]),
    # dz2 = (1, 0); dh = (1, 1, 1); dz1 = dh * [z1 > 0][dh > 0] = (1, 1, 0); W1^T dz1.
    ("guided", [1.0, 2.0]),
    # dz2 = relu(g) = (1, 0); dh = (1, 1, 1); dz1 = relu(dh) = (1, 1, 1); W1^T dz1.
    ("deconvnet", [0.0, 2.0]),
])
def test_backward_rules_through_two_layers_by_hand(rule, want):
  def net(x):
    return models.relu(W2 @ models.relu(W1 @ x, rule), rule)

  y, vjp = jax.vjp(net, X2)
  np.testing.assert_array_equal(y, [3.0, 1.0])
  np.testing.assert_array_equal(vjp(G2)[0], want)


def random_params(model, seed=0):
  """He-scaled normal weights from numpy (models.init_params takes seconds to compile on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape),
                            jnp.float32), shapes)


def test_visualize_switches_the_rule_on_the_same_network():
  config = tiny_config()
  model = models.create_model(config.model, 10, cpu.Convolutions())
  params = random_params(model)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  by_rule = visualize.rule_models(model, config.model)
  assert [m.relu_rule for m in by_rule.values()] == ["standard", "deconvnet", "guided"]
  logits = [jax.jit(m.apply)({"params": params}, images) for m in by_rule.values()]
  for other in logits[1:]:
    np.testing.assert_array_equal(other, logits[0])
  classes = jnp.array([3, 7])
  objectives = [visualize.class_objective(classes)]
  plain = jax.jit(jax.grad(
      lambda x: jnp.sum(model.apply({"params": params}, x)[jnp.arange(2), classes])))
  grads = {rule: visualize.input_gradients(m, params, images, objectives)[0]
           for rule, m in by_rule.items()}
  np.testing.assert_allclose(grads["standard"], plain(images), rtol=1e-5, atol=1e-6)
  assert not np.allclose(grads["guided"], grads["standard"])
  assert not np.allclose(grads["deconvnet"], grads["guided"])
  # Per-image targets: image 0's map depends on image 0 only.
  alone = visualize.input_gradients(by_rule["guided"], params, images[:1],
                                    [visualize.class_objective(classes[:1])])[0]
  np.testing.assert_allclose(alone[0], grads["guided"][0], rtol=1e-5, atol=1e-6)


def test_layer_names_follow_the_network_and_accept_both_spellings():
  config = tiny_config()
  model = models.create_model(config.model, 10, cpu.Convolutions())
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  paths = visualize.layer_paths(model, params)
  assert list(paths)[0] == "backbone/stage1_conv1" and list(paths)[-1] == "classifier"
  name, keys = visualize.resolve_layer(paths, "backbone/stage2_conv1")
  assert (name, visualize.resolve_layer(paths, "backbone/stage2_conv1_act")[0]) == (name, name)
  assert visualize.num_units(model, params, keys) == models.scaled_width(192, 0.05)
  with pytest.raises(UserError, match="unknown --layer"):
    visualize.resolve_layer(paths, "backbone/stage9_conv1")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A real sweep over configs/all_cnn_c.py at one rate (tiny, 2 epochs): (root, summary,
  output)."""
  root = str(tmp_path_factory.mktemp("sweep"))
  return root, *run_sweep([ALL_CNN_C], [0.05], root, sweep_flags())


@pytest.fixture(scope="module")
def model_a_run(tmp_path_factory):
  """A tiny Model A run trained in-process (1 epoch, rate 0.01)."""
  workdir = str(tmp_path_factory.mktemp("runs") / "model_a")
  train.train_and_evaluate(tiny_config(model__name="model_a", num_epochs=1,
                                       optimizer__learning_rate=0.01), workdir)
  return workdir


# ----------------------------------------------------------------------------- sweep


@pytest.mark.slow
def test_sweep_trains_a_point_and_picks_its_rate(swept):
  root, summary, out = swept
  workdir = os.path.join(root, "all_cnn_c", "lr0.05")
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["epochs"] == 2 and res["learning_rate"] == 0.05
  assert "running main.py" in out and "[all_cnn_c lr0.05] epoch 2" in out
  with open(os.path.join(workdir, "sweep.log")) as f:
    assert "epoch 2" in f.read()
  with open(os.path.join(workdir, invocations.INVOCATIONS)) as f:
    (record,) = [json.loads(line) for line in f]
  assert record["returncode"] == 0 and " -m allconv_jax.launch --config=" in record["command"]
  assert summary["points"][0]["status"] == "trained" and summary["failed"] == 0
  with open(os.path.join(root, "sweep.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["winners"]["all_cnn_c"]["learning_rate"] == 0.05
  assert summary["winners"]["all_cnn_c"]["best_val_accuracy"] == res["best_val_accuracy"]
  with open(os.path.join(root, "sweep.md")) as f:
    text = f.read()
  assert "| all_cnn_c |" in text and text.strip() in out


@pytest.mark.slow
def test_sweep_skips_a_finished_run(swept):
  root, first, _ = swept
  assert first["points"][0]["status"] == "trained"
  metrics_path = os.path.join(root, "all_cnn_c", "lr0.05", "metrics.jsonl")
  with open(metrics_path) as f:
    before = f.read()
  mtime = os.path.getmtime(metrics_path)
  summary, out = run_sweep(["all_cnn_c"], [0.05], root, sweep_flags())  # a bare config name
  assert "skipped, finished" in out and "running main.py" not in out
  with open(metrics_path) as f:
    assert f.read() == before
  assert os.path.getmtime(metrics_path) == mtime
  assert summary["points"][0]["status"] == "skipped"
  with open(os.path.join(root, "sweep.json")) as f:
    assert json.load(f)["points"][0]["status"] == "skipped"


def fake_point(root, rate, best_val, final_val, test_acc, **config_changes):
  """A finished run's files for configs/all_cnn_c.py (tiny flags) at `rate`, without training."""
  config = cli.config_from_file(ALL_CNN_C, (f"--config.optimizer.learning_rate={rate}",
                                            *sweep_flags()))
  saved = config_lib.to_json(config)
  for key, value in config_changes.items():
    section, name = key.split("__")
    saved[section][name] = value
  workdir = os.path.join(root, "all_cnn_c", f"lr{selection.rate_name(rate)}")
  files.write_json(os.path.join(workdir, "config.json"), saved)
  files.write_json(os.path.join(workdir, "results.json"), {
      "model": "all_cnn_c", "dataset": "cifar10", "epochs": config.num_epochs,
      "learning_rate": rate, "best_val_accuracy": best_val, "best_epoch": 2,
      "final_val_accuracy": final_val, "test_accuracy": test_acc, "test_loss": 1.0,
      "config": saved})


@pytest.mark.slow
def test_sweep_program_winner_on_validation_and_a_failed_point(tmp_path):
  """The sweep as a program: three finished points are skipped, the fourth (another run in its
  folder) fails in its main.py; the winner is chosen on validation, not test, accuracy; the
  exit status is 1 with one error line."""
  root = str(tmp_path)
  fake_point(root, 0.25, 0.30, 0.30, 0.90)
  fake_point(root, 0.1, 0.60, 0.55, 0.20)  # best validation accuracy, worst test accuracy
  fake_point(root, 0.05, 0.50, 0.50, 0.95)
  fake_point(root, 0.01, 0.99, 0.99, 0.99, model__width_multiplier=0.5)  # another run: fails
  proc = helpers.run_tool("sweep", "--configs=all_cnn_c", "--learning_rates=0.25,0.1,0.05,0.01",
                          f"--root={root}", *sweep_flags())
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stdout.count("skipped, finished") == 3
  assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 4 points failed")
  with open(os.path.join(root, "sweep.json")) as f:
    summary = json.load(f)
  assert [p["status"] for p in summary["points"]] == ["skipped", "skipped", "skipped", "failed"]
  assert "another model.width_multiplier" in summary["points"][3]["error"]
  assert summary["winners"]["all_cnn_c"]["learning_rate"] == 0.1
  assert summary["failed"] == 1
  with open(os.path.join(root, "sweep.md")) as f:
    text = f.read()
  assert "| all_cnn_c | 30.00 | **60.00** | 50.00 | failed | 0.1 | 80.00 |" in text
  assert "all_cnn_c lr 0.01: " in text


def test_pick_winners_ties_and_unfinished():
  def rec(net, rate, status, best, final=None):
    return {"network": net, "learning_rate": rate, "status": status, "best_val_accuracy": best,
            "final_val_accuracy": final}

  winners = selection.pick_winners([
      rec("a", 0.25, "failed", None), rec("a", 0.1, "skipped", 0.7, 0.6),
      rec("a", 0.05, "trained", 0.7, 0.65), rec("a", 0.01, "trained", 0.7, 0.65),
      rec("b", 0.1, "failed", None), rec("c", 0.1, "trained", None)])
  assert winners["a"]["learning_rate"] == 0.05  # tie on best -> final -> first listed
  assert winners["b"] is None and winners["c"] is None


def test_sweep_user_errors(tmp_path):
  assert selection.rate_name(0.05) == "0.05" and selection.rate_name(1e-5) == "1e-05"
  with pytest.raises(UserError, match="twice"):
    sweep.parse_rates(["0.1", "0.10"])
  with pytest.raises(UserError, match="positive"):
    sweep.parse_rates(["-1"])
  with pytest.raises(UserError, match="use --learning_rates"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.optimizer.learning_rate=0.2"])
  with pytest.raises(UserError, match="unknown config key 'model.nope'"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.model.nope=1"])
  with pytest.raises(UserError, match="not found"):
    sweep.plan(["configs/nope.py"], [0.1], str(tmp_path), [])
  with pytest.raises(UserError, match="num_epochs"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.num_epochs=0"])
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="exists and is not a folder"):
    sweep.run_sweep([ALL_CNN_C], [0.1], str(tmp_path / "file"), sweep_flags())
  assert os.listdir(tmp_path) == ["file"]  # nothing planned was written


# ----------------------------------------------------------------------------- report


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


# ----------------------------------------------------------------------------- visualize


@pytest.mark.slow
def test_visualize_writes_png_grids(model_a_run, tmp_path):
  out = tmp_path / "vis"
  written = visualize.visualize(model_a_run, str(out), num_images=2,
                                layer="backbone/stage2_conv1", units=(0, 3))
  names = ["predicted_class.png", "backbone_stage2_conv1_unit0.png",
           "backbone_stage2_conv1_unit3.png"]
  assert written == [str(out / n) for n in names]
  assert sorted(os.listdir(out)) == sorted(names)  # PNGs only
  for name in names:
    assert_png(out / name)
  with pytest.raises(UserError, match="out of range"):
    visualize.visualize(model_a_run, str(out), layer="classifier", units=(10,))
  with pytest.raises(UserError, match="unknown --layer"):
    visualize.visualize(model_a_run, str(out), layer="backbone/stage1_conv2")
  with pytest.raises(UserError, match="needs --layer"):
    visualize.visualize(model_a_run, str(out), units=(1,))


def test_visualize_of_a_missing_run_is_one_line(tmp_path):
  with pytest.raises(UserError, match="nope does not exist$"):
    visualize.visualize(str(tmp_path / "nope"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


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


@pytest.mark.slow
def test_evaluate_reproduces_the_test_accuracy_and_classifies_image_files(model_a_run, tmp_path,
                                                                          capsys):
  with open(os.path.join(model_a_run, "results.json")) as f:
    res = json.load(f)
  got = evaluate.evaluate_test_set(model_a_run, "latest", str(tmp_path / "eval"))
  assert got["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-6)
  counts = got["confusion"]
  assert counts.sum() == res["test_images"] and (tmp_path / "eval" / "confusion.png").exists()
  assert "accuracy" in capsys.readouterr().out

  config, model, params = checkpointing.load_run(model_a_run)
  splits = input_pipeline.load_splits(config.data, config.seed)
  paths = []
  for i in range(2):
    path = str(tmp_path / f"image{i}.png")
    Image.fromarray(splits.test_images[i]).save(path)
    paths.append(path)
  ranked = evaluate.classify(model_a_run, "latest", paths)
  stats = preprocessing.load_preprocessing(os.path.join(model_a_run, "preprocessing.npz"))
  direct = evaluate.probabilities(model, params, stats, splits.test_images[:2])
  for best, p in zip(ranked, direct, strict=True):
    assert len(best) == 3 and best[0][0] == splits.class_names[int(p.argmax())]
    assert best[0][1] == pytest.approx(float(p.max()), rel=1e-5)
    assert best[0][1] >= best[1][1] >= best[2][1]
  (tmp_path / "broken.jpg").write_bytes(b"not an image")
  with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
    evaluate.classify(model_a_run, "latest", [str(tmp_path / "broken.jpg")])
