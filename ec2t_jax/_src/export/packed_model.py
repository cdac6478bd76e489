"""An inference model whose ternary kernels stay packed in memory: :func:`load_packed`.

From a params tree (trained, or read back from an ``.ec2t`` file) it builds
the same tree with every selected ternary kernel replaced by a packed one
(:mod:`ec2t_jax._src.export.packed_matmul`), whose ``matmul`` reads it packed,
and every other float leaf cast to the compute dtype. Routes:

* ``"xla"``: :class:`Int4Ternary` (``jnp.int4`` codes, 4 bits a weight);
* ``"pallas"``: :class:`PackedTernary` (2 bits a weight, Pallas kernel);
* ``"dense"``: the kernels as dense arrays in the compute dtype (the
  baseline the packed routes are measured against).

A stacked kernel (scanned layers, ``[L, K, N]``) becomes a tuple of ``L``
packed kernels, one per layer. The GPT decoder
(:mod:`ec2t_jax.models.gpt_decode`) runs such a tree directly; the bytes
resident are :func:`resident_bytes`.

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> from ec2t_jax.export import pack_params, resident_bytes
  >>> w = np.where(np.arange(32).reshape(8, 4) % 3 == 0, 0.5, -0.25).astype(np.float32)
  >>> packed = pack_params({"dense": {"kernel": w, "bias": np.zeros(4, np.float32)}},
  ...                      route="xla", dtype=jnp.float32)
  >>> type(packed["dense"]["kernel"]).__name__  # resident_bytes(packed): on-device bytes
  'Int4Ternary'
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.core import trees
from ec2t_jax._src.export import exporting
from ec2t_jax._src.export import packed_matmul
from ec2t_jax._src.export.container import DEFAULT_MAX_BYTES

ROUTES = ("dense", "xla", "pallas")
DEFAULT_PATTERN = r"(^|/)kernel$"


def is_packed(x) -> bool:
  """Whether ``x`` is a packed kernel (has ``matmul``)."""
  return isinstance(x, (packed_matmul.Int4Ternary, packed_matmul.PackedTernary))


def _pack_one(kernel, route: str, name: str, dtype, block_n):
  if route == "xla":
    return packed_matmul.pack_int4(kernel, name)
  if route == "pallas":
    return packed_matmul.pack_pallas(kernel, name, block_n=block_n)
  packed_matmul.ternary_columns(kernel, name)  # the same checks
  return jnp.asarray(kernel, dtype)


def _dense_stack(leaf, path, dtype):
  for i, kernel in enumerate(leaf):
    packed_matmul.ternary_columns(kernel, f"{path}[{i}]")
  return jnp.asarray(leaf, dtype)


def _is_ternary(array) -> bool:
  try:
    for kernel in array.reshape(-1, *array.shape[-2:]):
      packed_matmul.ternary_columns(kernel)
  except ValueError:
    return False
  return True


def pack_params(params, route: str = "xla", *, layers: Optional[str] = None,
                dtype=jnp.bfloat16, block_n: Optional[int] = None):
  """``params`` with its ternary kernels packed and its other float leaves in ``dtype``.

  Args:
    params: nested dicts/lists of arrays (Flax or NNX pure dict; a GPT's params).
    route: ``"xla"``, ``"pallas"`` or ``"dense"`` (module docstring).
    layers: regular expression (``re.search`` on the ``/``-joined path) of the
      kernels that must be packed: each must be ternary per output column (2-D
      or a stack of 2-D), else a ``ValueError`` naming it. Default: every
      2-D/3-D leaf named ``kernel`` that is ternary is packed, the others stay
      dense.
    dtype: compute dtype of the other float leaves (and of ``"dense"`` kernels).
    block_n: output columns per program of the Pallas kernel (default: its own).

  Returns:
    The same tree structure with packed kernels (a tuple of per-layer kernels
    for a stacked leaf).

  Raises:
    ValueError: naming the leaf, for an unknown route, a selected kernel that
      is not ternary, or a float leaf holding a non-finite value (for a
      ternary kernel: its scales).
  """
  if route not in ROUTES:
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
  pattern = re.compile(layers if layers is not None else DEFAULT_PATTERN)
  flat, structure = trees.flatten(params)
  out = [_convert_leaf(path, leaf, pattern, layers, route, dtype, block_n)
         for path, leaf in flat]
  return trees.unflatten(out, structure)


def _is_float(leaf) -> bool:
  """Whether ``leaf`` holds floating-point values (bfloat16 included)."""
  return np.issubdtype(leaf.dtype, np.floating) or leaf.dtype.name == "bfloat16"


def _check_finite(path: str, leaf) -> None:
  """Raises a ``ValueError`` naming ``path`` and the first non-finite value of ``leaf``."""
  if not np.isfinite(leaf.astype(np.float64)).all():
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(leaf.astype(np.float64)))[0])
    raise ValueError(f"{path}: non-finite value {leaf[bad]} at {bad} (a packed model needs "
                     "finite weights and scales)")


def _convert_leaf(path: str, leaf, pattern, layers, route, dtype, block_n):
  """One leaf of :func:`pack_params`: packed if a selected ternary kernel, else cast."""
  strict = layers is not None
  is_float = _is_float(leaf)
  if is_float:
    _check_finite(path, leaf)
  selected = bool(pattern.search(path)) and is_float and leaf.ndim in (2, 3)
  if strict and pattern.search(path) and not selected:
    raise ValueError(f"{path}: selected by layers={layers!r} but not a float kernel of rank "
                     f"2 or 3 (shape {leaf.shape}, dtype {leaf.dtype})")
  if selected and (strict or _is_ternary(leaf)):
    return _pack_kernel(path, leaf, route, dtype, block_n)
  if is_float:
    return jnp.asarray(leaf, dtype)
  return jnp.asarray(leaf)


def _pack_kernel(path: str, leaf, route, dtype, block_n):
  """Packs a 2-D kernel, or a stack of them (a tuple, or one dense stack for ``"dense"``)."""
  if leaf.ndim == 2:
    return _pack_one(leaf, route, path, dtype, block_n)
  if route == "dense":
    return _dense_stack(leaf, path, dtype)
  return tuple(_pack_one(s, route, f"{path}[{i}]", dtype, block_n)
               for i, s in enumerate(leaf))


def load_packed(path, route: str = "xla", *, layers: Optional[str] = None,
                dtype=jnp.bfloat16, block_n: Optional[int] = None,
                max_bytes: int = DEFAULT_MAX_BYTES):
  """Reads an ``.ec2t`` file into a packed inference tree (:func:`pack_params`).

  The file is decoded once (the ternary kernels come back bitwise), then
  packed; the float arrays of the decoded file are freed, only the packed
  tree stays resident (:func:`resident_bytes`).

  Args:
    path: a file written by :func:`ec2t_jax.export.save` (or ``export_file``).
    route, layers, dtype, block_n: as :func:`pack_params`.
    max_bytes: as :func:`ec2t_jax.export.load`.

  Raises:
    ExportFormatError: for a corrupt file; ValueError: as :func:`pack_params`.
  """
  return pack_params(exporting.load(path, max_bytes=max_bytes), route, layers=layers,
                     dtype=dtype, block_n=block_n)


def resident_bytes(tree) -> int:
  """Bytes a packed tree occupies on its devices (``on_device_size_in_bytes`` of each buffer)."""
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=is_packed):
    total += int(leaf.nbytes) if is_packed(leaf) else packed_matmul.buffer_bytes(leaf)
  return total


def packed_apply(model: nn.Module, packed, *args, method=None, **kwargs):
  """Runs a Linen model whose ``nn.Dense`` kernels are packed (:func:`pack_params`).

  Every ``nn.Dense`` whose ``kernel`` in ``packed["params"]`` is packed
  computes ``kernel.matmul(x) + bias`` in the dtype of ``x``; every other
  module (convolutions included) runs as usual on its dense leaves.

  Args:
    model: the Linen module.
    packed: its variables with packed kernels (``{"params": pack_params(params), ...}``).
    *args, **kwargs, method: forwarded to ``model.apply``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> from ec2t_jax.export import pack_params, packed_apply
    >>> model, x = nn.Dense(3), jnp.arange(10.0).reshape(2, 5)
    >>> kernel = 0.5 * np.array([[1, 0, -1], [0, -1, 1], [1, 1, 0], [-1, 0, 0], [0, 1, 1]])
    >>> params = {"kernel": kernel, "bias": np.ones(3)}
    >>> packed = {"params": pack_params(params, "xla", dtype=jnp.float32)}
    >>> packed_apply(model, packed, x)
    Array([[0.5, 3.5, 3.5],
           [3. , 6. , 6. ]], dtype=float32)
  """
  kernels = {}

  def collect(path, leaf):
    if is_packed(leaf):
      kernels[trees.path_to_str(path)] = leaf

  jax.tree_util.tree_map_with_path(collect, packed.get("params", {}), is_leaf=is_packed)

  def interceptor(next_fun, fn_args, fn_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) is not nn.Dense:
      return next_fun(*fn_args, **fn_kwargs)
    kernel = kernels.get("/".join(module.path + ("kernel",)))
    if kernel is None:
      return next_fun(*fn_args, **fn_kwargs)
    x = jnp.asarray(fn_args[0])
    y = kernel.matmul(x if module.dtype is None else x.astype(module.dtype))
    if module.use_bias:
      y = y + jnp.asarray(module.get_variable("params", "bias"), y.dtype)
    return y

  with nn.intercept_methods(interceptor):
    return model.apply(packed, *args, method=method, **kwargs)


class PackedLayer(NamedTuple):
  """One row of :func:`packed_summary`."""
  path: str
  shape: tuple
  kind: str
  packed_bytes: int
  float32_bytes: int


def packed_summary(tree) -> list[PackedLayer]:
  """One row per packed kernel (a stacked one per layer) with its resident and float32 bytes."""
  rows = []

  def visit(path, leaf):
    name = trees.path_to_str(path)
    if is_packed(leaf):
      rows.append(PackedLayer(name, tuple(leaf.shape), type(leaf).__name__, int(leaf.nbytes),
                              4 * int(np.prod(leaf.shape))))

  jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_packed)
  return rows


def format_summary(tree, route: str) -> str:
  """The text ``python -m ec2t_jax.export --packed`` prints."""
  rows = packed_summary(tree)
  total = resident_bytes(tree)
  packed = sum(r.packed_bytes for r in rows)
  as_float = sum(r.float32_bytes for r in rows)
  lines = [f"{r.path:<40} {str(r.shape):>14} {r.kind:<14} {r.packed_bytes:>10,} B"
           for r in rows]
  lines.append(f"{len(rows)} packed kernels ({route}): {packed:,} B resident "
               f"({as_float:,} B as float32, {as_float / max(packed, 1):.1f}x); "
               f"whole model {total:,} B resident")
  return "\n".join(lines)


__all__ = ["ROUTES", "PackedLayer", "format_summary", "is_packed", "load_packed",
           "pack_params", "packed_apply", "packed_summary", "resident_bytes"]
