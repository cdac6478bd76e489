"""Adaptive order-0 coding of codebook indices (format version 2, codec ``cb``).

Symbols ``s`` in ``{0, ..., K-1}`` (``2 <= K <=`` :data:`MAX_ALPHABET`: the
indices of a leaf's distinct values) are range-coded in C order with
``constriction``'s queue coder under an *adaptive* order-0 model: no table is
stored, encoder and decoder start from the same uniform counts (``1/2`` each)
and count the symbols as they go by. Symbols are coded in batches of
``MIN_BATCH, 2 MIN_BATCH, ...`` (at most :data:`entropy_coding.DECODE_CHUNK`),
the counts updated after each batch, so a batch is one coder call with one
categorical model. The probability of symbol ``k`` is

.. math:: p(k) = f + (1 - K f) \\frac{n(k)}{\\sum_j n(j)}, \\qquad f = \\frac{2^{-8}}{K}

(at most ``2^-8`` of the mass is spent on the floor, ``0.0056`` bits per
symbol). After constriction's 24-bit quantization no symbol is more probable
than ``1 - (K - 1)(f - 2^{-24})``, so each costs at least
``c = -log2(1 - (K - 1)(f - 2^{-24}))`` bits (``0.0028`` bits or more for any
``K``) and a stream of ``B`` bytes holds at most ``(8 B + 64) / c`` symbols
(:func:`capacity`), checked before anything is allocated.

Stream: constriction's compressed ``u32`` words, little-endian, to the end.

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export.codebook_coding import encode, decode  # internal
  >>> s = np.random.default_rng(0).integers(0, 5, size=1000)
  >>> data = encode(s, 5)
  >>> assert (decode(data, s.size, 5) == s).all()
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from ec2t_jax._src.export import entropy_coding
from ec2t_jax._src.export.errors import ExportFormatError

MAX_ALPHABET = 256
FLOOR_MASS = 2.0**-8  # K f
MIN_BATCH = 64
_QUANTUM = 2.0**-24  # constriction's probability resolution




def _check_alphabet(alphabet: int) -> None:
  if not 2 <= alphabet <= MAX_ALPHABET:
    raise ValueError(f"alphabet must lie in [2, {MAX_ALPHABET}], got {alphabet}")


def capacity(stream_bytes: int, alphabet: int) -> int:
  """Most symbols a ``cb`` index stream of ``stream_bytes`` bytes can hold.

  Example:
    >>> from ec2t_jax._src.export.codebook_coding import capacity  # internal
    >>> capacity(100, 2) < 400_000
    True
  """
  _check_alphabet(alphabet)
  floor = FLOOR_MASS / alphabet
  least = -math.log2(1.0 - (alphabet - 1) * (floor - _QUANTUM))
  return int((8 * stream_bytes + 64) / least)


def _batches(count: int):
  at, size = 0, MIN_BATCH
  while at < count:
    stop = min(count, at + min(size, entropy_coding.DECODE_CHUNK))
    yield at, stop
    at, size = stop, size * 2


def _model(counts: np.ndarray):
  k = counts.size
  p = FLOOR_MASS / k + (1.0 - FLOOR_MASS) * counts / counts.sum()
  return constriction.stream.model.Categorical(p, perfect=False)


def encode(symbols, alphabet: int) -> bytes:
  """Codes ``symbols`` (any shape, C order) under the adaptive order-0 model.

  Args:
    symbols: integer array, at least one element, values in ``[0, alphabet)``.
    alphabet: ``K``, from 2 to :data:`MAX_ALPHABET`.

  Returns:
    The stream; decoding needs the element count and ``alphabet``.
  """
  _check_alphabet(alphabet)
  s = np.asarray(symbols).reshape(-1)
  if s.size == 0:
    raise ValueError("cannot code an empty array")
  if s.min() < 0 or s.max() >= alphabet:
    raise ValueError(f"symbols must lie in [0, {alphabet})")
  counts = np.full(alphabet, 0.5)
  encoder = constriction.stream.queue.RangeEncoder()
  for start, stop in _batches(s.size):
    encoder.encode(s[start:stop].astype(np.int32), _model(counts))
    counts += np.bincount(s[start:stop], minlength=alphabet)
  return encoder.get_compressed().astype("<u4").tobytes()


def decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
  """Inverse of :func:`encode`.

  Returns:
    ``uint8`` array of ``count`` symbols.

  Raises:
    ExportFormatError: if the stream cannot hold ``count`` symbols (checked
      first), is not a whole number of words, fails to decode, has data left
      over, or is not exactly the encoding of ``count`` symbols (they are
      encoded again and must give back the stream byte for byte: an empty or
      truncated stream is refused).
  """
  _check_alphabet(alphabet)
  if len(data) % 4:
    raise ExportFormatError("codebook index stream is not a whole number of 32-bit words")
  if not 0 < count <= capacity(len(data), alphabet):
    raise ExportFormatError(f"a {len(data):,}-byte codebook index stream cannot hold {count:,} symbols")
  out = np.empty(count, np.uint8)
  counts = np.full(alphabet, 0.5)
  encoder = constriction.stream.queue.RangeEncoder()
  try:
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))
    for start, stop in _batches(count):
      model = _model(counts)
      sym = decoder.decode(model, stop - start)
      encoder.encode(sym, model)  # again, with the same model: the stream must come back
      out[start:stop] = sym
      counts += np.bincount(sym, minlength=alphabet)
    exhausted = decoder.maybe_exhausted()
  except Exception as e:  # constriction raises its own types on invalid data.
    raise ExportFormatError(f"range decoder failed: {e}") from None
  if not exhausted:
    raise ExportFormatError("codebook index stream has data left after the last symbol")
  if encoder.get_compressed().astype("<u4").tobytes() != bytes(data):
    raise ExportFormatError(f"codebook index stream is not the encoding of exactly {count:,} symbols")
  return out
