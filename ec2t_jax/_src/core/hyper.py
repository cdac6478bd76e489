"""Hyperparameter ranges: checked at construction, guarded when traced."""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Hyperparameters.


class Range(NamedTuple):
  """Valid interval of a numeric hyperparameter."""
  low: float
  high: float = math.inf
  low_open: bool = False

  def __str__(self):
    high = "inf)" if self.high == math.inf else f"{self.high:g}]"
    return f"{'(' if self.low_open else '['}{self.low:g}, {high}"

  def contains(self, v):
    above = v > self.low if self.low_open else v >= self.low
    return above & (v <= self.high)


def is_concrete(x) -> bool:
  """A Python number or a concrete (non-traced) array."""
  return isinstance(x, numbers.Number) or (
      isinstance(x, (np.ndarray, np.generic, jax.Array))
      and not isinstance(x, jax.core.Tracer))


def check_range(name: str, value, valid: Range) -> None:
  """Raises ``ValueError`` if a concrete ``value`` is outside ``valid``.

  Traced values (``inject_hyperparams``) are checked at each update instead,
  see :func:`hyper_is_valid`.
  """
  if not is_concrete(value):
    return
  v = np.asarray(value, np.float64)
  if v.size != 1 or not np.isfinite(v) or not valid.contains(float(v)):
    raise ValueError(f"{name} must be in {valid} (finite), got {value!r}")


def check_choice(name: str, value, choices) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def hyper_is_valid(hyper: NamedTuple, ranges: dict[str, Range]) -> jax.Array:
  """Whether every numeric hyperparameter is finite and in range (traced)."""
  ok = jnp.asarray(True)
  for name, valid in ranges.items():
    v = jnp.asarray(getattr(hyper, name), jnp.float32)
    ok &= jnp.all(jnp.isfinite(v) & valid.contains(v))
  return ok

