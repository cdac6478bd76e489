"""Adaptive context coding of ternary assignments and masks (format version 2, codec ``tc``).

Symbols ``s`` in ``{0, ..., K-1}`` (``K = 3`` for ternary assignments ``n, 0,
p``; ``K = 2`` for non-zero masks) of an array are range-coded with
``constriction``'s queue coder under an *adaptive* model: no table is stored,
encoder and decoder both start from the same prior and update the same counts
as symbols go by (as in DeepCABAC-style coders), so richer contexts cost no
model bytes.

Layout. The array's axes are split into *scan* axes and up to two *channel*
axes (for a PyTorch ``OIHW`` kernel: scan ``(H, W)``, channels ``(O, I)``;
for a Flax ``HWIO`` kernel: scan ``(H, W)``, channels ``(O, I)`` too). The
positions of the scan axes are visited in raster order; each position is a
*group*, all its ``prod(channel sizes)`` symbols at once. A symbol's context
only uses earlier groups, so a group decodes in a few vectorized calls:

* ``left``, ``up``: the symbol at the same channels one step back along the
  last / second-last scan axis (``K`` = "none" at the border): for a 3x3
  kernel, the weights to the left of and above it in the same filter slice;
* ``b1``, ``b2``: how active (non-zero symbol) the symbol's channel is along
  each channel axis over the earlier groups, in :data:`DENSITY_BUCKETS` levels
  (0 = no earlier group, then densities split at :data:`DENSITY_EDGES`): dead
  or sparse output filters and input channels.

``context = ((left (K+1) + up) 4 + b1) 4 + b2``, i.e. ``16 (K+1)^2`` contexts.
The layout with no scan and no channel axes is adaptive order 0. The encoder
tries every layout of the array (each choice of channel axes whose scan
positions number at most :data:`MAX_GROUPS`) and keeps the shortest stream.

Probabilities. Every context starts from ``STRENGTH x q0`` pseudo-counts,
``q0`` the array's order-0 frequencies stored in the stream (``K - 1`` u16),
and counts every coded symbol. A group is coded in batches of
``MIN_BATCH, 2 MIN_BATCH, 4 MIN_BATCH, ...`` symbols (at most
:data:`entropy_coding.DECODE_CHUNK`), the counts updated after each batch. The
probability of symbol ``k`` in context ``c`` is

.. math:: p_c(k) = f + (1 - K f) \\frac{n_c(k)}{\\sum_j n_c(j)}, \\qquad f = 2^{-10}

so no symbol is more probable than ``1 - (K - 1) f`` (after constriction's
24-bit quantization, ``+ K 2^{-24}``): each symbol costs at least
``-log2(1 - (K - 1) f - K 2^-24)`` bits (0.0028 bits for ``K = 3``), and a
stream of ``B`` bytes holds at most ``(8 B + 64) / that`` symbols
(:func:`capacity`), checked before anything is allocated.

Stream layout (little-endian)::

    u8                the layout: its index in ``layouts(shape)``
    u16 x (K - 1)     q0 (65535 ths; the last symbol's share is implied)
    u32 words[...]    constriction's compressed words, to the end

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export.context_coding import encode, decode  # internal
  >>> s = np.random.default_rng(0).integers(0, 3, size=(8, 4, 3, 3))
  >>> data = encode(s, 3)
  >>> assert (decode(data, s.shape, 3) == s).all()
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Optional

import constriction
import numpy as np

from ec2t_jax._src.export import entropy_coding
from ec2t_jax._src.export.errors import ExportFormatError

FLOOR = 2.0**-10
STRENGTH = 8.0
MIN_BATCH = 256
MAX_GROUPS = 16  # scan positions: one group costs a few decoder calls
DENSITY_EDGES = (0.15, 0.4)
DENSITY_BUCKETS = len(DENSITY_EDGES) + 2
_TOTAL = 65535
_QUANTUM = 2.0**-24  # constriction's probability resolution
_ZERO_SYMBOL = {2: 0, 3: 1}  # the "inactive" symbol: mask 0, ternary 0




class Layout(NamedTuple):
  """Scan axes (visited in raster order) and channel axes (coded together)."""
  scan: tuple[int, ...]
  channels: tuple[int, ...]


def capacity(stream_bytes: int, alphabet: int) -> int:
  """Most symbols a ``tc`` stream of ``stream_bytes`` bytes can hold (module docstring).

  Example:
    >>> from ec2t_jax._src.export.context_coding import capacity  # internal
    >>> capacity(100, 3)
    306298
  """
  least = -math.log2(1.0 - (alphabet - 1) * FLOOR - alphabet * _QUANTUM)
  return int((8 * stream_bytes + 64) / least)


def layouts(shape) -> tuple[Layout, ...]:
  """Every layout :func:`encode` tries for an array of ``shape``, in stream-index order.

  Order 0 first, then each choice of one or two channel axes (in
  ``itertools.combinations`` order) with ``1 < scan positions <= MAX_GROUPS``.

  Example:
    >>> from ec2t_jax._src.export.context_coding import layouts  # internal
    >>> [tuple(l.channels) for l in layouts((64, 32, 3, 3))]
    [(), (0, 1)]
  """
  return _layouts(tuple(int(n) for n in shape))


@functools.lru_cache(maxsize=256)
def _layouts(shape: tuple[int, ...]) -> tuple[Layout, ...]:
  out = [Layout((), ())]
  ndim = len(shape)
  for count in (1, 2):
    for channels in itertools.combinations(range(ndim), count):
      scan = tuple(a for a in range(ndim) if a not in channels)
      groups = math.prod(shape[a] for a in scan)
      if scan and 1 < groups <= MAX_GROUPS and math.prod(shape) > groups:
        out.append(Layout(scan, channels))
  return tuple(out)


def _order0_table(symbols: np.ndarray, alphabet: int) -> np.ndarray:
  flat = symbols.reshape(-1)
  counts = np.zeros(alphabet, np.int64)
  # In chunks: bincount copies its input to intp, 8 bytes per symbol at once otherwise.
  for start in range(0, flat.size, entropy_coding.DECODE_CHUNK):
    counts += np.bincount(flat[start:start + entropy_coding.DECODE_CHUNK], minlength=alphabet)
  counts = counts.astype(np.float64)
  table = np.floor(_TOTAL * counts / max(counts.sum(), 1)).astype(np.int64)
  return table[:-1]


def _buckets(active: np.ndarray, seen: int, per_group: int) -> np.ndarray:
  """Density level of each channel: 0 before any group, then 1 + edges passed."""
  if seen == 0:
    return np.zeros(active.shape, np.int64)
  level = 1 + (active >= DENSITY_EDGES[0] * (seen * per_group)).astype(np.int64)
  for edge in DENSITY_EDGES[1:]:
    level += active >= edge * (seen * per_group)
  return level


class _Model:
  """The shared state of encoder and decoder: counts, contexts, batches."""

  def __init__(self, shape, alphabet: int, layout: Layout, table: np.ndarray):
    self.k = alphabet
    self.zero = _ZERO_SYMBOL[alphabet]
    if layout.scan:
      self.scan_shape = tuple(shape[a] for a in layout.scan)
      self.chan_shape = tuple(shape[a] for a in layout.channels)
      self.perm = layout.scan + layout.channels
    else:  # order 0: one group of everything, no contexts
      self.scan_shape, self.chan_shape = (), tuple(shape)
      self.perm = tuple(range(len(shape)))
    self.groups = math.prod(self.scan_shape)
    self.width = math.prod(self.chan_shape)
    q0 = np.append(table, _TOTAL - table.sum()).astype(np.float64)
    prior = STRENGTH * (q0 + 1) / (_TOTAL + alphabet)
    self.contexts = 16 * (alphabet + 1) ** 2
    self.counts = np.tile(prior, (self.contexts, 1))
    self.totals = self.counts.sum(axis=1)
    self.table = np.empty_like(self.counts)
    self._refresh()
    self.active = [np.zeros(n, np.int64) for n in self.chan_shape] if layout.scan else []

  def _refresh(self) -> None:
    np.multiply(self.counts, ((1.0 - self.k * FLOOR) / self.totals)[:, None], out=self.table)
    self.table += FLOOR

  def group_contexts(self, grid: np.ndarray, g: int) -> np.ndarray:
    """Contexts of group ``g``'s symbols; ``grid`` is ``(groups, width)`` symbols so far."""
    if not self.scan_shape:  # one context for all: a read-only view, no 8 bytes per symbol
      return np.broadcast_to(np.zeros(1, np.int64), (self.width,))
    k1 = self.k + 1
    last = self.scan_shape[-1]
    ctx = np.empty(self.width, np.int64)
    if g % last:
      np.multiply(grid[g - 1], k1, out=ctx)
    else:
      ctx.fill(self.k * k1)
    if len(self.scan_shape) > 1 and (g // last) % self.scan_shape[-2]:
      ctx += grid[g - self.scan_shape[-1]]
    else:
      ctx += self.k
    levels = [_buckets(a, g, self.width // n) for a, n in zip(self.active, self.chan_shape)]
    levels += [np.zeros(1, np.int64)] * (2 - len(levels))
    if len(self.chan_shape) == 2:
      channel = np.add.outer(levels[0] * DENSITY_BUCKETS, levels[1]).reshape(-1)
    else:
      channel = levels[0] * DENSITY_BUCKETS
    ctx *= DENSITY_BUCKETS * DENSITY_BUCKETS
    ctx += channel
    return ctx

  def probabilities(self, ctx: np.ndarray) -> np.ndarray:
    return self.table.take(ctx, axis=0)

  def update(self, ctx: np.ndarray, symbols: np.ndarray) -> None:
    """Counts ``symbols`` in their contexts."""
    joint = ctx * self.k + symbols
    added = np.bincount(joint, minlength=self.contexts * self.k).reshape(self.contexts, self.k)
    self.counts += added
    self.totals += added.sum(axis=1)
    self._refresh()

  def finish_group(self, row: np.ndarray) -> None:
    if not self.active:
      return
    on = (row != self.zero).reshape(self.chan_shape)
    if len(self.active) == 1:
      self.active[0] += on
    else:
      self.active[0] += on.sum(axis=1, dtype=np.int64)
      self.active[1] += on.sum(axis=0, dtype=np.int64)

  def batches(self, g: int):
    """``(start, stop)`` of each batch of group ``g``: sizes double from :data:`MIN_BATCH`."""
    at, size = 0, MIN_BATCH
    while at < self.width:
      stop = min(self.width, at + min(size, entropy_coding.DECODE_CHUNK))
      yield at, stop
      at, size = stop, size * 2


def _header(shape, layout: Layout, table: np.ndarray) -> bytes:
  return bytes([layouts(shape).index(layout)]) + table.astype("<u2").tobytes()


def encode_layout(symbols: np.ndarray, alphabet: int, layout: Layout) -> bytes:
  """The ``tc`` stream of ``symbols`` under one layout."""
  s = np.asarray(symbols)
  table = _order0_table(s, alphabet)
  model = _Model(s.shape, alphabet, layout, table)
  grid = np.ascontiguousarray(s.astype(np.int8, copy=False).transpose(model.perm))
  grid = grid.reshape(model.groups, model.width)
  encoder = constriction.stream.queue.RangeEncoder()
  family = constriction.stream.model.Categorical(perfect=False)
  for g in range(model.groups):
    ctx = model.group_contexts(grid, g)
    row = grid[g]
    for start, stop in model.batches(g):
      c, sym = ctx[start:stop], row[start:stop]
      encoder.encode(sym.astype(np.int32), family, model.probabilities(c))
      model.update(c, sym)
    model.finish_group(row)
  return _header(s.shape, layout, table) + encoder.get_compressed().astype("<u4").tobytes()


def encode(symbols, alphabet: int, layout: Optional[Layout] = None) -> bytes:
  """Context-codes ``symbols`` under the best (or the given) layout.

  Args:
    symbols: integer array, any shape, at least one element, values in
      ``[0, alphabet)``.
    alphabet: ``K``, 2 or 3.
    layout: a :class:`Layout`; by default every one of :func:`layouts` is
      tried and the shortest stream kept.

  Returns:
    The stream (module docstring). Decoding needs the shape and ``alphabet``.
  """
  if alphabet not in _ZERO_SYMBOL:
    raise ValueError(f"alphabet must be 2 or 3, got {alphabet}")
  s = np.asarray(symbols)
  if s.size == 0:
    raise ValueError("cannot context-code an empty array")
  if s.min() < 0 or s.max() >= alphabet:
    raise ValueError(f"symbols must lie in [0, {alphabet})")
  candidates = [layout] if layout is not None else layouts(s.shape)
  return min((encode_layout(s, alphabet, c) for c in candidates), key=len)


def _parse_layout(data: bytes, shape) -> tuple[Layout, int]:
  options = layouts(shape)
  if not data or data[0] >= len(options):
    raise ExportFormatError(f"context-coded stream names layout {data[:1].hex() or 'none'}, "
                      f"shape {shape} has {len(options)}")
  return options[data[0]], 1


def _stream_table(data: bytes, shape, alphabet: int) -> tuple[Layout, np.ndarray, int]:
  """Checks a stream's head against ``shape``: ``(layout, order-0 table, start of the words)``."""
  size = math.prod(shape)
  if len(shape) > 255:
    raise ExportFormatError(f"context coding supports at most 255 axes, got {len(shape)}")
  layout, offset = _parse_layout(data, shape)
  table_bytes = 2 * (alphabet - 1)
  words = len(data) - offset - table_bytes
  if words < 0 or words % 4:
    raise ExportFormatError("context-coded stream has a truncated table or payload")
  if size > capacity(len(data), alphabet):
    raise ExportFormatError(f"a {len(data):,}-byte context-coded stream cannot hold {size:,} symbols")
  if size == 0:
    raise ExportFormatError("context-coded stream for an empty array")
  table = np.frombuffer(data, "<u2", count=alphabet - 1, offset=offset).astype(np.int64)
  if table.sum() > _TOTAL:
    raise ExportFormatError("context-coded stream has an invalid order-0 table")
  return layout, table, offset + table_bytes


def _decode_and_reencode(model: _Model, compressed: np.ndarray) -> tuple[np.ndarray, bytes, bool]:
  """Decodes the ``(groups, width)`` grid and encodes it again with the same probabilities.

  Returns:
    ``(grid, the re-encoded words, whether the decoder may be exhausted)``.
  """
  grid = np.empty((model.groups, model.width), np.int8)
  family = constriction.stream.model.Categorical(perfect=False)
  decoder = constriction.stream.queue.RangeDecoder(compressed)
  encoder = constriction.stream.queue.RangeEncoder()
  for g in range(model.groups):
    ctx = model.group_contexts(grid, g)
    row = grid[g]
    for start, stop in model.batches(g):
      c = ctx[start:stop]
      probabilities = model.probabilities(c)
      sym = decoder.decode(family, probabilities)
      encoder.encode(sym, family, probabilities)
      row[start:stop] = sym
      model.update(c, sym)
    model.finish_group(row)
  return grid, encoder.get_compressed().astype("<u4").tobytes(), decoder.maybe_exhausted()


def decode(data: bytes, shape, alphabet: int) -> np.ndarray:
  """Inverse of :func:`encode`.

  Args:
    data: the stream.
    shape: the array's shape.
    alphabet: ``K`` used when encoding.

  Returns:
    ``int8`` array of ``shape``.

  Raises:
    ExportFormatError: if the stream is malformed, cannot hold ``prod(shape)``
      symbols (checked first), or is not exactly :func:`encode_layout`'s
      stream of the symbols it decodes to: each batch is encoded again with
      the probabilities it was decoded with, and the words and the order-0
      table must come back byte for byte (so a stream holding fewer or more
      symbols than ``shape`` declares is refused).
  """
  shape = tuple(int(n) for n in shape)
  size = math.prod(shape)
  layout, table, start = _stream_table(data, shape, alphabet)
  model = _Model(shape, alphabet, layout, table)
  words = bytes(data[start:])
  try:
    grid, again, exhausted = _decode_and_reencode(model, np.frombuffer(words, "<u4").astype(np.uint32))
  except Exception as e:  # constriction raises its own types on invalid data.
    raise ExportFormatError(f"range decoder failed: {e}") from None
  if not exhausted:
    raise ExportFormatError("context-coded stream has data left after the last symbol")
  if again != words or not np.array_equal(_order0_table(grid, alphabet), table):
    raise ExportFormatError(f"context-coded stream is not the encoding of exactly {size:,} symbols")
  inverse = np.argsort(model.perm)
  return np.ascontiguousarray(
      grid.reshape(model.scan_shape + model.chan_shape).transpose(inverse)).reshape(shape)
