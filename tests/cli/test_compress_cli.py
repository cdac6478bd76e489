"""python -m ec2t_jax.compress: MCQ and calibrated pruning from a checkpoint, export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax import models
from ec2t_jax._src.cli import compress_cli
from ec2t_jax._src.cli import report_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  ocp = pytest.importorskip("orbax.checkpoint")
  model = models.LeNet5()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  path = tmp_path_factory.mktemp("ckpt") / "lenet"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.resolve(), {"params": params})
  checkpointer.wait_until_finished()
  return path, params


def test_mcq_writes_what_the_api_computes_bitwise(checkpoint, tmp_path, capsys):
  path, params = checkpoint
  out = tmp_path / "mcq.ec2t"
  assert compress_cli.main(["mcq", str(path), str(out), "--samples-per-weight", "0.5",
                            "--seed", "3", "--model", "lenet5"]) == 0
  assert "mcq" in capsys.readouterr().out
  want = ec2t.mcq(params, 0.5, key=jax.random.key(3))
  got = export.load(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, jax.tree.map(np.asarray, want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # bitwise, dtypes too
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert report_cli.main([str(out)]) == 0


@pytest.mark.slow
def test_prune_with_fractals_reaches_the_sparsity(checkpoint, tmp_path):
  path, params = checkpoint
  out = tmp_path / "pruned.ec2t"
  assert compress_cli.main(["prune", str(path), str(out), "--model", "lenet5", "--sparsity",
                            "0.5", "--num-calibration", "8", "--steps-per-level", "2",
                            "--normalize", "0.1307,0.3081", "--quiet"]) == 0
  got = export.load(out)
  selected = [got[n]["kernel"] for n in ("conv2", "fc1", "fc2")]
  zeros = sum(int((k == 0).sum()) for k in selected)
  assert zeros == round(0.5 * sum(k.size for k in selected))
  np.testing.assert_array_equal(got["conv1"]["kernel"], params["conv1"]["kernel"])
  assert report_cli.main([str(out)]) == 0


@pytest.mark.parametrize("argv,message", [
    (["prune", "{ckpt}", "{out}", "--sparsity", "0.5"], "--model"),
    (["prune", "{ckpt}", "{out}", "--model", "lenet5", "--sparsity", "1.0"], "sparsity"),
    (["mcq", "{ckpt}", "{out}", "--samples-per-weight", "0"], "samples_per_weight"),
    (["mcq", "{tmp}/missing", "{out}"], "no such file"),
    (["prune", "{ckpt}", "{out}", "--model", "lenet5", "--calibration", "{tmp}/none.npy"],
     "--calibration"),
])
def test_bad_input_is_one_line_and_status_2(checkpoint, tmp_path, capsys, argv, message):
  path, _ = checkpoint
  argv = [a.format(ckpt=path, out=tmp_path / "o.ec2t", tmp=tmp_path) for a in argv]
  assert compress_cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err
  assert not (tmp_path / "o.ec2t").exists()


@pytest.mark.slow
def test_api_results_through_export_cli_round_trip_bitwise(checkpoint, tmp_path):
  """MCQ and calibrated-pruning params saved as a checkpoint, then `python -m ec2t_jax.export`."""
  ocp = pytest.importorskip("orbax.checkpoint")
  from ec2t_jax._src.cli import export_cli  # pylint: disable=g-import-not-at-top
  _, params = checkpoint
  model = models.LeNet5()
  quantized = ec2t.mcq(params, 1.0, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  pruned = ec2t.prune_calibrated(params, lambda p, x: model.apply({"params": p}, x), x, 0.5,
                                 steps_per_level=1)
  for name, tree in (("mcq", quantized), ("pruned", pruned)):
    tree = jax.tree.map(np.asarray, tree)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / name).resolve(), {"params": tree})
    checkpointer.wait_until_finished()
    out = tmp_path / f"{name}.ec2t"
    assert export_cli.main([str(tmp_path / name), str(out), "--quiet"]) == 0
    back = export.load(out)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert report_cli.main([str(out)]) == 0
