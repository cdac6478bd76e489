"""Ternary kernels kept packed in memory, and matmuls that read them packed.

A ternary kernel ``W`` of shape ``[K, N]`` (Flax layout: inputs first) with
per-column values ``{-n_c, 0, p_c}`` (one pair per output column ``c``; a
per-layer pair is the same for every column) is stored as

* its assignment ``a in {-1, 0, 1}^{K x N}`` in a narrow integer form, and
* the scales ``n, p`` (float32, ``[N]`` each),

and every matmul decodes the weights inside the product:

.. math:: y_{m c} = \\sum_k x_{m k} \\, d(a_{k c}), \\qquad
          d(1) = p_c,\\; d(0) = 0,\\; d(-1) = -n_c,

with ``d`` rounded once to the compute dtype (the dtype of ``x``) and the
products accumulated in float32. Two routes:

* :class:`Int4Ternary` (XLA-native): ``a`` as ``jnp.int4`` (4 bits a weight
  where the backend packs ``int4``; XLA's CPU keeps a byte each); the decode is an elementwise prologue of one ``jnp.dot``, which
  XLA may fuse into the GEMM on GPU/TPU.
* :class:`PackedTernary` (Pallas): ``a`` as 2-bit codes, four rows per byte
  (``uint8``), unpacked in registers by a :mod:`jax.experimental.pallas`
  kernel (:func:`pallas_ternary_matmul`); ``interpret=True`` off GPU.

Both compute *the same weights* as :func:`decode_then_matmul` (the
reference: decode to a dense ``[K, N]`` array, then one ``jnp.dot``), so the
XLA route is bit-exact to it and the Pallas route differs only by the order
of the float32 accumulation (exact for integer-valued data).

Byte layout of :class:`PackedTernary` (independent of the block sizes): ``K``
is padded to ``4 R`` rows (``R`` a multiple of ``block_k``; padded rows are
code 0), and byte ``r`` of column ``c`` holds rows ``r, R + r, 2R + r, 3R + r``
in bits ``0-1, 2-3, 4-5, 6-7``, with the 2-bit codes ``0`` (zero), ``1`` (+)
and ``3`` (-). The kernel then multiplies four contiguous slabs of ``x``
(``x[:, jR:(j+1)R]``) with the four unpacked slabs of a byte block. ``N`` is
padded to a multiple of ``block_n`` (padded columns have zero scales and are
sliced off).

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> from ec2t_jax.export import decode_then_matmul, pack_pallas, pack_int4
  >>> w = np.array([[0.5, 0.0], [-0.25, 2.0], [0.0, -2.0]], np.float32)
  >>> x = jnp.array([[1.0, 2.0, 3.0]])
  >>> decode_then_matmul(x, w)
  Array([[ 0., -2.]], dtype=float32)
  >>> pack_int4(w).matmul(x), pack_pallas(w).matmul(x)
  (Array([[ 0., -2.]], dtype=float32), Array([[ 0., -2.]], dtype=float32))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.export import leaf_parts

ROWS_PER_BYTE = 4
CODE_POSITIVE, CODE_NEGATIVE = 1, 3  # 2-bit codes; 0 is zero
GPU_BACKENDS = ("gpu", "cuda", "rocm")


class TernaryColumns(NamedTuple):
  """A ternary ``[K, N]`` kernel split into assignment and per-column scales.

  Attributes:
    assignment: ``int8`` ``[K, N]`` in ``{-1, 0, 1}``.
    w_n: ``float32`` ``[N]``, magnitudes of the negative values (``>= 0``).
    w_p: ``float32`` ``[N]``, the positive values (``>= 0``).
  """
  assignment: np.ndarray
  w_n: np.ndarray
  w_p: np.ndarray


def ternary_columns(kernel, name: str = "kernel") -> TernaryColumns:
  """Splits a ternary kernel (per layer or per output column) into :class:`TernaryColumns`.

  Args:
    kernel: ``[K, N]`` floats holding, in each column ``c``, at most the
      values ``{-n_c, 0, p_c}``.
    name: the layer's name, for the error message.

  Raises:
    ValueError: naming the layer, if a value is not finite, the kernel is not
      2-D, or a column holds more than three values (one scale group).
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"{name}: a packed kernel must be 2-D [in, out], got shape {kernel.shape}")
  if not np.issubdtype(kernel.dtype, np.floating):
    raise ValueError(f"{name}: a packed kernel must be floating point, got {kernel.dtype}")
  finite = np.isfinite(kernel.astype(np.float64))
  if not finite.all():
    bad = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise ValueError(f"{name}: non-finite value {kernel[bad]} at {bad}; its scales would not be "
                     "finite")
  parts = leaf_parts.filter_ternary_parts(kernel, axes=(1,))
  if parts is None:
    counts = [np.unique(kernel[:, c]).size for c in range(kernel.shape[1])]
    column = int(np.argmax(counts))
    raise ValueError(f"{name}: not ternary: output column {column} holds {counts[column]} "
                     "distinct values (at most three per scale group: -n, 0, p)")
  return TernaryColumns(parts.assignment, (-parts.negative).astype(np.float32),
                        parts.positive.astype(np.float32))


def _check_scales(w_n, w_p, name):
  for label, s in (("w_n", w_n), ("w_p", w_p)):
    s = np.asarray(s)
    if not np.isfinite(s).all() or (s < 0).any():
      raise ValueError(f"{name}: scales {label} must be finite and >= 0, got {s[:8]}")


def _decode(codes_pos, codes_neg, w_n, w_p, dtype):
  """``p`` where positive, ``-n`` where negative, else 0; rounded once to ``dtype``."""
  zero = jnp.zeros((), jnp.float32)
  return jnp.where(codes_pos, w_p, jnp.where(codes_neg, -w_n, zero)).astype(dtype)


def _dot(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def decode_then_matmul(x, kernel) -> jax.Array:
  """The reference: ``x @ W`` with ``W`` the dense ternary kernel rounded to ``x.dtype``.

  Args:
    x: ``[..., K]`` activations (their dtype is the compute dtype).
    kernel: ``[K, N]`` ternary kernel (floats), or :class:`TernaryColumns`.

  Returns:
    ``[..., N]`` in ``x.dtype`` (float32 accumulation).
  """
  cols = kernel if isinstance(kernel, TernaryColumns) else ternary_columns(kernel)
  a = jnp.asarray(cols.assignment)
  w = _decode(a > 0, a < 0, jnp.asarray(cols.w_n)[None], jnp.asarray(cols.w_p)[None],
              jnp.asarray(x).dtype)
  return _dot(jnp.asarray(x), w)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "w_n", "w_p"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Int4Ternary:
  """The XLA route: the assignment as ``jnp.int4`` ``[K, N]``, per-column scales ``[N]``."""
  codes: jax.Array
  w_n: jax.Array
  w_p: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.codes.shape)

  @property
  def nbytes(self) -> int:
    """Bytes resident on the device: the codes (4 bits a weight where the backend packs
    ``int4``, 8 on XLA's CPU) plus the scales."""
    return sum(buffer_bytes(a) for a in (self.codes, self.w_n, self.w_p))

  def values(self, dtype=jnp.float32) -> jax.Array:
    """The dense kernel in ``dtype``."""
    return _decode(self.codes > 0, self.codes < 0, self.w_n[None], self.w_p[None], dtype)

  def matmul(self, x) -> jax.Array:
    """``x @ W``: the decode (convert, select) is the GEMM's prologue."""
    x = jnp.asarray(x)
    return _dot(x, self.values(x.dtype))


def pack_int4(kernel, name: str = "kernel") -> Int4Ternary:
  """:class:`Int4Ternary` of a ternary ``[K, N]`` kernel (see :func:`ternary_columns`)."""
  cols = ternary_columns(kernel, name)
  return Int4Ternary(jnp.asarray(cols.assignment, jnp.int4), jnp.asarray(cols.w_n),
                     jnp.asarray(cols.w_p))


def buffer_bytes(array) -> int:
  """Bytes an array occupies on its device (``on_device_size_in_bytes``: XLA's CPU keeps one
  byte per ``int4``, other backends may pack two), else its ``nbytes``."""
  try:
    return int(array.on_device_size_in_bytes())
  except (AttributeError, TypeError, RuntimeError):
    return int(np.asarray(array).nbytes) if not isinstance(array, jax.core.Tracer) else (
        int(array.size * array.dtype.itemsize))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "w_n", "w_p"],
                   meta_fields=["in_features", "out_features", "block_k", "block_n"])
@dataclasses.dataclass(frozen=True)
class PackedTernary:
  """The Pallas route: 2-bit codes, four rows a byte (module docstring), scales ``[1, Np]``.

  Attributes:
    packed: ``uint8`` ``[R, Np]`` (``R`` a multiple of ``block_k``, ``4 R >= K``).
    w_n, w_p: ``float32`` ``[1, Np]`` (zero in padded columns).
    in_features, out_features: ``K`` and ``N`` before padding.
    block_k: packed rows (``4 block_k`` weights) per step of the kernel's loop.
    block_n: output columns per program.
  """
  packed: jax.Array
  w_n: jax.Array
  w_p: jax.Array
  in_features: int
  out_features: int
  block_k: int
  block_n: int

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.out_features)

  @property
  def nbytes(self) -> int:
    """Bytes resident on the device (2 bits a weight, padding included, plus the scales)."""
    return sum(buffer_bytes(a) for a in (self.packed, self.w_n, self.w_p))

  def codes(self) -> jax.Array:
    """The assignment ``int8`` ``[K, N]`` back from the bytes."""
    slabs = [((self.packed.astype(jnp.int32) >> (2 * j)) & 3) for j in range(ROWS_PER_BYTE)]
    c = jnp.concatenate(slabs, axis=0)[:self.in_features, :self.out_features]
    return jnp.where(c == CODE_POSITIVE, 1, jnp.where(c == CODE_NEGATIVE, -1, 0)).astype(jnp.int8)

  def values(self, dtype=jnp.float32) -> jax.Array:
    """The dense kernel in ``dtype``."""
    a = self.codes()
    n = self.out_features
    return _decode(a > 0, a < 0, self.w_n[:, :n], self.w_p[:, :n], dtype)

  def matmul(self, x, *, interpret: Optional[bool] = None) -> jax.Array:
    """``x @ W`` by :func:`pallas_ternary_matmul`."""
    return pallas_ternary_matmul(x, self, interpret=interpret)


def pack_pallas(kernel, name: str = "kernel", *, block_n: Optional[int] = None,
                block_k: Optional[int] = None) -> PackedTernary:
  """:class:`PackedTernary` of a ternary ``[K, N]`` kernel, padded to the kernel's tiles.

  Args:
    kernel: ``[K, N]`` ternary (per layer or per column), or :class:`TernaryColumns`.
    name: the layer's name, for error messages.
    block_n: output columns per program, a power of 2 >= 16 (default: 128, or
      the next power of 2 of ``N`` if smaller).
    block_k: packed rows per loop step, a power of 2 >= 16 (default: the
      largest of 64, 32, 16 that divides ``ceil(K / 4)`` rounded up to 16).

  Raises:
    ValueError: naming the layer, for a non-ternary kernel, non-finite
      scales or block sizes that are not powers of 2 >= 16.
  """
  cols = kernel if isinstance(kernel, TernaryColumns) else ternary_columns(kernel, name)
  _check_scales(cols.w_n, cols.w_p, name)
  k, n = cols.assignment.shape
  quarter = _round_up(-(-k // ROWS_PER_BYTE), 16)
  if block_k is None:
    block_k = next(b for b in (64, 32, 16) if quarter % b == 0)
  if block_n is None:
    block_n = min(128, max(16, _next_power_of_2(n)))
  for label, b in (("block_k", block_k), ("block_n", block_n)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"{name}: {label} must be a power of 2 >= 16 (the GPU kernel's tiles), "
                       f"got {b}")
  rows, cols_padded = _round_up(quarter, block_k), _round_up(n, block_n)
  codes = np.zeros((ROWS_PER_BYTE * rows, cols_padded), np.uint8)
  codes[:k, :n] = np.where(cols.assignment > 0, CODE_POSITIVE,
                           np.where(cols.assignment < 0, CODE_NEGATIVE, 0))
  packed = np.zeros((rows, cols_padded), np.uint8)
  for j in range(ROWS_PER_BYTE):
    packed |= codes[j * rows:(j + 1) * rows] << (2 * j)
  scale = lambda s: np.pad(np.asarray(s, np.float32), (0, cols_padded - n))[None]
  return PackedTernary(jnp.asarray(packed), jnp.asarray(scale(cols.w_n)),
                       jnp.asarray(scale(cols.w_p)), k, n, block_k, block_n)


def _matmul_kernel(x_ref, p_ref, wn_ref, wp_ref, o_ref, *, block_k: int, steps: int):
  """One ``[block_m, block_n]`` output tile: loop over the packed rows, 4 slabs a byte."""
  w_n, w_p = wn_ref[...], wp_ref[...]

  def body(step, acc):
    rows = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    packed = p_ref[rows, :].astype(jnp.int32)
    for j in range(ROWS_PER_BYTE):
      code = (packed >> (2 * j)) & 3
      w = _decode(code == CODE_POSITIVE, code == CODE_NEGATIVE, w_n, w_p, x_ref.dtype)
      acc = acc + jnp.dot(x_ref[j, :, rows], w, preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _gpu_compiler_params(num_warps: int = 4, num_stages: int = 2):
  try:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - depends on the jaxlib build
    return None
  for name in ("CompilerParams", "TritonCompilerParams"):
    params = getattr(plgpu, name, None)
    if params is not None:
      return params(num_warps=num_warps, num_stages=num_stages)
  return None  # pragma: no cover


def pallas_ternary_matmul(x, weight: PackedTernary, *, block_m: Optional[int] = None,
                          interpret: Optional[bool] = None) -> jax.Array:
  """``x @ W`` reading ``W`` packed (2 bits a weight), by a Pallas kernel.

  The grid runs over ``[block_m, block_n]`` output tiles; each program loops
  over the packed rows ``block_k`` at a time, unpacks four ``[block_k,
  block_n]`` slabs of codes with shifts and masks, decodes them to
  ``x.dtype`` with its column scales and accumulates four ``jnp.dot`` in
  float32. ``x`` is zero-padded to ``block_m`` rows and ``4 R`` columns
  (cheap for decoding, where ``x`` is small); the weights are never copied.

  Args:
    x: ``[..., K]``; its dtype is the compute dtype.
    weight: from :func:`pack_pallas`.
    block_m: rows per program (default: the next power of 2 of the rows,
      between 16 and 64).
    interpret: run the kernel in Pallas' interpreter (default: unless the
      backend is a GPU).

  Returns:
    ``[..., N]`` in ``x.dtype``.

  Raises:
    ValueError: if ``x``'s last axis is not ``K`` or the packed tiles do not
      divide the padded shape.
  """
  x = jnp.asarray(x)
  if x.shape[-1] != weight.in_features:
    raise ValueError(f"x has {x.shape[-1]} features, the packed kernel expects "
                     f"{weight.in_features}")
  rows, cols = weight.packed.shape
  if rows % weight.block_k or cols % weight.block_n or weight.w_n.shape != (1, cols):
    raise ValueError(f"packed kernel of shape {(rows, cols)} is not tiled by block_k="
                     f"{weight.block_k}, block_n={weight.block_n} (pack it with pack_pallas)")
  if interpret is None:
    interpret = jax.default_backend() not in GPU_BACKENDS
  lead = x.shape[:-1]
  x2 = x.reshape(-1, weight.in_features)
  m = x2.shape[0]
  if block_m is None:
    block_m = min(64, max(16, _next_power_of_2(m)))
  m_padded = _round_up(m, block_m)
  xp = jnp.pad(x2, ((0, m_padded - m), (0, ROWS_PER_BYTE * rows - weight.in_features)))
  slabs = xp.reshape(m_padded, ROWS_PER_BYTE, rows).transpose(1, 0, 2)  # [4, M, R]
  kernel = functools.partial(_matmul_kernel, block_k=weight.block_k,
                             steps=rows // weight.block_k)
  extra = {}
  if not interpret:
    params = _gpu_compiler_params()
    if params is not None:
      extra["compiler_params"] = params
  out = pl.pallas_call(
      kernel,
      grid=(m_padded // block_m, cols // weight.block_n),
      in_specs=[pl.BlockSpec((ROWS_PER_BYTE, block_m, rows), lambda i, j: (0, i, 0)),
                pl.BlockSpec((rows, weight.block_n), lambda i, j: (0, j)),
                pl.BlockSpec((1, weight.block_n), lambda i, j: (0, j)),
                pl.BlockSpec((1, weight.block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, weight.block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_padded, cols), x.dtype),
      interpret=interpret, **extra,
  )(slabs, weight.packed, weight.w_n, weight.w_p)
  return out[:m, :weight.out_features].reshape(*lead, weight.out_features)
