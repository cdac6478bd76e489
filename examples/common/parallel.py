"""Processes, device mesh and shardings for the examples.

* :func:`initialize_distributed` joins a multi-host job (``jax.distributed``).
* :func:`make_mesh` builds a ``("data", "fsdp")`` mesh over all devices.
* :func:`state_shardings` replicates the train state (data parallel) or, with an
  ``fsdp`` axis larger than one, shards each array over it (FSDP-style: params
  and the whole optimizer state, EC2T latent weights included, are split
  across devices and gathered by XLA where a layer needs them).
* :func:`global_batch` assembles the global batch from each process's local part.

Example:
  >>> from common.parallel import make_mesh
  >>> mesh = make_mesh(fsdp=1)
  >>> mesh.axis_names
  ('data', 'fsdp')
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from common.cli import UserError

BATCH_AXES = ("data", "fsdp")


def _cluster_detected() -> bool:
  """Whether the environment looks like one process of a multi-process job."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for size_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    if int(env.get(size_var, "1") or 1) > 1:
      return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # multi-host TPU slice (pod)


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when the run spans several processes.

  Must run before anything else touches JAX devices.

  Args:
    mode: ``"off"`` (single process), ``"on"`` (always initialise; cluster
      settings are auto-detected on TPU pods, SLURM, Open MPI... when not
      given), or ``"auto"`` (initialise if a coordinator address is given or
      the environment is a multi-process job).
    coordinator_address: ``host:port`` of process 0, for manual launches.
    num_processes: Number of processes, for manual launches.
    process_id: This process's index, for manual launches.

  Returns:
    Whether ``jax.distributed`` was initialised.
  """
  if mode not in ("auto", "on", "off"):
    raise UserError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off" or (mode == "auto" and not coordinator_address and not _cluster_detected()):
    return False
  # CPU hosts need a collectives backend across processes; other platforms ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (RuntimeError, ValueError) as error:
    raise UserError(f"jax.distributed.initialize failed: {error}") from None
  return True


def make_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh over all devices of all processes.

  Args:
    fsdp: Size of the ``fsdp`` axis (1 = pure data parallelism).

  Returns:
    A mesh with Auto axis types (GSPMD propagates shardings inside the step).
  """
  devices = jax.device_count()
  if fsdp < 1 or devices % fsdp:
    raise UserError(f"--fsdp={fsdp} must divide the number of devices ({devices})")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((devices // fsdp, fsdp), ("data", "fsdp"), axis_types=(auto, auto))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 1024) -> P:
  """Shards the largest dimension divisible by ``fsdp_size`` over ``"fsdp"``.

  Small arrays (fewer than ``min_size`` elements: biases, centroids, counters)
  stay replicated, as do arrays with no divisible dimension.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> from common.parallel import fsdp_spec
    >>> fsdp_spec((3, 3, 16, 32), fsdp_size=2) == P(None, None, None, "fsdp")
    True
  """
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], d))
  return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for every array of a train state: replicated, or FSDP over ``"fsdp"``.

  Args:
    abstract_state: The state or its ``jax.eval_shape``.
    mesh: From :func:`make_mesh`.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_state``.
  """
  size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)),
                      abstract_state)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global arrays from this process's consecutive slice of the batch.

  Args:
    local: This process's examples (leading dimension = global / process count).
    sharding: Usually :func:`batch_sharding`.

  Returns:
    The same keys, as global ``jax.Array``\\ s sharded along the batch.
  """
  count = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * count,) + v.shape[1:]) for k, v in local.items()}


def global_min(value: int) -> int:
  """The minimum of an integer over all processes."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def global_max(value: int) -> int:
  """The maximum of an integer over all processes."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def to_host(tree: Any) -> Any:
  """Fetches replicated (or fully addressable) arrays to numpy on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def is_main_process() -> bool:
  """Whether this process writes logs, reports and progress bars."""
  return jax.process_index() == 0
