"""The training loop: end to end runs, the schedule, the optimizer, resume, config checks."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from allconv_jax import cli, cpu, files, optim, train
from allconv_jax import config as config_lib
from allconv_jax.errors import UserError
from tests.cifar_fixtures import make_cifar10
from tests.helpers import ROOT, metrics, run_main, tiny_config, tiny_flags

RECORD_KEYS = {"epoch", "step", "learning_rate", "train_loss", "train_accuracy", "val_loss",
               "val_accuracy", "images_per_sec", "elapsed_sec", "convolutions"}


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def here() -> cpu.Convolutions:
  """The convolutions a tiny_config() run gets on this machine (model.conv_impl=auto)."""
  return cpu.choose("auto", "auto", "float32")


@pytest.fixture
def straight_run(trained_run):
  """A straight 2-epoch tiny run, tiny_config() (shared by several tests: read only)."""
  workdir = trained_run(2)
  return workdir, files.read_results(workdir)


def test_end_to_end_synthetic(straight_run):
  workdir, out = straight_run
  records = files.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["epoch"] for r in records] == [1, 2]
  assert all(set(r) == RECORD_KEYS for r in records)
  assert records[-1]["step"] == 2 * (256 // 32)
  for r in records:
    for key in ("train_accuracy", "val_accuracy"):
      assert 0.0 <= r[key] <= 1.0
  res = results(workdir)
  assert res == out
  for key in ("model", "dataset", "epochs", "test_loss", "test_accuracy", "best_val_accuracy",
              "best_epoch", "wall_time_sec", "config"):
    assert key in res
  assert res["model"] == "all_cnn_c" and res["epochs"] == 2 and res["test_images"] == 64
  assert 0.0 <= res["test_accuracy"] <= 1.0 and math.isfinite(res["test_loss"])
  assert res["best_val_accuracy"] == max(r["val_accuracy"] for r in records)
  assert res["config"]["model"]["width_multiplier"] == 0.05
  convs = here()
  assert [r["convolutions"] for r in records] == [convs.name] * 2
  assert res["convolutions"] == {"backend": convs.backend, "strided_grad": "polyphase",
                                 "dtype": "float32", "reason": convs.reason,
                                 "epochs_by_backend": {convs.name: 2}}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
  assert os.path.exists(os.path.join(workdir, "preprocessing.npz"))


@pytest.mark.slow
def test_learns_the_synthetic_signal(tmp_path):
  out = train.train_and_evaluate(tiny_config(num_epochs=6, model__width_multiplier=0.1,
                                             data__max_train_examples=512,
                                             optimizer__learning_rate=0.01), str(tmp_path))
  records = metrics(str(tmp_path))
  assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5
  assert out["test_accuracy"] > 0.25  # 10 classes: chance is 0.1


def test_finished_run_is_reported_not_retrained(straight_run, capsys):
  workdir, out = straight_run
  before = os.path.getmtime(os.path.join(workdir, "metrics.jsonl"))
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again == out
  assert os.path.getmtime(os.path.join(workdir, "metrics.jsonl")) == before
  assert "is finished" in capsys.readouterr().out


def test_stop_after_epoch_one_then_resume_matches_straight_run(straight_run, finished_run,
                                                              capsys):
  workdir, out = straight_run
  stopped = finished_run(1)  # a 1-epoch run (tiny_config(num_epochs=1)), copied
  assert [r["epoch"] for r in metrics(stopped)] == [1]
  resumed = train.train_and_evaluate(tiny_config(num_epochs=2), stopped)
  log = capsys.readouterr().out
  assert "extending the finished 1-epoch run to 2 epochs" in log
  assert "resuming with changed settings: num_epochs\n" in log
  assert "resuming with changed settings: convolutions" not in log  # the same backend
  assert metrics(stopped) == metrics(workdir)
  assert resumed["test_loss"] == out["test_loss"]
  assert resumed["test_accuracy"] == out["test_accuracy"]


def test_same_seed_same_metrics_other_seed_differs(trained_run, tmp_path, capsys):
  workdir = trained_run(1)  # tiny_config(num_epochs=1), seed 0
  train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path / "a"))
  assert metrics(str(tmp_path / "a")) == metrics(workdir)
  progress = [line for line in capsys.readouterr().out.splitlines() if "images/s, ETA" in line]
  assert [line.split(": loss")[0] for line in progress] == ["epoch 1/1 step 4/8",
                                                            "epoch 1/1 step 8/8"]
  # the first chunk compiled the step: no time left from it; the next one has an h:mm
  assert progress[0].endswith("ETA -:-- (this chunk compiled the step)"), progress[0]
  assert progress[1].split("ETA ")[1] == "0:00", progress[1]  # the last step: none left
  train.train_and_evaluate(tiny_config(num_epochs=1, seed=1), str(tmp_path / "b"))
  assert metrics(str(tmp_path / "b")) != metrics(workdir)


def test_end_to_end_official_files_from_a_config_file(tmp_path, capsys):
  """configs/model_a.py with main.py's overrides (read as main.py reads them) on a folder of
  the official binary files."""
  data = tmp_path / "data"
  make_cifar10(data, "binary", n_train=300, n_test=50)
  workdir = tmp_path / "run"
  config = cli.config_from_file(
      "configs/model_a.py", tiny_flags(model__name="model_a", data__source="local",
                                       data__dir=str(data), data__max_train_examples=0,
                                       data__max_test_examples=0, num_epochs=1))
  out = train.train_and_evaluate(config, str(workdir))
  assert out == results(workdir) and out["model"] == "model_a"
  assert out["train_images"] == 300 - 64 and out["test_images"] == 50
  log = capsys.readouterr().out
  assert "test loss" in log and "images/s" in log


def test_schedule_steps_down_at_the_boundaries():
  config = tiny_config()
  config.optimizer.learning_rate = 0.05
  config.optimizer.boundaries = (2, 4, 5)
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch=10)
  got = [float(schedule(s)) for s in (0, 19, 20, 39, 40, 49, 50, 1000)]
  want = [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005, 0.00005, 0.00005]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_warmup_rises_linearly_then_joins_the_schedule():
  config = tiny_config()
  config.optimizer.learning_rate = 0.1
  config.optimizer.boundaries = (3,)
  config.optimizer.warmup_epochs = 1.0
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch=10)
  got = [float(schedule(s)) for s in (0, 4, 9, 10, 29, 30)]
  np.testing.assert_allclose(got, [0.01, 0.05, 0.1, 0.1, 0.1, 0.01], rtol=1e-5)


@pytest.mark.parametrize("boundaries, warmup, message", [
    ((1.0, 1.05), 0.0, "optimizer.boundaries 1 and 1.05 fall on the same step (8) at 8 steps "
                       "per epoch"),
    ((1e300,), 0.0, "optimizer.boundaries (1e+300 epochs) is beyond the last step"),
    ((200,), 1e9, "optimizer.warmup_epochs (1e+09 epochs) is beyond the last step"),
    ((1e308, 1.5e308), 0.0, "optimizer.boundaries (1.5e+308 epochs) is beyond"),
    ((0.01, 200), 0.0, "optimizer.boundaries 0.01 falls on step 0 at 8 steps per epoch"),
])
def test_a_schedule_that_cannot_be_counted_is_one_line_before_any_compute(tmp_path, boundaries,
                                                                          warmup, message):
  """Valid numbers (validate passes them) that the schedule cannot honour at this run's steps
  per epoch (8): a decay before the first step or a lost one, or steps beyond int32 (no
  OverflowError)."""
  config = tiny_config(optimizer__boundaries=boundaries, optimizer__warmup_epochs=warmup)
  config_lib.validate(config)
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert message in str(e.value) and "\n" not in str(e.value), e.value
  assert not (tmp_path / "run").exists()


def test_sgd_is_pytorch_style_coupled_weight_decay_with_momentum():
  config = tiny_config()
  opt = config.optimizer
  opt.learning_rate, opt.momentum, opt.weight_decay = 0.1, 0.9, 0.001
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optim.make_optimizer(opt, 10, params)
  state = tx.init(params)
  grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
  p, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    d = np.asarray(g) + 0.001 * p  # torch.optim.SGD: d_p = grad + wd * p
    buf = 0.9 * buf + d  #                      buf = momentum * buf + d_p
    p = p - 0.1 * buf  #                        p -= lr * buf
    np.testing.assert_allclose(params["w"], p, rtol=1e-6)


def test_freeze_masks_updates_decay_and_momentum_buffers():
  config = tiny_config()
  config.optimizer.freeze = "backbone"
  params = {"backbone": {"conv": {"kernel": jnp.ones(3)}}, "classifier": {"kernel": jnp.ones(2)}}
  tx = optim.make_optimizer(config.optimizer, 10, params)
  state = tx.init(params)
  leaves = jax.tree_util.tree_leaves(state)
  assert sum(x.size for x in leaves if x.ndim) == 2  # one momentum buffer, the classifier's
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates["backbone"]["conv"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["classifier"]["kernel"]).min()) > 0.0


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.learning_rate=0.0", "'optimizer.learning_rate' must be a finite"),
    ("--config.batch_size=0", "'batch_size' must be >= 1"),
    ("--config.model.width_multiplier=-1.0", "'model.width_multiplier' must be in (0, 8.0]"),
    ("--config.optimizer.boundaries=(250,200)", "'optimizer.boundaries' must be strictly"),
    ("--config.model.nope=1", "unknown config key 'model.nope'"),
    ("--config.num_epochs=ten", "--config.num_epochs=ten"),
    ("--config.data.source=ftp", "data.source"),
    ("--config.model.strided_grad=fast", "'model.strided_grad' must be one of auto, xla"),
    ("--config.model.conv_impl=fast", "'model.conv_impl' must be one of auto, xla, onednn"),
])
def test_bad_config_is_one_line(flag, message):
  """The message of each bad override (read the way main.py and the sweep read it)."""
  with pytest.raises(UserError) as info:
    cli.config_from_file(os.path.join(ROOT, "configs", "all_cnn_c.py"), [flag])
  assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [  # a flag that does not parse; a value out of range
    ("--config.num_epochs=ten", "--config.num_epochs=ten"),
    ("--config.optimizer.learning_rate=0.0", "'optimizer.learning_rate' must be a finite"),
])
def test_bad_config_through_main_is_one_line_before_any_compute(tmp_path, flag, message):
  r = run_main("--config=configs/all_cnn_c.py", f"--workdir={tmp_path / 'w'}", flag)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
  assert not (tmp_path / "w").exists()


def test_validation_rejects_wrong_types_and_unknown_keys():
  config = tiny_config()
  config_lib.validate(config)
  bad = tiny_config()
  with bad.unlocked():
    bad.optimizer.nesterov = True
  with pytest.raises(UserError, match="unknown config key 'optimizer.nesterov'"):
    config_lib.validate(bad)
  as_dict = tiny_config().to_dict()
  as_dict["model"]["final_relu"] = 1  # a config file that builds its own dict
  bad = ml_collections.ConfigDict(as_dict)
  with pytest.raises(UserError, match="'model.final_relu' must be a bool"):
    config_lib.validate(bad)


def test_batch_larger_than_training_set(tmp_path):
  with pytest.raises(UserError, match=r"batch_size \(512\) is larger than the training set"):
    train.train_and_evaluate(tiny_config(batch_size=512), str(tmp_path))
  assert not os.path.exists(tmp_path / "results.json")


def test_per_segment_rates_and_fractional_boundaries():
  """The course project's explicit rates per segment; Caffe's 40k iterations as 204.8 epochs."""
  config = tiny_config()
  config.optimizer.learning_rate = 0.1
  config.optimizer.learning_rates = (0.1, 0.05, 0.01, 0.001)
  config.optimizer.boundaries = (2, 4, 5)
  config_lib.validate(config)
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch=10)
  got = [float(schedule(s)) for s in (0, 19, 20, 39, 40, 49, 50, 1000)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.05, 0.05, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  config.optimizer.learning_rates = ()
  config.optimizer.boundaries = (2.5,)
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch=10)
  assert [float(schedule(s)) for s in (24, 25)] == pytest.approx([0.1, 0.01])


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rates", (0.1, 0.05), "must hold one rate per segment (4 for"),
    ("optimizer.learning_rates", (0.1, 0.05, -1.0, 0.1), "must be positive finite numbers"),
    ("optimizer.learning_rates", (0.2, 0.05, 0.01, 0.001), "is not the first of"),
    ("model.padding", "same", "'model.padding' must be one of symmetric, tf_same"),
    ("model.kernel_init", "xavier", "caffe_xavier"),
    ("model.init_std", 0.0, "'model.init_std' must be a finite number > 0"),
    ("optimizer.boundaries", (200, -1), "must be positive finite epochs"),
    ("optimizer.boundaries", (200, math.inf), "must be positive finite epochs"),
    ("optimizer.warmup_epochs", math.inf, "must be a finite number >= 0"),
])
def test_fidelity_keys_are_checked(key, value, message):
  config = tiny_config(optimizer__learning_rate=0.1, optimizer__boundaries=(200, 250, 300))
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(UserError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def test_time_left_is_hours_and_minutes_rounded_up():
  assert [train.eta(s) for s in (-5, 0, 59, 3600, 3661, 36000)] == [
      "0:00", "0:00", "0:01", "1:00", "1:02", "10:00"]


def test_an_extended_run_keeps_its_rate_history_and_cannot_shrink(finished_run):
  workdir = finished_run()
  out = train.train_and_evaluate(tiny_config(num_epochs=2, optimizer__learning_rate=0.02),
                                 workdir)
  assert out["history"] == [{"epochs": 1, "learning_rate": 0.05},
                            {"epochs": 2, "learning_rate": 0.02}]
  with pytest.raises(UserError, match="finished 2-epoch run, more than num_epochs=1"):
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)


def test_a_resume_on_other_convolutions_is_logged_and_counted(finished_run, capsys):
  """A run resumed where other code runs its convolutions (another machine, oneDNN missing):
  the log says so, and results.json counts the epochs each backend trained."""
  workdir = finished_run()
  now = here().name
  before = "xla" if now != "xla" else "onednn+polyphase"
  path = files.path(workdir, files.METRICS)
  records = files.read_metrics(path)
  assert records[-1]["convolutions"] == now
  records[-1]["convolutions"] = before  # as if epoch 1 had run on the other backend
  files.write_metrics(path, records)
  out = train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  log = capsys.readouterr().out
  assert f"resuming with changed settings: convolutions {before} -> {now} ({here().reason})" \
      in log, log
  assert out["convolutions"]["epochs_by_backend"] == {before: 1, now: 1}
  assert [r["convolutions"] for r in files.read_metrics(path)] == [before, now]


def test_tensorboard_gets_step_and_epoch_scalars(tmp_path, monkeypatch):
  written = []

  class Recorder:
    def __init__(self, workdir, enabled):
      assert enabled and workdir == str(tmp_path)

    def write(self, step, scalars):
      written.append((step, dict(scalars)))

    def close(self):
      pass

  monkeypatch.setattr(train.metrics, "TensorBoard", Recorder)
  train.train_and_evaluate(tiny_config(num_epochs=1, tensorboard=True), str(tmp_path))
  per_step = [s for s, x in written if "running_train_loss" in x]
  per_epoch = [s for s, x in written if "val_accuracy" in x]
  assert per_step == [4, 8] and per_epoch == [8]  # every log_every_steps=4 steps; each epoch


def test_outputs_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_json(str(tmp_path / "a.json"), {"x": 1})
  finally:
    os.umask(old)
  assert (os.stat(tmp_path / "a.json").st_mode & 0o777) == 0o644  # not mkstemp's 0600


def test_metrics_record_the_scheduled_rate_without_float32_noise(tmp_path):
  train.train_and_evaluate(tiny_config(num_epochs=2, optimizer__learning_rate=0.003,
                                       optimizer__boundaries=(1,)), str(tmp_path))
  rates = [r["learning_rate"] for r in metrics(str(tmp_path))]
  assert rates == [0.003, 0.0003]  # float32 would give 0.003000000026077032, 0.00030000001


@pytest.mark.slow
def test_runs_on_the_same_images_share_one_statistics_file(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("ALLCONV_CACHE_DIR", str(tmp_path / "shared"))  # none shared yet
  train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path / "a"))
  assert "fitted the meanstd preprocessing statistics" in capsys.readouterr().out
  out = train.train_and_evaluate(tiny_config(num_epochs=1, seed=0, optimizer__learning_rate=0.02),
                                 str(tmp_path / "b"))
  assert ("shared the meanstd preprocessing statistics of an earlier run on the same images"
          in capsys.readouterr().out)
  a, b = (os.stat(tmp_path / n / "preprocessing.npz") for n in ("a", "b"))
  assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)  # one file, not a copy per run
  train.train_and_evaluate(tiny_config(num_epochs=1, seed=1), str(tmp_path / "c"))
  assert "fitted" in capsys.readouterr().out  # another seed: another split, other images
  assert out["epochs"] == 1


@pytest.mark.slow
def test_the_tensorboard_writer_puts_no_tensorflow_lines_on_stderr(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  code = ("import sys; from allconv_jax import metrics; "
          "t = metrics.TensorBoard(sys.argv[1], True); assert t.writer is not None; "
          "t.write(1, {'x': 1.0}); t.close()")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stderr == ""  # not "oneDNN custom operations are on" (TF 2.21)
  assert os.listdir(tmp_path / "tensorboard")
