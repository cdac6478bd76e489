"""benchmarks/gpt_methods.py: run specs from the registry, the table and figure, and the
--quick front end to end (slow)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import examples_support as support

sys.path.insert(0, str(support.REPO / "benchmarks"))
import gpt_methods as gm  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_spec_splits_into_example_flags_and_method_options():
  spec = gm.RunSpec("ec2t:gamma=0.1:target_sparsity=0.8:centroids=channel")
  args = spec.example_args({"gamma", "target_sparsity", "method"}, {"centroids": "layer"})
  assert args == ["--method=ec2t", "--gamma=0.1", "--target_sparsity=0.8",
                  "--method_options=centroids=channel"]
  assert gm.RunSpec("bitnet:activation_bits=8").folder == "bitnet_activation_bits=8"


def test_a_knob_that_is_also_an_example_flag_is_the_methods_option_except_for_ec2t():
  flags = {"gamma", "init_scale", "method"}
  ttq = gm.RunSpec("ttq:init_scale=none").example_args(flags, {"init_scale": 1.0})
  assert ttq == ["--method=ttq", "--method_options=init_scale=none"]
  ec2t = gm.RunSpec("ec2t:init_scale=0.2").example_args(flags, {"init_scale": 0.3})
  assert ec2t == ["--method=ec2t", "--init_scale=0.2"]


def test_a_key_that_is_neither_flag_nor_knob_is_refused_by_name():
  with pytest.raises(ValueError, match="'gama' is neither a flag"):
    gm.RunSpec("ec2t:gama=0.1").example_args({"gamma"}, {})
  with pytest.raises(ValueError, match="not KEY=VALUE"):
    gm.RunSpec("ec2t:0.1")


def test_every_front_method_comes_from_the_registry_or_is_skipped(capsys):
  specs = [gm.RunSpec(s) for s in (*gm.FRONT, "no_such_method:bits=2")]
  planned = gm.resolve(specs)
  names = {spec.name for spec, _ in planned}
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  assert names == {s.name for s in specs} & (set(ec2t.method_registry()) | {"none"})
  assert "skipping 'no_such_method:bits=2'" in capsys.readouterr().out
  w8 = dict((s.text, a) for s, a in planned)["bitnet:activation_bits=8"]
  assert "--activation_bits=8" in w8


def _result(loss, sparsity, size, cpu):
  return {"val_loss": loss, "sparsity": sparsity, "export_bytes": size,
          "float16_bytes": size // 2, "float16_val_loss": loss, "timing": {"cpu_s": cpu}}


def test_the_table_gives_mean_and_sample_std_over_seeds(tmp_path):
  fp = {"model": "gpt", "fp_val_loss": 2.0, "fp_steps": 10}
  rows = {"ec2t:gamma=0.1": [_result(1.0, 0.5, 100, 10.0), _result(2.0, 0.7, 300, 30.0)],
          "full precision continued": [_result(1.5, 0.0, 400, 5.0)]}
  text = gm.table(fp, rows, "cmd", ["paretoq"])
  ec2t_row = next(l for l in text.splitlines() if l.startswith("| ec2t:gamma=0.1"))
  std = np.std([1.0, 2.0], ddof=1)
  assert f"1.5000 ± {std:.4f}" in ec2t_row and "60.0 ± 14.1%" in ec2t_row
  assert "| 20 | yes |" in ec2t_row  # CPU seconds (mean); on the bytes front
  assert "1.5000 ± 0.0000" in text and "Skipped (not in `ec2t.method_registry()`): `paretoq`" in text
  gm.plot(fp, rows, str(tmp_path / "front.png"))
  assert (tmp_path / "front.png").stat().st_size > 10_000


def test_a_row_is_on_the_bytes_front_unless_a_smaller_file_has_a_lower_loss():
  r = lambda loss, size: [_result(loss, 0.5, 2 * size, 1.0)]
  rows = {"small": r(1.30, 100), "beaten": r(1.40, 150), "large": r(1.10, 300),
          "tie": r(1.30, 100), "worse_and_larger": r(1.20, 400)}
  assert gm.bytes_front(rows) == {"small", "large", "tie"}


@support.needs_shakespeare
def test_quick_front_runs_end_to_end_and_resumes(tmp_path):
  env = {**os.environ, "TFDS_DATA_DIR": str(support.SHAKESPEARE_DATA_DIR),
         "PYTHONPATH": str(support.REPO)}
  command = [sys.executable, str(support.REPO / "benchmarks" / "gpt_methods.py"), "--quick",
             f"--workdir={tmp_path}", f"--output={tmp_path / 'front.md'}",
             f"--plot={tmp_path / 'front.png'}"]
  subprocess.run(command, check=True, env=env, capture_output=True, timeout=1800)
  text = (tmp_path / "front.md").read_text()
  for label in ("full precision continued", "ec2t:gamma=0.2", "bitnet:activation_bits=8"):
    assert f"| {label} | 1 |" in text
  assert (tmp_path / "front.png").stat().st_size > 10_000
  finished = os.path.getmtime(tmp_path / "none_s0" / "report.json")
  subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
  assert os.path.getmtime(tmp_path / "none_s0" / "report.json") == finished  # not re-run


def test_notes_below_the_marker_survive_a_rewrite(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text(f"# old table\n| a |\n{gm.NOTES_MARKER}\n## Tried\nfigures\n")
  assert gm.kept_notes(str(path)) == f"\n{gm.NOTES_MARKER}\n## Tried\nfigures\n"
  assert gm.kept_notes(str(tmp_path / "missing.md")) == ""
