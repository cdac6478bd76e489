"""Every command line answers any input with success or one line on stderr and status 2.

Never a traceback (printing included), never an output written over an input,
never non-finite weights or calibration data compressed silently. Crafted
packed files carry a recomputed checksum (``tests/export/test_export_hostile``).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax._src.cli import compress_cli
from ec2t_jax._src.cli import export_cli
from ec2t_jax._src.cli import report_cli

from tests.export.test_export_hostile import seal

REPO = Path(__file__).parents[2]
MAINS = {"export": export_cli.main, "report": report_cli.main, "compress": compress_cli.main}


def _raw_leaf_file(name: str, values=(1.0, -2.0)) -> bytes:
  """A packed file with one raw float32 ``(1, n)`` kernel under the key ``name`` (any string)."""
  stream = np.asarray(values, "<f4").tobytes()
  return seal({"tree": {"d": [[name, 0]]},
               "leaves": [{"c": "raw", "d": "float32", "s": [1, len(values)], "n": len(stream)}],
               "meta": {}}, stream)


def _checkpoint(path, **overrides):
  """A small ``.npz`` checkpoint: three kernels, the middle one the one MCQ quantizes."""
  rng = np.random.default_rng(0)
  leaves = {"c1/kernel": rng.normal(size=(3, 3, 1, 4)), "c2/kernel": rng.normal(size=(3, 3, 4, 4)),
            "fc/kernel": rng.normal(size=(4, 10))}
  leaves = {k: np.asarray(v, np.float32) for k, v in {**leaves, **overrides}.items()}
  np.savez(path, **leaves)
  return path


def _assert_one_line_error(status, capsys, match=""):
  err = capsys.readouterr().err
  assert status == 2, err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], err


# ---------------------------------------------------------------- no write destroys an input


def _refused(argv, protected, capsys, match="refusing to overwrite"):
  before = {p: p.read_bytes() for p in protected}
  main = MAINS[argv[0]]
  _assert_one_line_error(main(argv[1:]), capsys, match)
  assert {p: p.read_bytes() for p in protected} == before


@pytest.mark.parametrize("argv", [
    ["compress", "mcq", "{x}", "{x}"], ["export", "{x}", "{x}"],
    ["export", "--decode", "{packed}", "{packed}"], ["export", "--inference", "{x}", "{x}"],
    ["compress", "mcq", "{x}", "{link}"], ["compress", "mcq", "{x}", "{hard}"],
    ["export", "{x}", "{dir}/../{dirname}/x.npz"],
    ["compress", "prune", "{x}", "{calibration}", "--model", "lenet5",
     "--calibration", "{calibration}"],
])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys, argv):
  x = _checkpoint(tmp_path / "x.npz")
  export.save(tmp_path / "p.ec2t", {"w": np.zeros(4, np.float32)})
  np.save(tmp_path / "cal.npy", np.zeros((2, 28, 28, 1), np.float32))
  os.symlink(x, tmp_path / "link.npz")
  os.link(x, tmp_path / "hard.npz")
  names = dict(x=x, packed=tmp_path / "p.ec2t", link=tmp_path / "link.npz",
               hard=tmp_path / "hard.npz", dir=tmp_path, dirname=tmp_path.name,
               calibration=tmp_path / "cal.npy")
  _refused([a.format(**names) for a in argv],
           [x, tmp_path / "p.ec2t", tmp_path / "cal.npy"], capsys)


def test_an_output_over_a_file_inside_an_input_checkpoint_directory_is_refused(tmp_path, capsys):
  checkpoint = tmp_path / "ckpt"
  checkpoint.mkdir()
  (checkpoint / "_METADATA").write_bytes(b"{}")
  _refused(["export", str(checkpoint), str(checkpoint / "_METADATA")],
           [checkpoint / "_METADATA"], capsys)


def test_report_plots_never_overwrite_the_report_input(tmp_path, capsys):
  source = tmp_path / "layer_bars.png"  # a packed file that happens to bear a plot's name
  export.save(source, {"w": np.zeros(4, np.float32)})
  _refused(["report", str(source), "--plots", str(tmp_path)], [source], capsys)


# ---------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("leaf", ["c2/kernel", "c1/kernel"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_compress_refuses_a_checkpoint_leaf_holding_nan_or_inf_naming_it(tmp_path, capsys,
                                                                         leaf, bad):
  weights = np.ones((3, 3, 4, 4) if leaf == "c2/kernel" else (3, 3, 1, 4), np.float32)
  weights[0, 0, 0, 1] = bad
  x = _checkpoint(tmp_path / "x.npz", **{leaf: weights})
  status = compress_cli.main(["mcq", str(x), str(tmp_path / "o.ec2t")])
  _assert_one_line_error(status, capsys, f"leaf '{leaf}' holds 1 non-finite value")
  assert not (tmp_path / "o.ec2t").exists()


@pytest.mark.parametrize("normalize", ["0,nan", "nan,1", "0,inf", "0,0", "1"])
def test_compress_refuses_a_normalization_that_is_not_two_finite_numbers(tmp_path, capsys,
                                                                          normalize):
  x = _checkpoint(tmp_path / "x.npz")
  status = compress_cli.main(["prune", str(x), str(tmp_path / "o.ec2t"), "--model", "lenet5",
                              f"--normalize={normalize}"])
  _assert_one_line_error(status, capsys, "--normalize must be MEAN,STD")


def test_compress_refuses_calibration_inputs_holding_nan(tmp_path, capsys):
  x = _checkpoint(tmp_path / "x.npz")
  inputs = np.zeros((4, 28, 28, 1), np.float32)
  inputs[2, 5, 5, 0] = np.nan
  np.save(tmp_path / "cal.npy", inputs)
  status = compress_cli.main(["prune", str(x), str(tmp_path / "o.ec2t"), "--model", "lenet5",
                              "--calibration", str(tmp_path / "cal.npy")])
  _assert_one_line_error(status, capsys, "holds 1 non-finite value")
  assert not (tmp_path / "o.ec2t").exists()


# ---------------------------------------------------------------- anything else: one line


def test_report_of_a_leaf_named_by_a_lone_surrogate_never_raises(tmp_path, capsys):
  (tmp_path / "s.ec2t").write_bytes(_raw_leaf_file("w\ud800"))
  status = report_cli.main([str(tmp_path / "s.ec2t")])
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err
  if status == 0:  # the name printed escaped
    assert "w\\ud800" in captured.out
  else:  # or refused when the file is read
    assert status == 2 and len(captured.err.strip().splitlines()) == 1


def test_paths_stdout_cannot_encode_are_printed_escaped_by_every_cli(tmp_path, capsys):
  """A file name with a byte that is not UTF-8 (``\\udcff`` in Python) in export and report."""
  x = _checkpoint(tmp_path / "x.npz")
  packed = tmp_path / "o\udcff.ec2t"
  assert export_cli.main([str(x), str(packed)]) == 0
  assert "o\\udcff.ec2t" in capsys.readouterr().out
  assert report_cli.main([str(packed)]) == 0
  assert "o\\udcff.ec2t (packed)" in capsys.readouterr().out
  assert compress_cli.main(["mcq", str(x), str(tmp_path / "m\udcff.ec2t")]) == 0
  assert "m\\udcff.ec2t" in capsys.readouterr().out


def test_export_decode_of_a_leaf_name_longer_than_a_zip_entry_allows_is_one_line(tmp_path,
                                                                                  capsys):
  (tmp_path / "l.ec2t").write_bytes(_raw_leaf_file("w" * 70_000))
  status = export_cli.main(["--decode", str(tmp_path / "l.ec2t"), str(tmp_path / "o.npz")])
  _assert_one_line_error(status, capsys)


def test_an_unexpected_exception_is_one_line_naming_its_type(tmp_path, capsys, monkeypatch):
  def broken(*args, **kwargs):
    raise AttributeError("something deep inside")
  monkeypatch.setattr(report_cli, "build_report", broken)
  status = report_cli.main([str(tmp_path / "anything")])
  _assert_one_line_error(status, capsys, "AttributeError: something deep inside")


def test_usage_errors_are_one_line_with_status_2(capsys):
  for main in MAINS.values():
    with pytest.raises(SystemExit) as exit_info:
      main(["--no-such-option"])
    assert exit_info.value.code == 2
    _assert_one_line_error(2, capsys, "(see --help)")


def _random_argv(rng, tokens):
  picks = rng.integers(0, len(tokens), size=int(rng.integers(0, 7)))
  return [tokens[i] for i in picks]


def _fuzz_setup(tmp_path):
  """Crafted files, output paths and the tokens random command lines are drawn from."""
  x = _checkpoint(tmp_path / "x.npz")
  export.save(tmp_path / "p.ec2t", {"w": np.array([0.5, 0.0, -0.5, 0.0], np.float32)})
  (tmp_path / "s.ec2t").write_bytes(_raw_leaf_file("\udcff\ud800"))
  (tmp_path / "junk").write_bytes(b"\x89EC2T\r\n\x1a" + bytes(60))
  files = [str(p) for p in (x, tmp_path / "p.ec2t", tmp_path / "s.ec2t", tmp_path / "junk",
                            tmp_path / "missing", tmp_path)]
  outputs = [str(tmp_path / "o1.ec2t"), str(tmp_path / "o2.npz"), str(tmp_path / "d" / "o")]
  words = ["--max-bytes", "1K", "-1", "99999999999999999999999T", "nan", "0,nan", "\ud800",
           "", "--", "-", "--quiet", "--json", "--keys", "params,batch_stats", "=", "\x00"]
  tokens = {
      "export": files + outputs + words + ["--decode", "--inference", "--float16",
                                            "--bitmask-only", "--packed", "--route"],
      "report": files + words + ["--geometry", "none", "auto", "--rules", "exact",
                                 "--mul-bits", "0", "--image-size", "-3", "--latent"],
      "compress": files + outputs + words + ["mcq", "prune", "--rule", "(", ".*",
                                             "--samples-per-weight", "1e309", "--per-neuron",
                                             "--seed", "--normalize", "--sparsity", "2"],
  }
  return files, outputs, tokens


def _random_argvs(tmp_path, count, seed):
  """``count`` seeded ``(cli name, argv)``; half with the positional arguments filled."""
  files, outputs, tokens = _fuzz_setup(tmp_path)
  rng = np.random.default_rng(seed)
  for case in range(count):
    name = list(MAINS)[case % 3]
    argv = _random_argv(rng, tokens[name])
    if case % 2:
      argv = ([str(rng.choice(["mcq", "prune"]))] if name == "compress" else []) + \
          [files[case % len(files)]] + ([] if name == "report" else [outputs[case % 3]]) + argv
    yield name, argv


def test_random_argv_gives_success_or_one_line_and_status_2(tmp_path, capsys):
  """Seeded: 90 random command lines over the three CLIs, their options and crafted files."""
  outcomes = {0: 0, 2: 0}
  for name, argv in _random_argvs(tmp_path, 90, seed=16):
    try:
      status = MAINS[name](argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
      status = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (name, argv)
    assert status in (0, 2), (name, argv, captured.err)
    if status == 2:
      assert len(captured.err.strip().splitlines()) == 1, (name, argv, captured.err)
    outcomes[status] += 1
  print(f"random argv: {outcomes}")
  assert outcomes[0] > 0 and outcomes[2] > 30


@pytest.mark.slow
def test_random_argv_in_real_processes_gives_success_or_one_line_and_status_2(tmp_path):
  """Seeded: 24 random command lines, each a fresh ``python -m`` (strict UTF-8 stdout)."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
  outcomes = {0: 0, 2: 0}
  for name, argv in _random_argvs(tmp_path, 24, seed=61):
    argv = [a.encode("utf-8", "surrogateescape") if "\udc80" <= a[:1] <= "\udcff" else
            a.encode("utf-8", "backslashreplace") for a in argv]
    argv = [a.replace(b"\x00", b"") for a in argv]  # exec cannot pass NUL bytes
    result = subprocess.run([sys.executable.encode(), b"-m", f"ec2t_jax.{name}".encode(), *argv],
                            capture_output=True, cwd=REPO, env=env, timeout=300, check=False)
    err = result.stderr.decode("utf-8", "backslashreplace")
    warnings_removed = [l for l in err.strip().splitlines()
                        if "Warning" not in l and not l.startswith("  ")]
    assert "Traceback" not in err, (name, argv, err[-2000:])
    assert result.returncode in (0, 2), (name, argv, err[-2000:])
    if result.returncode == 2:
      assert len(warnings_removed) == 1, (name, argv, err)
    outcomes[result.returncode] += 1
  print(f"random argv in processes: {outcomes}")
  assert outcomes[2] > 8


def test_in_a_real_process_a_surrogate_name_and_an_output_over_the_input_are_one_line(
    tmp_path):
  """``python -m``: the interpreter's own stdout (strict UTF-8) and exit path."""
  (tmp_path / "s.ec2t").write_bytes(_raw_leaf_file("w\ud800"))
  x = _checkpoint(tmp_path / "x.npz")
  script = (f"{sys.executable} -m ec2t_jax.report {tmp_path / 's.ec2t'}; echo status=$?; "
            f"{sys.executable} -m ec2t_jax.compress mcq {x} {x}; echo status=$?")
  env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
  before = x.read_bytes()
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          errors="backslashreplace", cwd=REPO, env=env, timeout=300)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  report_status, compress_status = (int(s) for s in
                                    [l.split("=")[1] for l in result.stdout.splitlines()
                                     if l.startswith("status=")])
  assert report_status in (0, 2) and compress_status == 2
  assert "refusing to overwrite" in result.stderr
  assert x.read_bytes() == before
