"""Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGKILL on main.py as a real process (exit 130, how
soon, a second one, start-up, a killed lock holder), the bit-identical resume, in-process stops."""

import contextlib
import os
import queue
import signal
import sys
import threading
import time

import jax.numpy as jnp
import pytest

from allconv_jax import cli, files, optim, train
from allconv_jax.errors import UserError
from tests.helpers import ROOT, metrics, popen_main, run, tiny_config, tiny_flags


class Lines:
  """A running main.py whose stdout lines are read as they come, each with its arrival time
  (time.monotonic()), by a thread: a test can wait for a line without blocking forever."""

  def __init__(self, workdir, *flags: str) -> None:
    self.proc = popen_main("--config=configs/all_cnn_c.py", f"--workdir={workdir}", *flags)
    self.seen: list[tuple[float, str]] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._queue.put((time.monotonic(), line.rstrip("\n")))
    self._queue.put(None)

  def wait_for(self, text: str, timeout: float = 240) -> tuple[float, str]:
    """(arrival time, line) of the next line that contains `text`; fails (and kills the
    process) if none comes within `timeout` seconds or the output ends first."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        item = None
      if item is None:
        self.proc.kill()
        out = "\n".join(line for _, line in self.seen)
        raise AssertionError(f"{text!r} never appeared:\n{out}\n{self.proc.stderr.read()}")
      self.seen.append(item)
      if text in item[1]:
        return item

  def finish(self, timeout: float = 120) -> tuple[int, list[tuple[float, str]], str]:
    """Waits for the exit: (exit status, the remaining stdout lines timed, stderr)."""
    err = self.proc.stderr.read()  # until the process closes it: it exits
    self.proc.wait(timeout=timeout)
    rest = []
    while (item := self._queue.get(timeout=timeout)) is not None:
      rest.append(item)
    return self.proc.returncode, rest, err


EPOCHS = 3
STEPS = 16  # per epoch: 512 images, batch 32 (room for a signal to land mid-epoch)
FLAGS = tiny_flags(num_epochs=EPOCHS, log_every_steps=2, data__max_train_examples=512)


def straight_config(**overrides):
  """The config of FLAGS (test_tiny_flags_give_tiny_config checks that they agree)."""
  return tiny_config(num_epochs=EPOCHS, log_every_steps=2, data__max_train_examples=512,
                     **overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run of the configuration the kill tests interrupt (in this process)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(straight_config(), workdir)
  return workdir


def test_tiny_flags_give_tiny_config():
  """main.py with FLAGS runs exactly straight_config(), the config of the in-process
  `straight` run that the kill tests compare with."""
  config = cli.config_from_file(os.path.join(ROOT, "configs", "all_cnn_c.py"), FLAGS)
  assert config.to_dict() == straight_config().to_dict()


# ----------------------------------------------------------------------------- signals to main.py


@pytest.mark.slow
def test_sigterm_then_sigkill_then_rerun_is_bit_identical(straight, tmp_path, capsys):
  """SIGTERM mid-epoch 1 saves a mid-epoch checkpoint and exits 130; the rerun resumes from it
  and is killed (SIGKILL) mid-epoch 2; the third run (in this process) resumes from epoch 1's
  checkpoint; the metrics equal an uninterrupted run's, bit for bit."""
  run1 = Lines(tmp_path, *FLAGS)
  run1.wait_for(f"epoch 1/3 step 2/{STEPS}")  # a chunk's end
  run1.proc.send_signal(signal.SIGTERM)
  code, _, err = run1.finish()
  assert code == 130, err
  assert "run the same command again to resume" in err
  assert err.strip().splitlines()[-1].startswith("interrupted: stopped at step ")
  assert "Traceback" not in err
  steps = files.checkpoint_steps(str(tmp_path))
  assert steps and 2 <= steps[-1] < STEPS, steps  # a mid-epoch checkpoint

  run2 = Lines(tmp_path, *FLAGS)
  _, line = run2.wait_for("resuming from checkpoint step")
  assert line.endswith(f"step {steps[-1]} (epoch 0, mid-epoch)"), line
  run2.wait_for(f"epoch 2/3 step 4/{STEPS}")  # a checkpoint exists for epoch 1
  run2.proc.send_signal(signal.SIGKILL)
  code, _, _ = run2.finish()
  assert code == -signal.SIGKILL
  assert not os.path.exists(tmp_path / "results.json")

  train.train_and_evaluate(straight_config(), str(tmp_path))  # the third run
  assert f"resuming from checkpoint step {STEPS} (epoch 1)" in capsys.readouterr().out
  assert metrics(str(tmp_path)) == metrics(straight)
  assert files.read_metrics(str(tmp_path / "metrics.jsonl"))[-1]["epoch"] == EPOCHS


@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_step_not_the_chunk(tmp_path):
  """SIGINT in the middle of a chunk of 6 steps of half-width All-CNN-C (a step takes a good
  fraction of a second): the CPU loop keeps one step in flight, so the stop is noticed after
  that step, not at the chunk's end (with every step of the chunk dispatched at once, it
  was); it saves a checkpoint there and exits 130. Times are measured in the run's own step
  times (the gaps between its progress lines)."""
  chunk = 6
  run1 = Lines(tmp_path, *tiny_flags(num_epochs=1, model__width_multiplier=0.5,
                                     log_every_steps=chunk, data__max_train_examples=32 * 40))
  t1, _ = run1.wait_for(f"epoch 1/1 step {chunk}/40")  # the first chunk compiled the step
  t2, _ = run1.wait_for(f"epoch 1/1 step {2 * chunk}/40")
  step_time = (t2 - t1) / chunk
  time.sleep(1.5 * step_time)  # into the second step of the third chunk (steps 13 to 18)
  run1.proc.send_signal(signal.SIGINT)
  t_signal = time.monotonic()
  code, rest, err = run1.finish()
  t_exit = time.monotonic()
  assert code == 130, err
  assert err.strip().splitlines()[-1].startswith("interrupted: stopped at step "), err
  stopped = int(err.split("stopped at step ")[1].split()[0])
  # the step running when the signal came (about 14): inside the chunk, not at its end (18)
  assert 2 * chunk < stopped < 3 * chunk, (stopped, rest, err)
  assert files.checkpoint_steps(str(tmp_path)) == [stopped]
  # the loop's answer: the progress line of the cut chunk, then the save
  (t_seen, seen), (_, saving) = rest[:2]
  assert seen.startswith(f"epoch 1/1 step {stopped}/40: loss "), rest
  assert saving == "received a stop signal: saving a checkpoint, then stopping", rest
  timings = (f"step {step_time:.2f}s; the stop was seen {t_seen - t_signal:.2f}s and the "
             f"process exited {t_exit - t_signal:.2f}s after the signal")
  assert t_seen - t_signal < 3 * step_time, timings  # the chunk's rest: 6 step times
  # The save and the interpreter's exit add a few seconds that do not scale with the step
  # (about 4 step times here): a loose bound, against a hang after the save.
  assert t_exit - t_signal < 15 * step_time, timings


def test_a_signal_during_start_up_exits_130_with_one_line(tmp_path):
  """main.py installs its exit before the heavy imports: a SIGINT while they run is one line
  and exit 130, not a KeyboardInterrupt traceback from inside an import."""
  proc = popen_main("--config=configs/all_cnn_c.py", f"--workdir={tmp_path}", *tiny_flags())
  caught = 1 << (signal.SIGTERM - 1)  # python catches SIGINT from the start, SIGTERM only ours
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    with open(f"/proc/{proc.pid}/status") as f:
      mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    if mask & caught:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert err.startswith("interrupted: stopped outside the training loop"), err
  assert len(err.strip().splitlines()) == 1 and out == "", (out, err)
  assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
  code = ("import os, signal, time\nfrom allconv_jax import cli\nwith cli.stop_on_signals() as e:\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n  assert e.is_set()\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(30)\n")
  r = run([sys.executable, "-c", code], timeout=60)
  assert r.returncode == 130 and "interrupted again: exiting at once" in r.stderr, r.stderr


@pytest.mark.slow
def test_second_process_on_a_workdir_is_refused(tmp_path):
  """A run in another process holds the workdir; this process's run is refused with its pid
  (a UserError: main.py prints it as one line, as the bad-config tests check)."""
  other = Lines(tmp_path, *tiny_flags(num_epochs=50))
  try:
    other.wait_for("epoch 1/50 step")
    with pytest.raises(UserError, match=rf"another run \(pid {other.proc.pid}\) is using "
                                        "workdir"):
      train.train_and_evaluate(tiny_config(num_epochs=50), str(tmp_path))
  finally:
    other.proc.kill()
    other.finish()
  with files.lock(str(tmp_path)):  # a killed run leaves no stuck lock
    pass


# ----------------------------------------------------------------------------- in-process stops


def test_a_stop_signal_never_saves_non_finite_weights(finished_run, monkeypatch):
  """Resume a finished run with an infinite rate (a schedule that config checks cannot see)
  and stop it mid-epoch: nothing is saved."""
  workdir = finished_run()
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  monkeypatch.setattr(train, "should_stop", lambda event: True)
  monkeypatch.setattr(optim, "make_schedule", lambda *args: lambda step: jnp.float32(jnp.inf))
  with pytest.raises(train.TrainingDiverged, match="not finite"):
    train.train_and_evaluate(tiny_config(num_epochs=2), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == saved


def test_a_stop_before_the_first_step_after_a_resume_keeps_the_checkpoint(finished_run,
                                                                          monkeypatch, capsys):
  """A stop signal that is already set when the resumed run reaches its first step: nothing
  trained, so no progress line (it once divided by a speed of 0) and no re-save of the
  restored checkpoint; Interrupted at that step."""
  workdir = finished_run()
  before = {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s)))
            for s in files.checkpoint_steps(workdir)}

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
          for s in files.checkpoint_steps(workdir)} == before


def test_interrupt_message_of_a_restart_run_says_to_drop_restart(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "should_stop", lambda event: True)
  with pytest.raises(train.Interrupted) as e:
    train.train_and_evaluate(tiny_config(restart=True), str(tmp_path))
  assert "run the same command without --config.restart=True to resume" in str(e.value)
  with pytest.raises(train.Interrupted) as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert "run the same command again to resume" in str(e.value)
