"""A run's workdir: one run at a time, leftovers of a killed run cleaned, resumes refused when
a knob that changes the result differs (issue 24, runs)."""

import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

import examples_support as support
import mnist_lenet
from common import checkpoint
from common import pipeline
from common.cli import UserError
from ec2t_jax import models

_TINY = ("--mock_data=64", "--nodownload", "--num_devices=1", "--batch_size=16",
         "--eval_batch_size=32", "--steps_per_epoch=2", "--fp_epochs=1", "--phase1_epochs=1",
         "--phase2_epochs=1", "--model=lenet300100", "--noprogress")


def _config(**kwargs):
  return pipeline.PipelineConfig(**{"workdir": "unused", "dataset": "mnist",
                                    "model_name": "lenet5", "model": models.LeNet5(),
                                    "ec2t_mode": "chain", **kwargs})


# ------------------------------------------------------------------------------ fingerprint


@pytest.mark.parametrize("flag, value", [
    ("gamma", 0.05), ("method", "twn"), ("method_options", "centroid_update_scale=1.0"),
    ("bits_per_weight", 1.0), ("learning_rate", 3e-3), ("ec2t_mode", "reference"),
    ("phase1_epochs", 3)])
def test_the_method_fingerprint_holds_every_knob_that_changes_the_result(flag, value):
  _, before = pipeline.fingerprints(_config(), 10)
  run, after = pipeline.fingerprints(_config(**{flag: value}), 10)
  assert before != after
  assert pipeline.fingerprints(_config(), 10)[0] == run  # the full-precision phase's is the same


def test_the_fingerprint_holds_the_methods_options_with_their_library_defaults():
  _, facts = pipeline.fingerprints(_config(method="inq"), 10)
  assert {k: v for k, v in facts.items() if k.startswith("method_options.")} == {
      "method_options.bits": 5, "method_options.portions": [0.3, 0.6, 0.8, 1.0],
      "method_options.steps_per_stage": 0, "method_options.restart": True,
      "method_options.solver": "inner"}
  _, paper = pipeline.fingerprints(_config(gamma=0.1), 10)
  assert paper["gamma"] == 0.1 and "method_options.gamma" not in paper


def _save_phase(workdir, phase, facts):
  ckpts = checkpoint.PhaseCheckpoints(workdir / "checkpoints" / phase, {**facts, "phase": phase})
  try:
    ckpts.save("latest", 1, {"w": jnp.zeros(2)}, {"done": False})
  finally:
    ckpts.close()


def test_resuming_with_another_gamma_is_refused_naming_it(tmp_path):
  run, facts = pipeline.fingerprints(_config(gamma=0.35), 10)
  _save_phase(tmp_path, "fp", run)
  _save_phase(tmp_path, "ec2t_phase1", facts)
  other_run, other = pipeline.fingerprints(_config(gamma=0.05), 10)
  with pytest.raises(UserError, match=r"ec2t_phase1.*gamma.*0\.35.*0\.05"):
    checkpoint.check_workdir(tmp_path, other_run, True, pipeline.PHASES, other)
  checkpoint.check_workdir(tmp_path, run, True, pipeline.PHASES, facts)  # same flags: fine


# ------------------------------------------------------------------------------ lock


def test_the_lock_holds_this_processs_pid_is_reentrant_and_released_at_the_end(tmp_path):
  with checkpoint.workdir_lock(tmp_path):
    assert (tmp_path / checkpoint.LOCK_FILE).read_text().strip() == str(os.getpid())
    with checkpoint.workdir_lock(tmp_path):  # the script's main and the pipeline: one run
      pass
  probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
      import fcntl
      f = open({str(tmp_path / checkpoint.LOCK_FILE)!r}, "a+")
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)""")], capture_output=True, check=False)
  assert probe.returncode == 0  # released: another process takes it


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  (tmp_path / checkpoint.LOCK_FILE).write_text(f"{dead}\n")
  with checkpoint.workdir_lock(tmp_path):
    assert (tmp_path / checkpoint.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_lock_held_by_another_live_process_refuses_the_run(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import fcntl, os, sys, time
      f = open({str(tmp_path / checkpoint.LOCK_FILE)!r}, "a+")
      fcntl.flock(f, fcntl.LOCK_EX)
      f.write(str(os.getpid())); f.flush()
      print("held", flush=True)
      time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
      support.run_in_process(mnist_lenet, *_TINY, f"--workdir={tmp_path}")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert not (tmp_path / "metrics.jsonl").exists()  # refused before writing anything


# ------------------------------------------------------------------------------ leftovers


def test_the_temporaries_of_a_killed_run_are_removed_when_the_next_run_starts(tmp_path):
  leftovers = [tmp_path / "metrics.jsonl.tmp4242", tmp_path / ".model.ec2t.k2j3h4.tmp",
               tmp_path / "checkpoints" / "fp" / "latest" / "3.orbax-checkpoint-tmp-17" / "x"]
  kept = [tmp_path / "metrics.jsonl", tmp_path / "model.ec2t",
          tmp_path / "checkpoints" / "fp" / "latest" / "2" / "x"]
  for path in leftovers + kept:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
  with checkpoint.workdir_lock(tmp_path):
    pass
  assert not any(p.exists() for p in leftovers[:2])
  assert not leftovers[2].parent.exists()
  assert all(p.exists() for p in kept)


# ------------------------------------------------------------------------------ whole runs


@pytest.mark.slow  # two tiny example runs (~20 s)
def test_resume_with_another_gamma_or_method_is_refused_end_to_end(tmp_path):
  from common.training import StopRequested  # pylint: disable=g-import-not-at-top
  with pytest.raises(StopRequested):
    support.run_in_process(mnist_lenet, *_TINY, "--gamma=0.35", "--stop_after_steps=3",
                           f"--workdir={tmp_path}")
  for flag in ("--gamma=0.05", "--method=twn"):
    with pytest.raises(UserError, match=f"{flag[2:].split('=')[0]}: checkpoint"):
      support.run_in_process(mnist_lenet, *_TINY, "--gamma=0.35", flag, "--resume",
                             f"--workdir={tmp_path}")
  results = support.run_in_process(mnist_lenet, *_TINY, "--gamma=0.35", "--resume",
                                   f"--workdir={tmp_path}")
  assert results["gamma"] == 0.35


@pytest.mark.slow  # a script in a subprocess (~10 s)
def test_the_script_on_a_workdir_in_use_prints_one_line_and_exits_2(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(support.REPO)}
  with checkpoint.workdir_lock(tmp_path):
    done = subprocess.run([sys.executable, str(support.REPO / "examples" / "mnist_lenet.py"),
                           *_TINY, f"--workdir={tmp_path}"], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: {tmp_path} is in use by process {os.getpid()} (lock "
      f"{tmp_path / checkpoint.LOCK_FILE}); wait for that run to end or choose another --workdir"]


def test_a_user_error_ends_the_process_in_one_line_even_with_threads_left(tmp_path):
  script = tmp_path / "refuses.py"
  script.write_text(textwrap.dedent("""
      import threading, time
      from absl import app
      from common.cli import UserError, report_user_errors

      def late():  # a library thread that would fail at interpreter shutdown
        time.sleep(20)
        raise RuntimeError("Event loop is closed")

      def main(argv):
        threading.Thread(target=late).start()
        raise UserError("checkpoint x is corrupt")

      app.run(report_user_errors(main))
  """))
  env = {**os.environ, "PYTHONPATH": str(support.EXAMPLES)}
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                        timeout=15, check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == ["error: checkpoint x is corrupt"]
