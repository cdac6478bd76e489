"""The README's quickstart runs and leaves its middle layers ternary."""

import pathlib
import runpy

import numpy as np

import ec2t_jax as ec2t

_SCRIPT = pathlib.Path(__file__).parents[2] / "examples" / "quickstart.py"


def test_quickstart_leaves_middle_layers_ternary(capsys):
  namespace = runpy.run_path(str(_SCRIPT), run_name="__main__")
  params = namespace["params"]
  for name in ("Conv_1", "Conv_2", "Dense_0"):
    assert len(np.unique(np.asarray(params[name]["kernel"]))) <= 3
  assert len(np.unique(np.asarray(params["Conv_0"]["kernel"]))) > 3
  assert "EC2T summary at step 30" in capsys.readouterr().out
  assert ec2t.summary(namespace["opt_state"]).totals["sparsity"] > 0.2
