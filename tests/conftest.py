"""Test session set-up: 8 fake CPU devices, before any backend starts."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tests/ mirrors the package (tests/core, tests/methods, ...); the shared test
# helpers (models_for_tests, examples_support, ...) live in tests/ itself.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
# 8 fake devices on 2 busy cores can exceed XLA's 40 s default for a CPU
# collective and abort the whole process; allow 10 minutes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
# The suite's time is mostly XLA compiling small programs, and most of that is
# LLVM optimising machine code that then runs for microseconds. Without those
# optimisations the same tests pass at about half the CPU time (process CPU,
# python tests/suite_budget.py -- PATH, with the session compilation cache of
# the root conftest.py: tests/core 112.3 -> 66.0 s, the doctests 113.3 -> 65.8 s).
# XLA's graph passes (fusion, layout) still run; a caller's own level wins.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's newer MLIR fusion emitters take twice the compile time of the classic ones on
# these small programs (a jitted step and init of every train-time method on a small MLP,
# compile CPU: 8.4-8.7 s with them, 3.9 s without; the same HLO, emitted differently).
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)

# A benchmark of the suite itself, run as a script (python tests/suite_budget.py).
collect_ignore = ["suite_budget.py"]
