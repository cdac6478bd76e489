"""Two processes joined by jax.distributed (127.0.0.1, gloo CPU collectives), 4 fake devices each,
train exactly like one process with 8 devices.

Both runs cut the data into the same two shards (``--data_shards=2``): each of the
two processes reads only its own shard, the single process reads both. Tolerance:
every array of the final state within 1e-5 absolute (the cross-process all-reduce
sums in another order); the ternary assignments are identical.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import examples_support as support
import cifar_resnet
from common import checkpoint

TOLERANCE = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(workdir, pretrained):
  return ["--mock_data=32", "--model=resnet8", "--width_multiplier=0.5", "--batch_size=16",
          "--eval_batch_size=16", f"--init_from={pretrained}", "--phase1_epochs=1",
          "--phase2_epochs=0", "--data_shards=2", "--noprogress", f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def pretrained_npz(tmp_path_factory):
  """A PyTorch-layout state dict of a random ResNet-8, as --init_from takes it."""
  return support.write_random_resnet8_npz(
      tmp_path_factory.mktemp("pretrained") / "resnet8.npz", seed=1)


def _launch_two_processes(workdir, pretrained):
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(support.REPO), str(support.EXAMPLES)]),
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600"}
  procs = [subprocess.Popen(
      [sys.executable, str(support.EXAMPLES / "cifar_resnet.py"), *_args(workdir, pretrained),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=support.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.slow  # 40-85 s on 2 shared CPU cores: three JAX processes compile the same step
@support.needs_8_devices
def test_two_processes_with_four_devices_equal_one_process_with_eight(tmp_path, pretrained_npz):
  results = _launch_two_processes(tmp_path / "two", pretrained_npz)
  for index, (code, out, err) in enumerate(results):
    assert code == 0, f"process {index} failed:\n{err[-3000:]}"
  assert "2 process(es), mesh {'data': 8, 'fsdp': 1}" in results[0][1]
  assert "shards [0]" in results[0][1]  # each process reads only its own shard
  assert "EC2T summary" in results[0][1]
  assert "EC2T summary" not in results[1][1] and "[fp]" not in results[1][1]  # only process 0 logs

  support.run_in_process(cifar_resnet, *_args(tmp_path / "one", pretrained_npz))
  two = checkpoint.read_state(tmp_path / "two" / "checkpoints" / "ec2t_phase1" / "latest")
  one = checkpoint.read_state(tmp_path / "one" / "checkpoints" / "ec2t_phase1" / "latest")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE), two, one)
  jax.tree.map(np.testing.assert_array_equal, support.leaf_field(two["opt_state"]["ternary"], "assignment"),
               support.leaf_field(one["opt_state"]["ternary"], "assignment"))
