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


def _as_real(name: str, value, valid: Range) -> np.ndarray:
  """``value`` as a float64 array, or ``TypeError`` if it is not a real number."""
  if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
    return np.asarray(float(value))
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    dtype = np.dtype(value.dtype)
    if dtype.kind in "iuf" or dtype.name == "bfloat16":
      return np.asarray(value, np.float64)
  raise TypeError(f"{name} must be a real number in {valid}, got {value!r} "
                  f"of type {type(value).__name__}")


def check_range(name: str, value, valid: Range) -> None:
  """Raises if a concrete ``value`` is not a real number inside ``valid``.

  Traced values (``inject_hyperparams``) are checked at each update instead,
  see :func:`hyper_is_valid`.

  Raises:
    TypeError: for anything but a real number or a real-valued array (a
      string, ``None``, a bool, a complex number).
    ValueError: for a value outside ``valid``, not finite, or an array that
      is not a scalar.

  Example:
    >>> check_range("gamma", "0.2", Range(0.0, 1.0))
    Traceback (most recent call last):
    TypeError: gamma must be a real number in [0, 1], got '0.2' of type str
  """
  if isinstance(value, jax.core.Tracer):
    return
  v = _as_real(name, value, valid)
  if v.ndim != 0:
    raise ValueError(f"{name} must be a scalar in {valid}, got an array of shape {v.shape}: "
                     f"{value!r}")
  if not np.isfinite(v) or not valid.contains(float(v)):
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

