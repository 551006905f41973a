"""Long-run failures: kills, corrupt checkpoints, NaNs, dead networks, concurrent runs."""

import contextlib
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from allconv_jax import benchmark, checkpointing, cli, train, transfer
from allconv_jax import workdir as wd
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError
from tests import launcher
from tests.helpers import ROOT, metrics, run_main, tiny_config, tiny_flags


def start_main(workdir, *flags, fresh=False):
  """Starts main.py in the background; stdout is line-buffered into a pipe. `fresh`: in a new
  interpreter that still has its imports ahead, not forked from the tests' fork server."""
  return launcher.popen(
      [sys.executable, "main.py", "--config=configs/all_cnn_c.py", f"--workdir={workdir}",
       *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONUNBUFFERED": "1"}, fresh=fresh)


def wait_for_line(proc, text, timeout=240):
  """Reads the process's stdout until a line contains `text`."""
  deadline = time.time() + timeout
  seen = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if text in line:
      return seen
  proc.kill()
  raise AssertionError(f"{text!r} never appeared:\n{''.join(seen)}\n{proc.stderr.read()}")


EPOCHS = 3
FLAGS = tiny_flags(num_epochs=EPOCHS, log_every_steps=2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run of the configuration the kill tests interrupt (in this process: the
  same config as FLAGS through main.py, checked by test_tiny_flags_give_tiny_config)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(tiny_config(num_epochs=EPOCHS, log_every_steps=2), workdir)
  return workdir


@pytest.mark.slow
def test_sigterm_then_sigkill_then_rerun_is_bit_identical(straight, tmp_path, capsys):
  """SIGTERM mid-epoch 1 saves a mid-epoch checkpoint and exits 130; the rerun resumes from it
  and is killed (SIGKILL) mid-epoch 2; the third run (in this process) resumes from epoch 1's
  checkpoint; the metrics equal an uninterrupted run's."""
  proc = start_main(tmp_path, *FLAGS)
  wait_for_line(proc, "epoch 1/3 step 2/8")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "run the same command again to resume" in err
  assert err.strip().splitlines()[-1].startswith("interrupted: stopped at step ")
  assert "Traceback" not in err
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps and steps[-1] % 8 != 0  # a mid-epoch checkpoint

  proc = start_main(tmp_path, *FLAGS)
  seen = wait_for_line(proc, "epoch 2/3 step 4/8")  # a checkpoint exists for epoch 1
  assert any("mid-epoch" in line for line in seen), seen
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert not os.path.exists(tmp_path / "results.json")

  # The third run, in this process (the same config as FLAGS: test_tiny_flags_give_tiny_config).
  train.train_and_evaluate(tiny_config(num_epochs=EPOCHS, log_every_steps=2), str(tmp_path))
  assert "resuming from checkpoint step 8" in capsys.readouterr().out
  assert metrics(str(tmp_path)) == metrics(straight)
  assert wd.read_metrics(str(tmp_path / "metrics.jsonl"))[-1]["epoch"] == EPOCHS


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(finished_run, trained_run):
  workdir = finished_run(2)
  files = [f for f in glob.glob(f"{workdir}/checkpoints/16/**/d/*", recursive=True)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  os.remove(os.path.join(workdir, "results.json"))
  r = run_main("--config=configs/all_cnn_c.py", f"--workdir={workdir}",
               *tiny_flags(num_epochs=2))
  assert r.returncode == 0, r.stderr
  assert "checkpoint" in r.stderr and "/checkpoints/16 is incomplete or corrupt" in r.stderr
  # one warning line, no traceback (orbax once added "Event loop is closed" pages here)
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
  assert "resuming from checkpoint step 8" in r.stdout
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "16"))
  assert metrics(workdir) == metrics(trained_run(2))


def test_no_usable_checkpoint_is_an_error_not_a_silent_restart(finished_run):
  workdir = finished_run()
  for f in glob.glob(f"{workdir}/checkpoints/8/**/_METADATA", recursive=True):
    with open(f, "w") as fh:
      fh.write("{not json")
  with pytest.raises(UserError, match="no usable checkpoint"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  out = train.train_and_evaluate(tiny_config(num_epochs=1, restart=True), workdir)
  assert out["epochs"] == 1 and not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_nan_loss_stops_with_epoch_and_rate_and_keeps_the_good_checkpoint(finished_run):
  workdir = finished_run()
  with pytest.raises(UserError) as e:  # main.py prints it as one "error: ..." line, exit 2
    train.train_and_evaluate(tiny_config(num_epochs=3, optimizer__learning_rate=1e6), workdir)
  assert str(e.value).startswith("training diverged: the loss is nan in epoch 2 at learning "
                                 "rate 1e+06; the last good checkpoint (step 8) is kept"), e.value
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]
  # the failed extension leaves the finished 1-epoch run's results as they were
  assert wd.read_json(os.path.join(workdir, "results.json"))["epochs"] == 1


def test_dead_network_warning(tmp_path, capsys):
  train.train_and_evaluate(tiny_config(num_epochs=3, model__bias_init=-10.0), str(tmp_path))
  out = capsys.readouterr().out
  assert "warning: the network looks dead" in out
  assert "model.final_relu=False" in out and "lower optimizer.learning_rate" in out
  assert out.count("looks dead") == 1


def test_healthy_network_gets_no_dead_warning(tmp_path, capsys):
  train.train_and_evaluate(tiny_config(num_epochs=3), str(tmp_path))
  assert "looks dead" not in capsys.readouterr().out


@pytest.mark.parametrize("override, key", [
    ({"model__name": "model_a"}, "model.name"),
    ({"model__width_multiplier": 0.1}, "model.width_multiplier"),
    ({"data__dataset": "cifar100"}, "data.dataset"),
    ({"data__preprocessing": "gcn_zca"}, "data.preprocessing"),
    ({"optimizer__freeze": "backbone/"}, "optimizer.freeze"),
    ({"optimizer__momentum": 0.0}, "optimizer.momentum"),
])
def test_resume_with_an_invalidating_change_is_refused(finished_run, override, key):
  workdir = finished_run()
  with pytest.raises(UserError, match=f"holds a run with another {key}"):
    train.train_and_evaluate(tiny_config(num_epochs=2, **override), workdir)


def test_results_without_config_are_not_overwritten(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(UserError, match="no config.json"):
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  assert (tmp_path / "results.json").read_text() == "{}"


def test_second_process_on_a_workdir_is_refused(tmp_path):
  """A run in another process holds the workdir; this process's run is refused with its pid
  (a UserError: main.py prints it as one line, as the bad-config tests check)."""
  proc = start_main(tmp_path, *tiny_flags(num_epochs=50))
  try:
    wait_for_line(proc, "epoch 1/50 step")
    with pytest.raises(UserError, match=rf"another run \(pid {proc.pid}\) is using workdir"):
      train.train_and_evaluate(tiny_config(num_epochs=50), str(tmp_path))
  finally:
    proc.kill()
    proc.wait()
  with wd.lock(str(tmp_path)):  # a killed run leaves no stuck lock
    pass


def test_truncated_metrics_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1, "step": 8}\n{"epoch": 2, "st')
  assert wd.read_metrics(str(path)) == [{"epoch": 1, "step": 8}]


def test_fewer_epochs_than_already_trained_is_refused(finished_run):
  workdir = finished_run(2)
  os.remove(os.path.join(workdir, "results.json"))
  with pytest.raises(UserError, match="has trained 2 epochs already, more than num_epochs=1"):
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)


# ----------------------------------------------------------------------------- checkpoints


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


def test_a_stop_signal_never_saves_non_finite_weights(finished_run, monkeypatch):
  """Resume a finished run with learning_rate=inf and stop it mid-epoch: nothing is saved."""
  workdir = finished_run()
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  monkeypatch.setattr(train, "should_stop", lambda event: True)
  with pytest.raises(train.TrainingDiverged, match="not finite"):
    train.train_and_evaluate(tiny_config(num_epochs=2, optimizer__learning_rate=float("inf")),
                             workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == saved


def test_a_stop_before_the_first_step_after_a_resume_keeps_the_checkpoint(finished_run,
                                                                          monkeypatch, capsys):
  """A stop signal that is already set when the resumed run reaches its first step: nothing
  trained, so no progress line (it once divided by a speed of 0) and no re-save of the
  restored checkpoint; Interrupted at that step."""
  workdir = finished_run()
  before = {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s)))
            for s in wd.checkpoint_steps(workdir)}

  @contextlib.contextmanager
  def stopped():
    event = threading.Event()
    event.set()
    yield event

  monkeypatch.setattr(train.cli, "stop_on_signals", stopped)
  with pytest.raises(train.Interrupted, match="step 8"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert "checkpoint step 8 is current; stopping" in capsys.readouterr().out
  assert {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s)))
          for s in wd.checkpoint_steps(workdir)} == before


def test_a_failed_extension_keeps_the_finished_results(finished_run, monkeypatch):
  workdir = finished_run()
  before = wd.read_results(workdir)

  def broken(*args, **kwargs):
    raise UserError("data_batch_3 is truncated")

  monkeypatch.setattr(train.input_pipeline, "load_splits", broken)
  with pytest.raises(UserError, match="truncated"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert wd.read_results(workdir) == before


def test_interrupt_message_of_a_restart_run_says_to_drop_restart(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "should_stop", lambda event: True)
  with pytest.raises(train.Interrupted) as e:
    train.train_and_evaluate(tiny_config(restart=True), str(tmp_path))
  assert "run the same command without --config.restart=True to resume" in str(e.value)
  with pytest.raises(train.Interrupted) as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert "run the same command again to resume" in str(e.value)


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


def test_one_damaged_metrics_line_keeps_the_records_after_it(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  records = [{"epoch": e, "step": 8 * e, "val_accuracy": 0.1 * e} for e in (1, 2, 3)]
  wd.write_metrics(path, records)
  lines = open(path).read().splitlines()
  lines[1] = lines[1][:9] + "\x00garbage"
  open(path, "w").write("\n".join([*lines, "7", '{"epoch": 4, "st'][:6]) + "\n")
  assert wd.read_metrics(path) == [records[0], records[2]]


@pytest.mark.parametrize("key, value", [("source", "local"), ("dir", "/elsewhere")])
def test_resuming_on_other_data_is_refused(finished_run, key, value):
  workdir = finished_run()
  with pytest.raises(UserError, match=f"another data.{key}"):
    train.check_resumable(tiny_config(num_epochs=2, **{f"data__{key}": value}), workdir)


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


@pytest.mark.parametrize("key, value, message", [
    ("model__width_multiplier", float("inf"), "'model.width_multiplier' must be in (0, 8.0]"),
    ("model__width_multiplier", 200.0, "'model.width_multiplier' must be in (0, 8.0]"),
    ("seed", -1, "'seed' must be in [0, 2**63)"),
    ("seed", 2**63, "'seed' must be in [0, 2**63)"),
    ("optimizer__freeze", "backbone/(", "'optimizer.freeze' is not a regular expression"),
    ("data__gcn_scale", float("inf"), "data.gcn_scale must be a finite number > 0"),
    ("data__zca_epsilon", float("nan"), "data.zca_epsilon must be a finite number >= 0"),
    ("data__translate_pixels", 40, "data.translate_pixels must be an integer in [0, 32)"),
])
def test_out_of_range_settings_are_one_line_errors(key, value, message):
  from allconv_jax import config_lib

  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config(**{key: value}))
  assert message in str(e.value)


# ----------------------------------------------------------------------------- bad surroundings


def test_a_workdir_under_a_file_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "file" / "run"))
  assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_workdir_is_one_line_and_left_untouched(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(wd.tempfile, "mkstemp", refuse)  # as under chattr +i, even for root
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

  monkeypatch.setattr(wd, "append_metrics", full)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err
  assert err.startswith("error: No space left on device") and "metrics.jsonl" in err


def test_a_malformed_config_json_suggests_restart_only_to_the_trainer(finished_run):
  workdir = finished_run()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(UserError, match="corrupt.*set --config.restart=True"):
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)
  with pytest.raises(UserError) as info:
    transfer.restore_run(workdir)  # what visualize and transfer read
  assert "corrupt" in str(info.value) and "restart" not in str(info.value)


def test_out_of_memory_is_one_line(monkeypatch, capsys):
  def exhausted(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

  monkeypatch.setattr(benchmark, "prepare", exhausted)
  with pytest.raises(SystemExit) as e, cli.user_errors():
    benchmark.benchmark(tiny_config(), 1, 1, 1)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: out of memory") and "\n" not in err


# ----------------------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_a_stop_signal_acts_after_the_current_step_not_the_chunk(tmp_path):
  # Chunks of 256 steps: before, a stop waited for the chunk's end (step 512); now the CPU loop
  # looks at the signal after every step.
  flags = tiny_flags(num_epochs=1, batch_size=2, log_every_steps=256,
                     data__max_train_examples=4096)
  proc = start_main(str(tmp_path), *flags)
  wait_for_line(proc, "step 256/2048")
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  step = int(err.split("stopped at step ")[1].split()[0])
  assert 256 <= step < 400, (step, out, err)
  proc = start_main(str(tmp_path), *flags)  # resumes there (stopped again: no need to finish)
  wait_for_line(proc, f"resuming from checkpoint step {step}")
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err


def test_a_signal_during_start_up_exits_130_with_one_line(tmp_path):
  proc = start_main(str(tmp_path), *tiny_flags(), fresh=True)
  time.sleep(0.3)  # still importing
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert err.startswith("interrupted:") and len(err.strip().splitlines()) == 1, err


def test_a_second_signal_exits_at_once():
  code = ("import os, signal, time\nfrom allconv_jax import cli\nwith cli.stop_on_signals() as e:\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n  assert e.is_set()\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(30)\n")
  r = launcher.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 130 and "interrupted again: exiting at once" in r.stderr, r.stderr


def test_a_run_that_fails_before_writing_leaves_no_workdir(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise UserError("data_batch_3 is truncated")

  monkeypatch.setattr(train.input_pipeline, "load_splits", broken)
  with pytest.raises(UserError, match="truncated"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # not a folder holding only .lock


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
    monkeypatch.setattr(preprocessing, "save_preprocessing",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device",
                                                                 str(tmp_path / target))))
  with pytest.raises(SystemExit) as e, cli.user_errors():
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: No space left on device") and "\n" not in err


def test_tiny_flags_give_tiny_config():
  """main.py with FLAGS runs exactly tiny_config(num_epochs=3, log_every_steps=2), the config
  of the in-process `straight` run that the kill tests compare with."""
  config = cli.config_from_file(os.path.join(ROOT, "configs", "all_cnn_c.py"), FLAGS)
  assert config.to_dict() == tiny_config(num_epochs=EPOCHS, log_every_steps=2).to_dict()
