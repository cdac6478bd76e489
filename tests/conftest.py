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

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)

# A benchmark of the suite itself, run as a script (python tests/suite_budget.py).
collect_ignore = ["suite_budget.py"]
