"""A run killed at any instant resumes (--resume) to exactly the uninterrupted run.

Kill points are named writes of the run (``<phase>/<step>/record|latest|best``,
:mod:`common.kill_points`, a test hook). The default test kills a tiny
pretraining-only run in-process at two points: in the middle of its epoch
(whose train metrics were averaged over the resumed steps only) and between its
``latest`` and ``best`` saves (which made every later resume fail with orbax's
StepAlreadyExistsError). The slow sweep kills real processes with SIGKILL at
every point of a whole job, one after the other, for EC2T and INQ. "Exactly"
means bitwise: every array of every checkpoint, every metrics record (but its
timing), the report (but its timings) and the exported file.
"""

import json
import signal

import jax
import numpy as np
import pytest

import examples_support as support
import mnist_lenet
from common import checkpoint
from common import kill_points
from common import metrics
from common import training

TINY = ("--mock_data=64", "--nodownload", "--num_devices=1", "--batch_size=16",
        "--eval_batch_size=32", "--steps_per_epoch=2", "--fp_epochs=1", "--phase1_epochs=1",
        "--phase2_epochs=1", "--checkpoint_every_steps=1", "--model=lenet300100", "--resume")
METHOD_FLAGS = {"ec2t": (), "inq": ("--method=inq", "--method_options=bits=5,portions=0.5/1"),
                "fp_only": ("--phase1_epochs=0",)}
PHASES = ("fp", "ec2t_phase1", "ec2t_phase2")


class _Killed(BaseException):
  """Stands in for SIGKILL in-process: not an Exception, so nothing in the run catches it."""


def _raise(point):
  raise _Killed(point)


def _run_to_completion_or_kill(workdir, method, monkeypatch, point=None):
  monkeypatch.setattr(kill_points, "_kill", _raise)
  if point is None:
    monkeypatch.delenv(kill_points.KILL_AT, raising=False)
  else:
    monkeypatch.setenv(kill_points.KILL_AT, point)
  return support.run_in_process(mnist_lenet, *TINY, *METHOD_FLAGS[method], f"--workdir={workdir}")


def _without_timings(value):
  if isinstance(value, dict):
    return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
  if isinstance(value, list):
    return [_without_timings(v) for v in value]
  return value


def _outcome(workdir, method_ran=True):
  """Everything a run leaves that must not depend on where it was killed."""
  states = {}
  for phase in PHASES:
    for which in ("latest", "best"):
      folder = workdir / "checkpoints" / phase / which
      if not folder.parent.exists():
        continue
      steps = sorted(int(d.name) for d in folder.iterdir() if d.name.isdigit())
      states[f"{phase}/{which}"] = (steps[-1], checkpoint.read_state(folder / str(steps[-1])))
  return {"states": states,
          "metrics": _without_timings(metrics.read_jsonl(workdir / "metrics.jsonl")),
          "report": _without_timings(json.loads((workdir / "report.json").read_text())),
          "export": (workdir / "model.ec2t").read_bytes() if method_ran else None}


def _assert_same_outcome(resumed, uninterrupted):
  assert resumed["metrics"] == uninterrupted["metrics"]
  assert resumed["report"] == uninterrupted["report"]
  assert resumed["export"] == uninterrupted["export"]
  assert resumed["states"].keys() == uninterrupted["states"].keys()
  for name, (step, state) in uninterrupted["states"].items():
    assert resumed["states"][name][0] == step, name
    jax.tree.map(np.testing.assert_array_equal, resumed["states"][name][1], state)


def test_resume_after_kills_mid_epoch_and_between_latest_and_best_equals_uninterrupted(
    tmp_path, monkeypatch):
  _run_to_completion_or_kill(tmp_path / "uninterrupted", "fp_only", monkeypatch)
  workdir = tmp_path / "killed"
  with pytest.raises(_Killed, match="fp/1/latest"):  # in the middle of the epoch
    _run_to_completion_or_kill(workdir, "fp_only", monkeypatch, "fp/1/latest")
  saved = checkpoint.PhaseCheckpoints(workdir / "checkpoints" / "fp", {}).meta("latest")
  assert set(saved["epoch_sums"]) == {"loss", "accuracy"}  # step 1's sums, carried
  with pytest.raises(_Killed, match="fp/2/latest"):  # the epoch improved: best/2 is next
    _run_to_completion_or_kill(workdir, "fp_only", monkeypatch, "fp/2/latest")
  assert checkpoint.PhaseCheckpoints(workdir / "checkpoints" / "fp", {}).step("best") is None
  _run_to_completion_or_kill(workdir, "fp_only", monkeypatch)  # repairs best/2 from latest/2
  _assert_same_outcome(_outcome(workdir, method_ran=False),
                       _outcome(tmp_path / "uninterrupted", method_ran=False))


# --------------------------------------------------------------------------- the slow sweep

def _run_program(workdir, method, env):
  return support.run_program("mnist_lenet.py", *TINY, "--noprogress", *METHOD_FLAGS[method],
                             f"--workdir={workdir}", env=env, timeout=600)


@pytest.mark.slow  # one process per kill point: ~18 (EC2T) or ~9 (INQ) runs of a tiny job
@pytest.mark.parametrize("method", ["ec2t", "inq"])
def test_sigkill_at_every_point_then_resume_equals_uninterrupted(method, tmp_path):
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),  # compile once, not per run
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  points_file = tmp_path / "points.txt"
  reference = _run_program(tmp_path / "uninterrupted", method,
                           {**cache, kill_points.POINTS_FILE: str(points_file)})
  assert reference.returncode == 0, reference.stderr[-2000:]
  points = points_file.read_text().split()
  # INQ's full-precision phase is EC2T's: its sweep kills only in the method's phases.
  points = [p for p in points if method == "ec2t" or not p.startswith("fp/")]
  assert {p.rsplit("/", 1)[1] for p in points} == {"record", "latest", "best"}
  workdir = tmp_path / "killed"
  # Each run resumes from the previous kill and dies at the next point (a resume that repairs a
  # best/<step> from latest/<step> reaches "<phase>/<step>/best" as the interrupted save would).
  for point in points:
    killed = _run_program(workdir, method, {**cache, kill_points.KILL_AT: point})
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
  resumed = _run_program(workdir, method, cache)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_outcome(_outcome(workdir), _outcome(tmp_path / "uninterrupted"))


# --------------------------------------------------------------------------- the pieces

def _tiny_state():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  return training.TrainState(jnp.array(3, jnp.int32), params, {}, (), jnp.zeros(2, jnp.uint32))


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_repair_saves_the_best_that_latest_names_but_best_lacks(tmp_path):
  state = _tiny_state()
  ckpts = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"})
  ckpts.save("best", 1, state._replace(step=state.step - 2), {"best_step": 1})
  ckpts.save("latest", 3, state, {"best_step": 3})  # killed before best/3
  assert ckpts.repair(_abstract(state)) == 3
  assert ckpts.step("best") == 3 and ckpts._managers["best"].all_steps() == [3]
  restored, meta = ckpts.restore("best", _abstract(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert meta["best_step"] == 3


def test_repair_deletes_a_best_that_no_latest_refers_to(tmp_path):
  state = _tiny_state()
  ckpts = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"})
  ckpts.save("best", 0, state, {"best_step": 0})  # an older version: best/0, killed before latest
  assert ckpts.repair(_abstract(state)) is None
  assert ckpts.step("best") is None


def test_repair_of_a_best_first_pair_drops_the_best_newer_than_latest(tmp_path):
  state = _tiny_state()
  ckpts = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"})
  ckpts.save("latest", 2, state, {})  # older versions: no best_step in the meta
  ckpts.save("best", 4, state, {})  # written before latest/4, then killed
  ckpts.repair(_abstract(state))
  assert ckpts.step("best") is None and ckpts.step("latest") == 2
  ckpts.save("best", 4, state, {})  # the resumed run can write it again


def test_rewind_drops_the_phases_records_past_the_checkpoint_and_a_torn_line(tmp_path):
  lines = [{"phase": "fp", "step": 2}, {"phase": "p1", "step": 0}, {"phase": "p1", "step": 2},
           {"phase": "p1", "step": 4}]
  text = "".join(json.dumps(r) + "\n" for r in lines) + '{"phase": "p1", "st'
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = metrics.MetricWriter(tmp_path)
  writer.rewind("p1", 2)
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == lines[:3]
  writer.rewind("p1", None)  # the phase restarts from scratch
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == lines[:1]
  writer.write({"phase": "p1", "step": 0})
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl")[-1] == {"phase": "p1", "step": 0}
  writer.close()


def test_kill_points_do_nothing_unless_named(tmp_path, monkeypatch):
  killed = []
  monkeypatch.setattr(kill_points, "_kill", killed.append)
  monkeypatch.setenv(kill_points.POINTS_FILE, str(tmp_path / "points"))
  monkeypatch.setenv(kill_points.KILL_AT, "p1/4/best")
  kill_points.reached("p1/4/latest")
  kill_points.reached("p1/4/best")
  assert killed == ["p1/4/best"]
  assert (tmp_path / "points").read_text() == "p1/4/latest\np1/4/best\n"
