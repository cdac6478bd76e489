"""What values a method's quantized layers may hold: checks on host arrays.

A :class:`Grid` is what the method registry says about a method's result:
how many distinct values a layer (or each output filter) may hold, and a
check of the values themselves. Pure numpy, so examples, benchmarks and tests
check results the same way.

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.methods._support.grids import ternary_grid  # internal
  >>> grid = ternary_grid()
  >>> grid.problems([("w", np.array([0.0, 0.5, -0.25, 0.5]))])
  []
  >>> grid.problems([("w", np.array([0.1, 0.2, 0.3, 0.4]))])
  ['w has 4 distinct values, at most 3']
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

NamedLeaves = Sequence[tuple[str, np.ndarray]]


def _groups(leaf: np.ndarray, per_filter: bool) -> list[np.ndarray]:
  leaf = np.asarray(leaf)
  if per_filter and leaf.ndim >= 1:
    return list(leaf.reshape(-1, leaf.shape[-1]).T)
  return [leaf.reshape(-1)]


def at_most_values(most: int, per_filter: bool = False) -> Callable[[str, np.ndarray], Optional[str]]:
  """A leaf check: at most ``most`` distinct values (per output filter)."""

  def check(path, leaf):
    found = max(np.unique(g).size for g in _groups(leaf, per_filter))
    if found > most:
      where = " in one filter" if per_filter else ""
      return f"{path} has {found} distinct values{where}, at most {most}"
    return None

  return check


def symmetric(path: str, leaf: np.ndarray) -> Optional[str]:
  """A leaf check: each output filter holds ``{-a, 0, a}`` (one magnitude)."""
  for group in _groups(leaf, True):
    magnitudes = np.unique(np.abs(group[group != 0]))
    if magnitudes.size > 1:
      return f"{path}: a filter holds magnitudes {magnitudes[:4].tolist()}, expected one"
  return None


def zero_or_power_of_two(path: str, leaf: np.ndarray) -> Optional[str]:
  """A leaf check: every value is 0 or ``+-2^n``."""
  values = np.unique(np.asarray(leaf, np.float64))
  mantissa, _ = np.frexp(np.abs(values[values != 0]))
  if np.any(mantissa != 0.5):
    bad = values[values != 0][mantissa != 0.5]
    return f"{path} holds {bad[:3].tolist()}, not powers of two"
  return None


def integer_multiples(per_filter: bool = False, largest_divisor: int = 16):
  """A leaf check: every value is ``q * s`` for integers ``q`` and one scale ``s`` (per filter).

  ``s`` is the smallest non-zero magnitude divided by the smallest ``m <=
  largest_divisor`` that makes all values integers (to 1e-4 relative).
  """

  def check(path, leaf):
    for group in _groups(leaf, per_filter):
      group = group.astype(np.float64)
      nonzero = np.abs(group[group != 0])
      if not nonzero.size:
        continue
      for m in range(1, largest_divisor + 1):
        q = group / (nonzero.min() / m)
        if np.all(np.abs(q - np.round(q)) < 1e-4 * np.maximum(1.0, np.abs(q))):
          break
      else:
        return f"{path}: values are not integer multiples of one scale"
    return None

  return check


@dataclasses.dataclass(frozen=True)
class Grid:
  """The values a method's quantized layers may hold.

  Attributes:
    max_values: at most this many distinct values per layer (per output
      filter with ``per_filter``); None: no bound (pruning).
    per_filter: the bound and the checks hold per output filter (last axis).
    leaf_checks: ``(path, array) -> problem or None``, each run on every
      quantized layer.
    min_sparsity: the quantized layers together hold at least this fraction
      of zeros (calibrated pruning), or None.
    ternary: at most three values per layer: the export's 2-bit records and
      the report's ternary sizes apply.
  """
  max_values: Optional[int] = 3
  per_filter: bool = False
  leaf_checks: tuple = ()
  min_sparsity: Optional[float] = None
  ternary: bool = True

  def problems(self, named_leaves: NamedLeaves) -> list[str]:
    """Every way the ``(path, array)`` layers leave the grid (empty: on it)."""
    checks = list(self.leaf_checks)
    if self.max_values is not None:
      checks.insert(0, at_most_values(self.max_values, self.per_filter))
    found = [p for path, leaf in named_leaves for check in checks
             if (p := check(path, np.asarray(leaf))) is not None]
    if self.min_sparsity is not None and named_leaves:
      zeros = sum(int((np.asarray(l) == 0).sum()) for _, l in named_leaves)
      total = sum(np.asarray(l).size for _, l in named_leaves)
      if zeros / total < self.min_sparsity - 0.01:
        found.append(f"pruned to {zeros / total:.4f} zeros, asked for {self.min_sparsity}")
    return found

  def check(self, named_leaves: NamedLeaves) -> None:
    """Raises ``AssertionError`` listing :meth:`problems`, if any."""
    found = self.problems(named_leaves)
    if found:
      raise AssertionError("; ".join(found))


def ternary_grid(per_filter: bool = False, symmetric_filters: bool = False) -> Grid:
  """Three values per layer (or per output filter, ``{-a, 0, a}`` with ``symmetric_filters``)."""
  return Grid(3, per_filter, (symmetric,) if symmetric_filters else ())
