"""Test session set-up: 8 fake CPU devices, before any backend starts."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# 8 fake devices on 2 busy cores can exceed XLA's 40 s default for a CPU
# collective and abort the whole process; allow 10 minutes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
