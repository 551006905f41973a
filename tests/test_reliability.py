"""Long-run failures, in this process: damaged and non-finite checkpoints, NaN losses, dead
networks, restarts, damaged metrics and config files, the workdir lock, disks and memory."""

import glob
import os
import shutil

import pytest

from allconv_jax import checkpointing, cli, files, train
from allconv_jax import config as config_lib
from allconv_jax.errors import UserError
from tests.helpers import metrics, tiny_config

# ----------------------------------------------------------------------------- checkpoints


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(finished_run, trained_run,
                                                              capfd):
  """A truncated file in the newest step (a kill during a save on a file system that does not
  order its writes): that step is moved aside with one warning line; the run resumes from the
  one before and gives the straight run's numbers."""
  workdir = finished_run(2)
  data = glob.glob(f"{workdir}/checkpoints/16/**/d/*", recursive=True)
  biggest = max(data, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  os.remove(os.path.join(workdir, "results.json"))
  capfd.readouterr()
  train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  out, err = capfd.readouterr()
  warnings = [line for line in err.splitlines() if "checkpoint" in line]
  assert len(warnings) == 1 and "/checkpoints/16 is incomplete or corrupt" in warnings[0], err
  assert warnings[0].startswith("warning: ") and "Traceback" not in err, err
  assert "resuming from checkpoint step 8" in out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "16"))
  assert metrics(workdir) == metrics(trained_run(2))


def test_a_copied_step_folder_under_another_number_is_set_aside_not_used(finished_run,
                                                                         trained_run, capsys):
  """checkpoints/999, a copy of step 8 (its files and checksums intact): its train state is at
  step 8, not 999, so it is moved aside as corrupt and the run resumes from the real step 8."""
  workdir = finished_run(1)
  shutil.copytree(os.path.join(workdir, "checkpoints", "8"),
                  os.path.join(workdir, "checkpoints", "999"))
  assert files.checkpoint_steps(workdir) == [8, 999]
  train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  out, err = capsys.readouterr()
  assert "/checkpoints/999 is incomplete or corrupt (ValueError: its train state is at step 8, " \
      "not 999)" in err, err
  assert "resuming from checkpoint step 8" in out
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["999"]
  assert files.checkpoint_steps(workdir) == [8, 16]
  assert metrics(workdir) == metrics(trained_run(2))


def test_no_usable_checkpoint_is_an_error_not_a_silent_restart(finished_run, capsys):
  workdir = finished_run()
  for f in glob.glob(f"{workdir}/checkpoints/8/**/_METADATA", recursive=True):
    with open(f, "w") as fh:
      fh.write("{not json")
  with pytest.raises(UserError, match="no usable checkpoint .*moved to .*corrupt_checkpoints"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert "warning" not in capsys.readouterr().err  # the error line says it all
  out = train.train_and_evaluate(tiny_config(num_epochs=1, restart=True), workdir)
  assert out["epochs"] == 1 and not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_a_malformed_newest_step_leaves_older_steps_usable(tmp_path):
  """An empty newest step folder is set aside alone; the older good steps are not touched."""
  import jax.numpy as jnp

  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  ckpts.save(8, {"a": jnp.arange(3.0)})
  ckpts.save(16, {"a": jnp.arange(3.0) + 1})
  ckpts.close()
  os.makedirs(tmp_path / "checkpoints" / "24")
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  step, tree = ckpts.restore_newest({"a": jnp.zeros(3)})
  ckpts.close()
  assert step == 16 and tree["a"].tolist() == [1.0, 2.0, 3.0]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "8"]
  assert os.listdir(tmp_path / "corrupt_checkpoints") == ["24"]


def test_non_finite_steps_are_skipped_on_restore(tmp_path):
  import jax.numpy as jnp

  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  ckpts.save(8, {"a": jnp.arange(3.0)})
  ckpts.manager.save(16, args=checkpointing.ocp.args.StandardSave({"a": jnp.full(3, jnp.nan)}))
  ckpts.manager.wait_until_finished()
  step, tree = ckpts.restore_newest({"a": jnp.zeros(3)})
  ckpts.close()
  assert step == 8 and os.listdir(tmp_path / "corrupt_checkpoints") == ["16"]


def test_flipped_bytes_inside_a_checkpoint_are_detected(tmp_path):
  """Silent corruption (bytes flipped in place, same size) is caught by the saved checksums."""
  import jax.numpy as jnp

  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  ckpts.save(8, {"a": jnp.arange(4096.0)})
  ckpts.save(16, {"a": jnp.arange(4096.0) + 1})
  ckpts.close()
  files = glob.glob(f"{tmp_path}/checkpoints/16/**/d/*", recursive=True)
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    data = f.read(64)
    f.seek(os.path.getsize(biggest) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  step, tree = ckpts.restore_newest({"a": jnp.zeros(4096)})
  ckpts.close()
  assert step == 8 and float(tree["a"][5]) == 5.0
  assert os.listdir(tmp_path / "corrupt_checkpoints") == ["16"]


def test_deleting_every_checksum_file_does_not_turn_the_check_off(tmp_path):
  """A step without its checksum file cannot be verified, even when no step has one left: it is
  set aside, never restored unverified."""
  import jax.numpy as jnp

  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  ckpts.save(8, {"a": jnp.arange(4096.0)})
  ckpts.save(16, {"a": jnp.arange(4096.0) + 1})
  ckpts.close()
  os.remove(tmp_path / "checkpoints" / "16" / checkpointing.CHECKSUMS)
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=5)
  step, _ = ckpts.restore_newest({"a": jnp.zeros(4096)})
  assert step == 8 and os.listdir(tmp_path / "corrupt_checkpoints") == ["16"]
  os.remove(tmp_path / "checkpoints" / "8" / checkpointing.CHECKSUMS)
  with pytest.raises(UserError, match="no usable checkpoint"):
    ckpts.restore_newest({"a": jnp.zeros(4096)})
  ckpts.close()


# ----------------------------------------------------------------------------- NaN, dead networks


def test_nan_loss_stops_with_epoch_and_rate_and_keeps_the_good_checkpoint(finished_run):
  workdir = finished_run()
  with pytest.raises(UserError) as e:  # main.py prints it as one "error: ..." line, exit 2
    train.train_and_evaluate(tiny_config(num_epochs=3, optimizer__learning_rate=1e6), workdir)
  assert str(e.value).startswith("training diverged: the loss is nan in epoch 2 at learning "
                                 "rate 1e+06; the last good checkpoint (step 8) is kept"), e.value
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]
  # the failed extension leaves the finished 1-epoch run's results as they were
  assert files.read_json(os.path.join(workdir, "results.json"))["epochs"] == 1


@pytest.mark.slow
def test_dead_network_warning(tmp_path, capsys):
  """Biases of -10: every ReLU is silent, the logits are zero; warned once (epochs 2 and 3
  are checked)."""
  train.train_and_evaluate(tiny_config(num_epochs=3, model__bias_init=-10.0), str(tmp_path))
  out = capsys.readouterr().out
  assert "warning: the network looks dead" in out
  assert "model.final_relu=False" in out and "lower optimizer.learning_rate" in out
  assert out.count("looks dead") == 1


def test_healthy_network_gets_no_dead_warning(finished_run, capsys):
  train.train_and_evaluate(tiny_config(num_epochs=2), finished_run())  # epoch 2 is checked
  out = capsys.readouterr().out
  assert "epoch 2: train loss" in out and "warning:" not in out


@pytest.mark.parametrize("accuracy, warned", [(0.14, True), (0.16, False)])
def test_the_dead_warning_needs_accuracy_below_one_and_a_half_times_chance(
    finished_run, monkeypatch, capsys, accuracy, warned):
  """Ten classes: chance is 0.1, the line 0.15. Every mean the run reads has zero logits and
  `accuracy`; the copied run's first epoch is not looked at, the second is."""
  workdir = finished_run()
  monkeypatch.setattr(train.metrics, "means",
                      lambda sums: {"loss": 2.3, "accuracy": accuracy, "logit_abs": 0.0})
  train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  out = capsys.readouterr().out
  line = ("warning: the network looks dead (zero logits) (train loss 2.3000, accuracy "
          f"{accuracy:.4f}); known remedies: a lower optimizer.learning_rate, "
          "optimizer.warmup_epochs, or model.final_relu=False; dead ReLU channels per layer: ")
  assert (line in out) == warned, out
  assert out.count("warning:") == warned


def test_the_dead_warning_names_dead_class_channels():
  config = tiny_config(model__final_relu=False)
  text = train.dead_warning({"loss": 2.3026, "accuracy": 0.1, "logit_abs": 0.5},
                            {"stage1": 0.5, "classifier": 0.3}, config)
  assert text == ("warning: 30% of the class channels are zero on every image, so their classes "
                  "are never predicted (train loss 2.3026, accuracy 0.1000); known remedies: a "
                  "lower optimizer.learning_rate, optimizer.warmup_epochs; dead ReLU channels "
                  "per layer: stage1 50%, classifier 30%")


# ----------------------------------------------------------------------------- resume and restart


def test_fewer_epochs_than_already_trained_is_refused(finished_run):
  workdir = finished_run(2)
  os.remove(os.path.join(workdir, "results.json"))
  with pytest.raises(UserError, match="has trained 2 epochs already, more than num_epochs=1"):
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)


def test_a_failed_extension_keeps_the_finished_results(finished_run, monkeypatch):
  workdir = finished_run()
  before = files.read_results(workdir)

  def broken(*args, **kwargs):
    raise UserError("data_batch_3 is truncated")

  monkeypatch.setattr(train.input_pipeline, "load_splits", broken)
  with pytest.raises(UserError, match="truncated"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert files.read_results(workdir) == before


def test_restart_deletes_only_a_runs_workdir_and_only_after_the_data_checks(tmp_path,
                                                                            finished_run,
                                                                            monkeypatch):
  stranger = tmp_path / "stranger"  # someone's folder that happens to hold a metrics.jsonl
  stranger.mkdir()
  (stranger / "metrics.jsonl").write_text("mine\n")
  with pytest.raises(UserError, match="not a run's workdir"):
    train.train_and_evaluate(tiny_config(restart=True), str(stranger))
  assert (stranger / "metrics.jsonl").read_text() == "mine\n"
  run = tmp_path / "run"
  finished_run(name="run")
  kept = sorted(os.listdir(run))

  def broken(*args, **kwargs):
    raise UserError("data_batch_3 is truncated")

  monkeypatch.setattr(train.input_pipeline, "load_splits", broken)
  with pytest.raises(UserError, match="truncated"):
    train.train_and_evaluate(tiny_config(num_epochs=1, restart=True), str(run))
  assert sorted(os.listdir(run)) == kept and (run / "results.json").exists()


@pytest.mark.parametrize("key, value", [("source", "local"), ("dir", "/elsewhere")])
def test_resuming_on_other_data_is_refused(finished_run, key, value):
  workdir = finished_run()
  with pytest.raises(UserError, match=f"another data.{key}"):
    files.check_resume(tiny_config(num_epochs=2, **{f"data__{key}": value}), workdir, True)


def test_a_run_that_saved_nothing_does_not_bind_the_corrected_rerun(tmp_path, monkeypatch):
  workdir = str(tmp_path)

  def out_of_memory(*args, **kwargs):
    raise MemoryError("RESOURCE_EXHAUSTED")

  monkeypatch.setattr(train.models, "init_params", out_of_memory)
  with pytest.raises(MemoryError):
    train.train_and_evaluate(tiny_config(model__width_multiplier=4.0), workdir)
  assert os.path.exists(tmp_path / "config.json")
  monkeypatch.undo()
  out = train.train_and_evaluate(tiny_config(num_epochs=1), workdir)
  assert out["width_multiplier"] == 0.05


def test_a_run_that_fails_before_writing_leaves_no_workdir(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise UserError("data_batch_3 is truncated")

  monkeypatch.setattr(train.input_pipeline, "load_splits", broken)
  with pytest.raises(UserError, match="truncated"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # not a folder holding only .lock


@pytest.mark.parametrize("key, value, message", [
    ("model__width_multiplier", float("inf"), "'model.width_multiplier' must be in (0, 8.0]"),
    ("model__width_multiplier", 200.0, "'model.width_multiplier' must be in (0, 8.0]"),
    ("seed", -1, "'seed' must be in [0, 2**63)"),
    ("seed", 2**63, "'seed' must be in [0, 2**63)"),
    ("optimizer__freeze", "backbone/(", "'optimizer.freeze' is not a regular expression"),
    ("data__gcn_scale", float("inf"), "data.gcn_scale must be a finite number > 0"),
    ("data__zca_epsilon", float("nan"), "data.zca_epsilon must be a finite number >= 0"),
    ("data__translate_pixels", 40, "data.translate_pixels must be an integer in [0, 32)"),
    *[(f"optimizer__{key}", float("inf"), f"'optimizer.{key}' must be a finite number")
      for key in ("learning_rate", "weight_decay", "decay_factor")],
    ("optimizer__weight_decay", float("nan"), "'optimizer.weight_decay' must be a finite"),
    ("model__init_std", float("inf"), "'model.init_std' must be a finite number > 0"),
])
def test_out_of_range_settings_are_one_line_errors(key, value, message):
  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config(**{key: value}))
  assert message in str(e.value)


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("text, what", [("[]", "a list"), ("null", "null"), ("3", "a number")])
def test_a_config_json_that_holds_no_config_is_one_line(finished_run, text, what):
  workdir = finished_run()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(text)
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert str(e.value) == (f"{workdir}/config.json holds no config ({what}); delete it or set "
                          "--config.restart=True to start over")
  assert files.checkpoint_steps(workdir) == [8] and files.read_results(workdir)["epochs"] == 1


def test_results_without_config_are_not_overwritten(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(UserError, match="no config.json"):
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  assert (tmp_path / "results.json").read_text() == "{}"


def test_a_malformed_config_json_suggests_restart_only_to_the_trainer(finished_run):
  workdir = finished_run()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(UserError, match="corrupt.*set --config.restart=True"):
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)
  with pytest.raises(UserError) as info:
    checkpointing.load_run(workdir)  # what the tools and transfer read
  assert "corrupt" in str(info.value) and "restart" not in str(info.value)


def test_truncated_metrics_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1, "step": 8}\n{"epoch": 2, "st')
  assert files.read_metrics(str(path)) == [{"epoch": 1, "step": 8}]


def test_one_damaged_metrics_line_keeps_the_records_after_it(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  records = [{"epoch": e, "step": 8 * e, "val_accuracy": 0.1 * e} for e in (1, 2, 3)]
  files.write_metrics(path, records)
  lines = open(path).read().splitlines()
  lines[1] = lines[1][:9] + "\x00garbage"
  open(path, "w").write("\n".join([*lines, "7", '{"epoch": 4, "st'][:6]) + "\n")
  assert files.read_metrics(path) == [records[0], records[2]]


# ----------------------------------------------------------------------------- bad surroundings


def test_a_workdir_under_a_file_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "file" / "run"))
  assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_workdir_is_one_line_and_left_untouched(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # as under chattr +i, even for root
  with pytest.raises(UserError, match=r"cannot write in .* \(Permission denied\)"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_lock_that_is_a_folder_is_one_line(tmp_path):
  (tmp_path / ".lock").mkdir()
  with pytest.raises(UserError, match="cannot open the lock file"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


def test_disk_full_or_a_removed_workdir_is_one_line(tmp_path, monkeypatch, capsys):
  def full(*args, **kwargs):
    raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))

  monkeypatch.setattr(files, "append_metrics", full)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err
  assert err.startswith("error: No space left on device") and "metrics.jsonl" in err


@pytest.mark.parametrize("target", ["checkpoint", "preprocessing"])
def test_disk_full_writing_a_checkpoint_or_the_statistics_is_one_line(tmp_path, monkeypatch,
                                                                       capsys, target):
  def full(*args, **kwargs):
    try:
      raise OSError(28, "No space left on device", str(tmp_path / target))
    except OSError as e:  # as orbax does: its own error around the OSError
      raise RuntimeError("save failed") from e

  if target == "checkpoint":
    monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", full)
  else:
    monkeypatch.setenv("ALLCONV_CACHE_DIR", str(tmp_path / "shared"))  # so it fits and saves
    monkeypatch.setattr(files, "save_preprocessing",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device",
                                                                 str(tmp_path / target))))
  with pytest.raises(SystemExit) as e, cli.user_errors():
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: No space left on device") and "\n" not in err


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
  """XLA's RESOURCE_EXHAUSTED (a RuntimeError) while the run builds its model: one line, exit 2;
  the failed start binds no rerun (test_a_run_that_saved_nothing_does_not_bind_...)."""
  def exhausted(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

  monkeypatch.setattr(train.models, "init_params", exhausted)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err
  assert err.startswith("error: out of memory (RESOURCE_EXHAUSTED): lower batch_size"), err
