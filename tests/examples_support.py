"""Helpers for the tests of examples/: import paths, running scripts in-process or as programs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest
from absl import flags
from absl import logging

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MNIST_DATA_DIR = (REPO / ".." / "shared" / "data" / "tfds").resolve()
RESNET20_NPZ = (REPO / ".." / "shared" / "data" / "ec2t-reference" / "resnet20_fp.npz").resolve()

if str(EXAMPLES) not in sys.path:
  sys.path.insert(0, str(EXAMPLES))
logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
           "(tests/conftest.py sets it)")
_TFDS_ENV = pathlib.Path(os.environ.get("TFDS_DATA_DIR", str(MNIST_DATA_DIR)))
SHAKESPEARE_DATA_DIR = (MNIST_DATA_DIR if (MNIST_DATA_DIR / "tiny_shakespeare").is_dir()
                        else _TFDS_ENV)
needs_shakespeare = pytest.mark.skipif(
    not (SHAKESPEARE_DATA_DIR / "tiny_shakespeare").is_dir(),
    reason=f"tiny_shakespeare not prepared in {SHAKESPEARE_DATA_DIR} (or $TFDS_DATA_DIR)")
needs_mnist = pytest.mark.skipif(not (MNIST_DATA_DIR / "mnist").is_dir(),
                                 reason=f"MNIST not prepared in {MNIST_DATA_DIR}")


def run_in_process(module, *args: str) -> dict:
  """Parses ``args`` as the script's flags (private FlagValues) and runs it; returns results."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["prog", "--noprogress", *args])
  return module.run(fv)


def run_program(script: str, *args: str, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs ``python examples/<script> args`` as a separate program and captures its output."""
  full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLES)]),
              "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
  return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def write_random_resnet8_npz(path, seed: int) -> str:
  """Writes a PyTorch-layout state dict of a random ResNet-8 (width 0.5), as --init_from takes it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  model = models.cifar_resnet(8, width_multiplier=0.5)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda x: rng.normal(0.0, 0.2, x.shape).astype(np.float32), shapes)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # variances > 0
  np.savez(path, **models.to_state_dict(variables["params"], variables["batch_stats"]))
  return str(path)


def leaf_field(raw_ternary_state, name: str) -> dict:
  """``{path: array}`` of one per-leaf field in a raw (dict) QuantizerState.

  Checkpoints read without a target hold the state's NamedTuples as dicts or
  lists; this collects e.g. every leaf's ``assignment`` by its path.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(raw_ternary_state["leaves"])
  out = {}
  for path, value in flat:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if keys[-1] == name:
      out["/".join(keys[:-1])] = value
  if not out:
    raise KeyError(f"no per-leaf field {name!r} in the checkpoint's state")
  return out
