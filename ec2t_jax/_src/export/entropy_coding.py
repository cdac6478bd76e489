"""Lossless entropy coding of small-alphabet symbol arrays (ternary assignments, masks).

Symbols ``s`` (integers in ``{0, ..., K-1}``, ``K <= 16``) of an array of any
shape are range-coded with ``constriction``'s queue coder
(``constriction.stream.queue.RangeEncoder``) under one of two semi-static
models, whichever gives the shorter stream:

* **order 0** - one categorical distribution for the whole array;
* **previous-symbol context** - the array is viewed as ``(outer, mid, inner)``
  by cutting its shape at two axes ``a < b`` (``mid = prod(shape[a:b])``) and
  the symbol at ``(o, m, i)`` is coded with the distribution of its context
  ``c = s[o, m-1, i]`` (``c = K``, "start", when ``m = 0``). For a PyTorch
  conv kernel ``OIHW`` with ``(a, b) = (2, 4)`` the context is the previous
  weight of the same ``3x3`` kernel; for a Flax ``HWIO`` kernel ``(0, 2)`` is
  the same thing. All cuts with ``1 < mid <= 4096`` are tried.

The code length of a model is its conditional empirical entropy

.. math:: L = -\\sum_j \\log_2 q_{c_j}(s_j) + 16 (C (K - 1)) \\text{ bits}

with ``q`` the quantized table of ``C`` contexts (``C = 1`` or ``K + 1``), so
the chosen stream is never longer than the order-0 one by more than a few
bytes of coder overhead, and the order-0 one stays within a few bytes of
``numel * H_0`` (the zeroth-order entropy).

Decoding is vectorized over ``outer * inner`` symbols: one call per ``m``,
split into chunks of at most :data:`DECODE_CHUNK` symbols written into one
preallocated ``int8`` array (bounded working memory).

Capacity bound. ``constriction``'s ``Categorical(perfect=False)`` quantizes
probabilities to 24 bits and gives every symbol at least one quantum
(``f = 2^-24``), so no symbol is more probable than ``1 - (K - 1) f`` and
each costs at least ``c = -log2(1 - (K - 1) f)`` bits (1.72e-7 bits for
``K = 3``). A range coder's output is at least the total cost less its
64-bit state, so a stream of ``B`` bytes encodes at most
``(8 B + 64) / c`` symbols (:func:`max_symbols`); a reader rejects a
declared count above it before allocating anything.

Stream layout (all little-endian)::

    u8  model        0 = order 0, 1 = previous-symbol context
    u8  a, u8 b      the cut (0, 0 for order 0)
    u16 table[C][K-1]  quantized probabilities, each row sums to 65535 with the
                       last entry implied (it must be >= 0)
    u32 words[...]   constriction's compressed words, to the end of the stream

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export.entropy_coding import encode_symbols, decode_symbols  # internal
  >>> s = np.random.default_rng(0).integers(0, 3, size=(16, 16, 3, 3))
  >>> data = encode_symbols(s, 3)
  >>> assert (decode_symbols(data, s.shape, 3) == s).all()
"""

from __future__ import annotations

import math
from typing import NamedTuple

import constriction
import numpy as np

from ec2t_jax._src.export.errors import ExportFormatError

_TOTAL = 65535  # quantized probabilities of one context sum to this
_MAX_STEPS = 4096  # largest ``mid`` tried (one decoder call per step)
_MAX_ALPHABET = 16
ORDER0, PREVIOUS = 0, 1
PROBABILITY_FLOOR = 2.0**-24  # constriction's leaky categorical: one 24-bit quantum
DECODE_CHUNK = 1 << 16  # symbols per decoder call
_STATE_BITS = 64


def min_symbol_bits(alphabet: int, floor: float = PROBABILITY_FLOOR) -> float:
  """Least cost of one symbol, ``-log2(1 - (K - 1) floor)`` bits.

  Example:
    >>> from ec2t_jax._src.export.entropy_coding import min_symbol_bits  # internal
    >>> round(min_symbol_bits(3) * 1e7, 3)
    1.72
  """
  return -math.log2(1.0 - (alphabet - 1) * floor)


def max_symbols(stream_bytes: int, alphabet: int, floor: float = PROBABILITY_FLOOR) -> int:
  """Most symbols a range-coded stream of ``stream_bytes`` bytes can hold.

  .. math:: n \\le \\frac{8 B + 64}{-\\log_2(1 - (K - 1) f)}

  Example:
    >>> from ec2t_jax._src.export.entropy_coding import max_symbols  # internal
    >>> max_symbols(4, 3, floor=2.0**-8) < 20_000
    True
  """
  return int((8 * stream_bytes + _STATE_BITS) / min_symbol_bits(alphabet, floor))




class ModelChoice(NamedTuple):
  """A model for :func:`encode_symbols`: kind, cut ``(a, b)``, estimated bits."""
  kind: int
  cut: tuple[int, int]
  bits: float


def _view(shape, cut) -> tuple[int, int, int]:
  a, b = cut
  return (math.prod(shape[:a]), math.prod(shape[a:b]), math.prod(shape[b:]))


def _contexts(x: np.ndarray, alphabet: int) -> np.ndarray:
  """Context of each symbol of ``x`` viewed as ``(mid, outer*inner)``."""
  ctx = np.empty_like(x)
  ctx[0] = alphabet
  ctx[1:] = x[:-1]
  return ctx


def _quantize(counts: np.ndarray) -> np.ndarray:
  """Rows of counts -> integer tables summing to ``_TOTAL``; seen symbols >= 1."""
  counts = np.asarray(counts, np.float64)
  table = np.zeros(counts.shape, np.int64)
  for row, count in enumerate(counts):
    total = count.sum()
    if total == 0:  # unused context: any valid row
      q = np.full(count.shape, _TOTAL // count.size, np.int64)
    else:
      q = np.where(count > 0, np.maximum(1, np.round(_TOTAL * count / total)), 0).astype(np.int64)
    q[np.argmax(q)] += _TOTAL - q.sum()
    table[row] = q
  return table


def _cost_bits(counts: np.ndarray, table: np.ndarray) -> float:
  """Ideal code length of ``counts`` under the quantized ``table``."""
  with np.errstate(divide="ignore"):
    log_q = np.log2(np.maximum(table, 1) / _TOTAL)
  return float(-(counts * log_q).sum()) + 16.0 * table.shape[0] * (table.shape[1] - 1)


def _counts(x: np.ndarray, alphabet: int, contextual: bool) -> np.ndarray:
  if not contextual:
    return np.bincount(x.ravel(), minlength=alphabet)[None, :]
  joint = _contexts(x.astype(np.int16), alphabet) * alphabet + x  # < 17 * 16: fits int16
  return np.bincount(joint.ravel(), minlength=(alphabet + 1) * alphabet).reshape(
      alphabet + 1, alphabet)


def choose_model(symbols: np.ndarray, alphabet: int) -> ModelChoice:
  """Picks the model (order 0 or a context cut) with the shortest code.

  Args:
    symbols: integer array with values in ``[0, alphabet)``.
    alphabet: ``K``.

  Returns:
    The :class:`ModelChoice` with the smallest estimated size in bits.
  """
  s = np.asarray(symbols)
  counts = _counts(s, alphabet, False)
  best = ModelChoice(ORDER0, (0, 0), _cost_bits(counts, _quantize(counts)))
  shape = s.shape
  for a in range(len(shape)):
    for b in range(a + 1, len(shape) + 1):
      outer, mid, inner = _view(shape, (a, b))
      if not 1 < mid <= _MAX_STEPS:
        continue
      x = s.reshape(outer, mid, inner).transpose(1, 0, 2).reshape(mid, -1)
      counts = _counts(x, alphabet, True)
      bits = _cost_bits(counts, _quantize(counts))
      if bits < best.bits:
        best = ModelChoice(PREVIOUS, (a, b), bits)
  return best


def encode_symbols(symbols, alphabet: int, model: ModelChoice | None = None) -> bytes:
  """Range-codes ``symbols`` under the best (or the given) model.

  Args:
    symbols: integer array, any shape, values in ``[0, alphabet)``.
    alphabet: ``K``, ``2 <= K <= 16``.
    model: a :class:`ModelChoice`; by default :func:`choose_model`'s.

  Returns:
    The self-describing stream (see the module docstring). Decoding needs the
    array's shape and ``alphabet``.
  """
  if not 2 <= alphabet <= _MAX_ALPHABET:
    raise ValueError(f"alphabet must be in [2, {_MAX_ALPHABET}], got {alphabet}")
  s = np.asarray(symbols)
  if s.size == 0:
    raise ValueError("cannot entropy-code an empty array")
  if s.min() < 0 or s.max() >= alphabet:
    raise ValueError(f"symbols must lie in [0, {alphabet})")
  s = s.astype(np.int8, copy=False)  # symbols < 16; batches are widened one at a time
  model = model or choose_model(s, alphabet)
  contextual = model.kind == PREVIOUS
  outer, mid, inner = _view(s.shape, model.cut) if contextual else (1, 1, s.size)
  x = s.reshape(outer, mid, inner).transpose(1, 0, 2).reshape(mid, -1)
  table = _quantize(_counts(x, alphabet, contextual))
  probabilities = table.astype(np.float64) / _TOTAL
  encoder = constriction.stream.queue.RangeEncoder()
  family = constriction.stream.model.Categorical(perfect=False)
  if contextual:
    previous = np.full(x.shape[1], alphabet, np.int8)
    for row in x:  # in chunks, as decoded: the same stream as one call, bounded memory
      for at in range(0, row.size, DECODE_CHUNK):
        chunk = slice(at, at + DECODE_CHUNK)
        encoder.encode(row[chunk].astype(np.int32), family, probabilities[previous[chunk]])
      previous = row
  else:
    order0 = constriction.stream.model.Categorical(probabilities[0], perfect=False)
    flat = x.reshape(-1)
    for at in range(0, flat.size, DECODE_CHUNK):
      encoder.encode(flat[at:at + DECODE_CHUNK].astype(np.int32), order0)
  head = bytes([model.kind, *model.cut]) + table[:, :-1].astype("<u2").tobytes()
  return head + encoder.get_compressed().astype("<u4").tobytes()


class _Head(NamedTuple):
  """A parsed stream head: the model, its view of the array, its stored table."""
  model: ModelChoice
  view: tuple[int, int, int]  # (outer, mid, inner)
  table: np.ndarray  # (C, K) quantized, the last column implied
  start: int  # where the words begin


def _parse_head(data: bytes, shape: tuple[int, ...], alphabet: int) -> _Head:
  size = math.prod(shape)
  if len(data) < 3:
    raise ExportFormatError("symbol stream too short")
  kind, a, b = data[0], data[1], data[2]
  if kind == ORDER0 and (a, b) == (0, 0):
    contexts, view = 1, (1, 1, size)
  elif kind == PREVIOUS and 0 <= a < b <= len(shape):
    contexts, view = alphabet + 1, _view(shape, (a, b))
    if not 1 < view[1] <= _MAX_STEPS:
      raise ExportFormatError(f"symbol stream has an invalid context cut ({a}, {b})")
  else:
    raise ExportFormatError(f"symbol stream has an unknown model ({kind}, {a}, {b})")
  start = 3 + 2 * contexts * (alphabet - 1)
  if len(data) < start or (len(data) - start) % 4:
    raise ExportFormatError("symbol stream has a truncated table or payload")
  head = np.frombuffer(data, "<u2", count=contexts * (alphabet - 1), offset=3)
  head = head.reshape(contexts, alphabet - 1).astype(np.int64)
  last = _TOTAL - head.sum(axis=1, keepdims=True)
  if (last < 0).any():
    raise ExportFormatError("symbol stream has an invalid probability table")
  if size > max_symbols(len(data) - start, alphabet):
    raise ExportFormatError(f"a {len(data)}-byte symbol stream cannot hold {size:,} symbols")
  table = np.concatenate([head, last], axis=1)
  return _Head(ModelChoice(kind, (a, b), 0.0), view, table, start)


def _decode_order0(decoder, encoder, probabilities: np.ndarray, size: int) -> np.ndarray:
  model = constriction.stream.model.Categorical(probabilities[0], perfect=False)
  out = np.empty(size, np.int8)
  for at in range(0, size, DECODE_CHUNK):
    sym = decoder.decode(model, min(DECODE_CHUNK, size - at))
    encoder.encode(sym, model)
    out[at:at + sym.size] = sym
  return out[None, :]


def _decode_contextual(decoder, encoder, probabilities: np.ndarray, mid: int, width: int,
                       alphabet: int) -> np.ndarray:
  family = constriction.stream.model.Categorical(perfect=False)
  out = np.empty((mid, width), np.int8)
  previous = np.full(width, alphabet, np.int8)
  for m in range(mid):
    row = out[m]
    for at in range(0, width, DECODE_CHUNK):
      chunk = probabilities[previous[at:at + DECODE_CHUNK]]
      sym = decoder.decode(family, chunk)
      encoder.encode(sym, family, chunk)
      row[at:at + sym.size] = sym
    previous = row
  return out


def decode_symbols(data: bytes, shape, alphabet: int) -> np.ndarray:
  """Inverse of :func:`encode_symbols`: the ``int8`` array of ``shape`` from the
  stream ``data`` of ``alphabet`` (``K``) symbols.

  Raises:
    ExportFormatError: if the stream is malformed or is not exactly
      :func:`encode_symbols`' stream of the ``prod(shape)`` symbols it decodes
      to under its model: each chunk is encoded again with the probabilities
      it was decoded with, and the words and the table must come back byte for
      byte (so a stream holding fewer or more symbols is refused).
  """
  shape = tuple(int(n) for n in shape)
  size = math.prod(shape)
  head = _parse_head(data, shape, alphabet)
  outer, mid, inner = head.view
  probabilities = head.table.astype(np.float64) / _TOTAL
  words = bytes(data[head.start:])
  encoder = constriction.stream.queue.RangeEncoder()
  try:
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, "<u4").astype(np.uint32))
    if head.model.kind == ORDER0:
      x = _decode_order0(decoder, encoder, probabilities, size)
    else:
      x = _decode_contextual(decoder, encoder, probabilities, mid, outer * inner, alphabet)
  except Exception as e:  # constriction raises its own types on invalid data.
    raise ExportFormatError(f"range decoder failed: {e}") from None
  table = _quantize(_counts(x, alphabet, head.model.kind == PREVIOUS))
  if (encoder.get_compressed().astype("<u4").tobytes() != words
      or not np.array_equal(table, head.table)):
    raise ExportFormatError(f"symbol stream is not the encoding of exactly {size:,} symbols")
  return np.ascontiguousarray(x.reshape(mid, outer, inner).transpose(1, 0, 2)).reshape(shape)
