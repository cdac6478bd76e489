"""One interface over the three symbol coders: encode, decode, capacity.

The record codecs (:mod:`record_codecs`) code small-alphabet symbol arrays
(ternary assignments, non-zero masks, codebook indices) through a
:class:`SymbolCoder`; three implement it:

* :data:`SEMI_STATIC` - :mod:`entropy_coding` (format version 1's ``te`` /
  ``se``): a stored order-0 or previous-symbol table, ``K <= 16``;
* :data:`CONTEXT` - :mod:`context_coding` (version 2's ``tc`` / ``sc`` /
  ``tf``): adaptive neighbour and channel-density contexts, ``K`` 2 or 3;
* :data:`CODEBOOK` - :mod:`codebook_coding` (version 2's ``cb``): adaptive
  order 0 in C order, ``2 <= K <= 256``.

Every ``decode`` returns exactly ``prod(shape)`` symbols or raises
:class:`ExportFormatError`: each decoded batch is encoded again with the
probabilities it was decoded with, and the stream must come back byte for byte
(encoding is deterministic), so a stream holding
fewer or more symbols than the shape declares is refused whether or not the
record carries a CRC. One case no reader can refuse: the coders' last 32-bit
word leaves slack, so a stream can be at once the exact encoding of ``n`` and
of ``n + k`` symbols (measured on streams of 100, 2,048 and 5,000 random
symbols, seeds 0-5, declared ``n - 2, n - 1, n + 1, n + 2, n + 10``: 69 of 90
``cb`` cases are exact encodings of the other count too, 0 of 90 ``tc``
cases); such a stream *is* what the writer writes for that count, and the CRC
the writer always adds tells the two apart.
``capacity(B, K)`` is the most symbols a ``B``-byte stream
can hold (each coder's probability floor), checked before anything is
allocated.

Example:
  >>> s = np.array([[0, 1, 2], [2, 1, 0]])
  >>> all((c.decode(c.encode(s, 3), s.shape, 3) == s).all()
  ...     for c in (SEMI_STATIC, CONTEXT, CODEBOOK))
  True
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import entropy_coding


class SymbolCoder(Protocol):
  """Codes integer symbols in ``[0, K)`` of an array of a known shape."""

  name: str

  def encode(self, symbols: np.ndarray, alphabet: int) -> bytes:
    """The stream of ``symbols`` (any shape, at least one element)."""

  def decode(self, data: bytes, shape: tuple[int, ...], alphabet: int) -> np.ndarray:
    """Exactly ``prod(shape)`` symbols of ``shape``, or :class:`ExportFormatError`."""

  def capacity(self, stream_bytes: int, alphabet: int) -> int:
    """Most symbols a stream of ``stream_bytes`` bytes can hold."""


class _SemiStatic:
  name = "semi-static"

  def encode(self, symbols, alphabet):
    return entropy_coding.encode_symbols(symbols, alphabet)

  def decode(self, data, shape, alphabet):
    return entropy_coding.decode_symbols(data, shape, alphabet)

  def capacity(self, stream_bytes, alphabet):
    return entropy_coding.max_symbols(stream_bytes, alphabet)


class _Context:
  name = "context"

  def encode(self, symbols, alphabet):
    return context_coding.encode(symbols, alphabet)

  def decode(self, data, shape, alphabet):
    return context_coding.decode(data, shape, alphabet)

  def capacity(self, stream_bytes, alphabet):
    return context_coding.capacity(stream_bytes, alphabet)


class _Codebook:
  name = "codebook"

  def encode(self, symbols, alphabet):
    return codebook_coding.encode(symbols, alphabet)

  def decode(self, data, shape, alphabet):
    shape = tuple(int(n) for n in shape)
    return codebook_coding.decode(data, math.prod(shape), alphabet).reshape(shape)

  def capacity(self, stream_bytes, alphabet):
    return codebook_coding.capacity(stream_bytes, alphabet)


SEMI_STATIC: SymbolCoder = _SemiStatic()
CONTEXT: SymbolCoder = _Context()
CODEBOOK: SymbolCoder = _Codebook()
