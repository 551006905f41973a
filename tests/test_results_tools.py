"""The results tools: backward rules, the learning-rate sweep, the report, the visualizations."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from allconv_jax import (
  cli,
  config_lib,
  evaluate,
  input_pipeline,
  models,
  paper,
  report,
  sweep,
  train,
  transfer,
  visualize,
)
from allconv_jax import workdir as wd
from allconv_jax.errors import UserError
from tests import launcher
from tests.helpers import ROOT, tiny_config, tiny_flags

# One worker: shared sweep and runs; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("results_tools"), pytest.mark.slow]

ALL_CNN_C = os.path.join(ROOT, "configs", "all_cnn_c.py")


def sweep_flags(**overrides):
  """tiny_flags for configs/all_cnn_c.py without the rate (the sweep sets it)."""
  return [f for f in tiny_flags(**overrides) if "optimizer.learning_rate" not in f]


def run_module(module, *args, timeout=240):
  """`python -m allconv_jax.<module> ARGS` from the repository root."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return launcher.run([sys.executable, "-m", f"allconv_jax.{module}", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.size[0] > 50 and img.size[1] > 50


def assert_one_line_error(proc, text):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr


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
  model = models.create_model(config.model, 10)
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
  model = models.create_model(config.model, 10)
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
  """A real sweep over configs/all_cnn_c.py at one rate (tiny, 2 epochs), run as a program."""
  root = str(tmp_path_factory.mktemp("sweep"))
  proc = run_module("sweep", f"--configs={ALL_CNN_C}", "--learning_rates=0.05", f"--root={root}",
                    *sweep_flags())
  return root, proc


@pytest.fixture(scope="module")
def model_a_run(tmp_path_factory):
  """A tiny Model A run trained in-process (1 epoch, rate 0.01)."""
  workdir = str(tmp_path_factory.mktemp("runs") / "model_a")
  train.train_and_evaluate(tiny_config(model__name="model_a", num_epochs=1,
                                       optimizer__learning_rate=0.01), workdir)
  return workdir


# ----------------------------------------------------------------------------- sweep


def test_sweep_trains_a_point_and_picks_its_rate(swept):
  root, proc = swept
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  workdir = os.path.join(root, "all_cnn_c", "lr0.05")
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["epochs"] == 2 and res["learning_rate"] == 0.05
  assert "running main.py" in proc.stdout and "[all_cnn_c lr0.05] epoch 2" in proc.stdout
  assert os.path.exists(os.path.join(workdir, "sweep.log"))
  with open(os.path.join(root, "sweep.json")) as f:
    summary = json.load(f)
  assert summary["points"][0]["status"] == "trained"
  assert summary["winners"]["all_cnn_c"]["learning_rate"] == 0.05
  assert summary["winners"]["all_cnn_c"]["best_val_accuracy"] == res["best_val_accuracy"]
  with open(os.path.join(root, "sweep.md")) as f:
    text = f.read()
  assert "| all_cnn_c |" in text and text.strip() in proc.stdout


def test_sweep_skips_a_finished_run(swept):
  root, first = swept
  assert first.returncode == 0
  metrics_path = os.path.join(root, "all_cnn_c", "lr0.05", "metrics.jsonl")
  with open(metrics_path) as f:
    before = f.read()
  mtime = os.path.getmtime(metrics_path)
  proc = run_module("sweep", "--configs=all_cnn_c", "--learning_rates=0.05", f"--root={root}",
                    *sweep_flags())
  assert proc.returncode == 0, proc.stderr
  assert "skipped, finished" in proc.stdout and "running main.py" not in proc.stdout
  with open(metrics_path) as f:
    assert f.read() == before
  assert os.path.getmtime(metrics_path) == mtime
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
  workdir = os.path.join(root, "all_cnn_c", f"lr{sweep.rate_name(rate)}")
  wd.write_json(os.path.join(workdir, "config.json"), saved)
  wd.write_json(os.path.join(workdir, "results.json"), {
      "model": "all_cnn_c", "dataset": "cifar10", "epochs": config.num_epochs,
      "learning_rate": rate, "best_val_accuracy": best_val, "best_epoch": 2,
      "final_val_accuracy": final_val, "test_accuracy": test_acc, "test_loss": 1.0,
      "config": saved})


def test_sweep_winner_on_validation_and_failed_points(tmp_path):
  root = str(tmp_path)
  fake_point(root, 0.25, 0.30, 0.30, 0.90)
  fake_point(root, 0.1, 0.60, 0.55, 0.20)  # best validation accuracy, worst test accuracy
  fake_point(root, 0.05, 0.50, 0.50, 0.95)
  fake_point(root, 0.01, 0.99, 0.99, 0.99, model__width_multiplier=0.5)  # another run: fails
  proc = run_module("sweep", f"--configs={ALL_CNN_C}", "--learning_rates=0.25,0.1,0.05,0.01",
                    f"--root={root}", *sweep_flags())
  assert proc.returncode == 1
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

  winners = sweep.pick_winners([
      rec("a", 0.25, "failed", None), rec("a", 0.1, "skipped", 0.7, 0.6),
      rec("a", 0.05, "trained", 0.7, 0.65), rec("a", 0.01, "trained", 0.7, 0.65),
      rec("b", 0.1, "failed", None), rec("c", 0.1, "trained", None)])
  assert winners["a"]["learning_rate"] == 0.05  # tie on best -> final -> first listed
  assert winners["b"] is None and winners["c"] is None


def test_sweep_user_errors(tmp_path):
  assert sweep.rate_name(0.05) == "0.05" and sweep.rate_name(1e-5) == "1e-05"
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
  proc = run_module("sweep", "--learning_rates=0.1", f"--root={tmp_path}")
  assert_one_line_error(proc, "--configs is required")
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- report


def test_report_table_and_plots(swept, model_a_run, tmp_path):
  sweep_root, _ = swept
  sweep_run = os.path.join(sweep_root, "all_cnn_c", "lr0.05")
  out = tmp_path / "report"
  proc = run_module("report", f"--workdirs={sweep_run},{model_a_run}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
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
  assert cells[0][2:8] == ["CIFAR-10 (synthetic)", "0.01", "1", "no", "meanstd",
                           f"{100 * res['best_val_accuracy']:.2f}"]
  assert cells[0][8] == f"{100 * (1 - res['test_accuracy']):.2f}"
  assert cells[0][9:] == ["—", "—"]  # synthetic data: no paper or course reference
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert len(pngs) == 3 and report.COMPARISON_PNG in pngs
  for name in pngs:
    assert_png(out / name)
    assert f"]({name})" in text


@pytest.mark.parametrize("n", [3, 14, 30, 90])
def test_comparison_plot_of_many_runs_has_distinct_lines_and_a_legend_beside_the_axes(n):
  records = [{"epoch": e, "val_accuracy": 0.1 + 0.01 * e} for e in (1, 2, 3)]
  runs = [report.Run(f"net/lr{i}", "", {"model": "net"}, records) for i in range(n)]
  fig = report.comparison_figure(runs)
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
    report.plt.close(fig)


def test_report_finds_runs_below_a_root(swept, tmp_path):
  sweep_root, _ = swept
  runs = report.find_runs(sweep_root)
  assert runs == [os.path.join(sweep_root, "all_cnn_c", "lr0.05")]
  assert report.labels_for(runs, sweep_root) == ["all_cnn_c/lr0.05"]
  assert report.plot_name("all_cnn_c/lr0.05") == "all_cnn_c__lr0.05.png"
  proc = run_module("report", f"--root={tmp_path}", f"--out={tmp_path / 'out'}")
  assert_one_line_error(proc, "no runs found")


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
  assert row[-2:] == list(want) and row[8] == "10.00"


def test_paper_numbers_cover_the_twelve_networks():
  assert len(paper.NETWORKS) == 12 and set(paper.NETWORKS) == set(models.MODEL_NAMES)
  assert all(paper.paper_test_error(n, "cifar10", False) for n in paper.NETWORKS)
  assert paper.paper_test_error("all_cnn_c", "cifar10", False) == 9.08
  assert paper.course_accuracy("all_cnn_c", "cifar100", False) is None
  assert paper.course_accuracy("all_cnn_c", "cifar10", False) == 83.28
  assert len(paper.COURSE_CIFAR10) == 8 and set(paper.COURSE_CIFAR10) <= set(paper.NETWORKS)


# ----------------------------------------------------------------------------- visualize


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


def test_visualize_cli_user_error(tmp_path):
  proc = run_module("visualize", f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
  assert_one_line_error(proc, "does not exist")


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

  monkeypatch.setattr(report.wd, "write_text", refuse)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    report.write_report(report.load_runs([model_a_run]), str(tmp_path / "out"))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: Permission denied") and "\n" not in err


def test_evaluate_reproduces_the_test_accuracy_and_classifies_image_files(model_a_run, tmp_path,
                                                                          capsys):
  with open(os.path.join(model_a_run, "results.json")) as f:
    res = json.load(f)
  got = evaluate.evaluate_test_set(model_a_run, "latest", str(tmp_path / "eval"))
  assert got["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-6)
  counts = got["confusion"]
  assert counts.sum() == res["test_images"] and (tmp_path / "eval" / "confusion.png").exists()
  assert "accuracy" in capsys.readouterr().out

  config, model, params = transfer.restore_run(model_a_run)
  splits = input_pipeline.load_splits(config.data, config.seed)
  paths = []
  for i in range(2):
    path = str(tmp_path / f"image{i}.png")
    Image.fromarray(splits.test_images[i]).save(path)
    paths.append(path)
  ranked = evaluate.classify(model_a_run, "latest", paths)
  stats = input_pipeline.load_preprocessing(os.path.join(model_a_run, "preprocessing.npz"))
  direct = evaluate.probabilities(model, params, stats, splits.test_images[:2])
  for best, p in zip(ranked, direct, strict=True):
    assert len(best) == 3 and best[0][0] == splits.class_names[int(p.argmax())]
    assert best[0][1] == pytest.approx(float(p.max()), rel=1e-5)
    assert best[0][1] >= best[1][1] >= best[2][1]
  (tmp_path / "broken.jpg").write_bytes(b"not an image")
  with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
    evaluate.classify(model_a_run, "latest", [str(tmp_path / "broken.jpg")])
