"""Exact landing: values on a grid where ``params + (new - params) == new``."""

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------
# Exact landing on the grid.


def snap_to_grid(values, dtype, reference=None) -> jax.Array:
  """Rounds ``values`` to a power-of-two grid of ``dtype`` (float32 result).

  With ``q = 2^(e - p + 2)``, ``2^e > max |reference|`` and ``p`` the
  significand bits of ``dtype``, every difference of two values on the grid is
  exactly representable, so ``params + (new - params)`` rounds to exactly
  ``new`` (for arbitrary floats it can be off by one ulp). Snap all the
  scales one element can take together (EC2T: ``w_n`` and ``w_p``), or each
  filter's own scale on its own (``reference`` = that scale). The relative
  change is at most ``2^(1 - p)``; keep the unsnapped values in the state.
  A zero, subnormal or non-finite reference gives ``q = 2^(2 - p)``.

  Args:
    values: scales to snap.
    dtype: the param dtype.
    reference: magnitudes that set the quantum (broadcast with ``values``);
      default ``max |values|``.

  Returns:
    ``values`` on the grid, float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.core.grid import snap_to_grid  # internal
    >>> snap_to_grid(jnp.array([0.1, 0.3]), jnp.float32)  # q = 2^-23
    Array([0.10000002, 0.29999995], dtype=float32)
  """
  values = jnp.asarray(values, jnp.float32)
  if reference is None:
    reference = jnp.max(jnp.abs(values))
  bits = jnp.finfo(dtype).nmant + 1
  # 2^(e-1) <= |reference| < 2^e: keep the exponent bits of the float32
  # (cheaper to compile than frexp / ldexp, same quantum for normal numbers).
  reference = jnp.asarray(reference, jnp.float32)
  power = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(reference, jnp.int32) & 0x7F800000,
      jnp.float32)
  quantum = jnp.where((power > 0) & jnp.isfinite(power),
                      power * 2.0 ** (3 - bits), 2.0 ** (2 - bits))
  return jnp.round(values / quantum) * quantum


def scaled_assignment(scale, assignment, dtype) -> jax.Array:
  """``s * T`` in ``dtype`` with each scale snapped on its own grid (``reference=scale``),
  the value of a scaled ternary leaf (TWN, BitNet): one scale, or one per output filter.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.core.grid import scaled_assignment  # internal
    >>> scaled_assignment(jnp.float32(0.5), jnp.array([-1, 0, 1], jnp.int8), jnp.float32)
    Array([-0.5,  0. ,  0.5], dtype=float32)
  """
  return (snap_to_grid(scale, dtype, reference=scale) * assignment).astype(dtype)


def exact_update(target, current) -> jax.Array:
  """``target - current`` in ``current``'s dtype; exact on a snapped grid."""
  current = jnp.asarray(current)
  return jnp.asarray(target).astype(current.dtype) - current

