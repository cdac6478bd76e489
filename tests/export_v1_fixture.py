"""The tree stored in ``tests/data/export_v1.ec2t`` (format version 1), rebuilt without randomness.

The file was written once by the version-1 writer (``packing.pack(v1_tree())``
at commit b461c57) and is committed so that the version-1 decoder stays tested
after the format moved on. Every leaf is a deterministic function of its index,
so the expected tree needs no random-number stream.
"""

import numpy as np


def _pattern(n: int, modulus: int, mult: int = 7919, add: int = 17) -> np.ndarray:
  return (np.arange(n, dtype=np.int64) * mult + add) % modulus


def _scrambled(n: int, seed: int) -> np.ndarray:
  """``n`` integers in ``[0, 2**32)`` from an integer hash (exact on every platform)."""
  x = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(2654435761)
  x = (x ^ (x >> np.uint64(15))) * np.uint64(2246822519) % np.uint64(2**32)
  return x ^ (x >> np.uint64(13))


def v1_tree():
  """Leaves that make the version-1 writer use each of its six codecs."""
  # A ternary conv kernel (HWIO 3x3x8x16) with runs along the output axis: ``te``.
  a = _pattern(3 * 3 * 8 * 16, 11)
  a = np.where(a < 2, -1, np.where(a > 8, 1, 0)).reshape(3, 3, 8, 16)
  a[..., 8:] = a[..., :8]  # repeated halves: context coding pays off
  kernel = np.where(a > 0, np.float32(0.125), np.where(a < 0, np.float32(-0.0625),
                                                      np.float32(0))).astype(np.float32)
  sparse = np.zeros(1000, np.float32)
  sparse[_pattern(40, 1000, 37, 3)] = (_scrambled(40, 1).astype(np.float32) + 1) / 2**20
  half = np.where(_scrambled(64, 2) % 2 == 0,
                  (_scrambled(64, 3).astype(np.float32) + 1) / 2**24, 0).astype(np.float32)
  b = _scrambled(3000, 4) % 10
  vector = np.where(b == 0, np.float32(-0.5), np.where(b == 1, np.float32(0.75),
                                                     np.float32(-0.0))).astype(np.float32)
  return {
      "conv": {"kernel": kernel, "bias": np.linspace(-1, 1, 16).astype(np.float32)},
      "te0": vector,
      "tb": np.array([0.5, 0, -0.25, 0.5, 0, 0.5, -0.25, 0], np.float32),
      "zs": np.full(64, 1.5, np.float32),
      "layers": [{"scale": np.float32(2.5)}, None],
      "stats": (np.arange(3, dtype=np.int64), np.array([-0.0, 1.0], np.float64)),
      1: {"se": sparse, "sb": half},
  }
