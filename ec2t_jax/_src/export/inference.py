"""Ternary inference: compute with the assignment, not with the float weights.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

A ternary kernel ``T = w_p M_p - w_n M_n`` (``M_p``, ``M_n`` the 0/1 masks of
clusters p and n) makes every output of a dense or conv layer

.. math:: y = w_p \\sum_{j \\in p} x_j \\; - \\; w_n \\sum_{j \\in n} x_j

two masked accumulations and two multiplications, as the paper counts it.
:func:`ternary_dense` and :func:`ternary_conv` compute exactly that (the masked
sums run as XLA contractions with 0/1 operands: this checks the arithmetic and
the equivalence, it does not claim a speed-up on CPU/GPU).
:func:`ternary_apply` runs a whole Flax Linen model that way, by intercepting
its ``nn.Dense`` / ``nn.Conv`` calls whose kernel is ternary.

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax import TernaryWeight, ternary_dense
  >>> w = TernaryWeight(jnp.array([[1, 0], [-1, 1]], jnp.int8), 0.5, 0.25)
  >>> ternary_dense(jnp.ones((1, 2)), w)
  Array([[-0.25,  0.25]], dtype=float32)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.core import trees
from ec2t_jax._src.export import leaf_parts


class TernaryWeight(NamedTuple):
  """A ternary kernel as the packed format stores it (a JAX pytree).

  Attributes:
    assignment: ``int8`` array in ``{-1, 0, 1}`` (clusters n, 0, p).
    w_n: magnitude of the negative value (scalar, > 0).
    w_p: the positive value (scalar, > 0).
  """
  assignment: Any
  w_n: Any
  w_p: Any

  def values(self, dtype=jnp.float32) -> jax.Array:
    """The dense ternary kernel ``w_p``/``0``/``-w_n``."""
    a = jnp.asarray(self.assignment)
    return jnp.where(a > 0, jnp.asarray(self.w_p, dtype),
                     jnp.where(a < 0, -jnp.asarray(self.w_n, dtype), jnp.zeros((), dtype)))


def as_ternary(kernel) -> Optional[TernaryWeight]:
  """:class:`TernaryWeight` of a concrete kernel holding exactly ``{-w_n, 0, w_p}``, else None."""
  parts = leaf_parts.ternary_parts(np.asarray(kernel))
  if parts is None:
    return None
  return TernaryWeight(parts.assignment, np.asarray(-parts.values[0]), np.asarray(parts.values[2]))


def _masks(weight: TernaryWeight, dtype):
  a = jnp.asarray(weight.assignment)
  return (a > 0).astype(dtype), (a < 0).astype(dtype)


def _combine(acc_p, acc_n, weight: TernaryWeight, bias):
  dtype = acc_p.dtype
  y = jnp.asarray(weight.w_p, dtype) * acc_p - jnp.asarray(weight.w_n, dtype) * acc_n
  return y if bias is None else y + jnp.asarray(bias, dtype)


def ternary_dense(x, weight: TernaryWeight, bias=None, *, layout: str = "IO",
                  precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Dense layer from a ternary assignment: ``w_p (x M_p) - w_n (x M_n) + b``.

  Args:
    x: inputs ``[..., in]``.
    weight: the kernel, ``[in, out]`` (Flax, ``layout="IO"``) or ``[out, in]``
      (PyTorch ``Linear``, ``layout="OI"``).
    bias: optional ``[out]``.
    layout: ``"IO"`` or ``"OI"``.
    precision: matmul precision of the accumulations.

  Returns:
    ``[..., out]`` in ``x``'s dtype.
  """
  if layout not in ("IO", "OI"):
    raise ValueError(f"layout must be 'IO' or 'OI', got {layout!r}")
  x = jnp.asarray(x)
  m_p, m_n = _masks(weight, x.dtype)
  if layout == "OI":
    m_p, m_n = m_p.T, m_n.T
  acc_p = jnp.matmul(x, m_p, precision=precision)
  acc_n = jnp.matmul(x, m_n, precision=precision)
  return _combine(acc_p, acc_n, weight, bias)


def ternary_conv(x, weight: TernaryWeight, bias=None, *, strides: Sequence[int] = (1, 1),
                 padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                 feature_group_count: int = 1, rhs_dilation=None,
                 precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Convolution from a ternary assignment: two masked convolutions, two products.

  .. math:: y = w_p (x * M_p) - w_n (x * M_n) + b

  Args:
    x: inputs, e.g. ``[N, H, W, C]``.
    weight: the kernel (``HWIO`` for Flax, ``OIHW`` for PyTorch: set
      ``dimension_numbers`` accordingly, e.g. ``("NCHW", "OIHW", "NCHW")``).
    bias: optional per-output-channel bias (added on the last axis for
      ``NHWC`` outputs, on axis 1 for ``NCHW``).
    strides, padding, dimension_numbers, feature_group_count, rhs_dilation:
      as in :func:`jax.lax.conv_general_dilated`.
    precision: precision of the accumulations.

  Returns:
    The convolution output in ``x``'s dtype.
  """
  x = jnp.asarray(x)
  m_p, m_n = _masks(weight, x.dtype)
  conv = lambda m: jax.lax.conv_general_dilated(
      x, m, tuple(strides), padding, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision)
  y = _combine(conv(m_p), conv(m_n), weight, None)
  if bias is not None:
    out_spec = dimension_numbers[2] if isinstance(dimension_numbers[2], str) else "NHWC"
    shape = [1] * y.ndim
    shape[out_spec.index("C")] = -1
    y = y + jnp.asarray(bias, y.dtype).reshape(shape)
  return y


def ternary_weights(params) -> dict[str, TernaryWeight]:
  """``{path: TernaryWeight}`` for every ternary leaf of a (concrete) params tree."""
  out = {}
  for path, leaf in trees.flatten(params)[0]:
    weight = as_ternary(leaf)
    if weight is not None:
      out[path] = weight
  return out


def ternary_apply(model: nn.Module, variables, *args, method=None,
                  ternary: Optional[dict] = None, **kwargs):
  """Runs a Linen model with its ternary ``nn.Dense`` / ``nn.Conv`` on the ternary path.

  Every ``nn.Dense`` or ``nn.Conv`` whose ``kernel`` holds exactly
  ``{-w_n, 0, w_p}`` is computed as ``w_p * layer(x; M_p) - w_n * layer(x; M_n)
  + bias`` (the layer itself, cloned without bias, applied to the two masks,
  so padding, strides and dtypes are the module's own); everything else runs
  as usual. The ternary split needs concrete values: by default it is done
  on ``variables`` (so call this outside ``jit``); to jit, split once with
  :func:`ternary_weights` and pass the result as ``ternary`` (a pytree)::

    tw = ternary_weights(variables["params"])
    run = jax.jit(lambda v, tw, x: ternary_apply(model, v, x, ternary=tw))

  Args:
    model: the Linen module.
    variables: ``{"params": ..., ...}`` as for ``model.apply``.
    *args, **kwargs: forwarded to ``model.apply``.
    method: forwarded to ``model.apply``.
    ternary: ``{kernel path: TernaryWeight}`` (paths relative to ``params``);
      default :func:`ternary_weights` of ``variables["params"]``.

  Returns:
    ``model.apply``'s output.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax import ternary_apply
    >>> from ec2t_jax.models import small_cnn_example
    >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params, ex.x
    >>> model, variables, x = ex.model, {"params": ex.params}, ex.x
    >>> y = ternary_apply(model, variables, x)
    >>> np.testing.assert_allclose(y, model.apply(variables, x), atol=1e-5)
  """
  if ternary is None:
    ternary = ternary_weights(variables.get("params", {}))

  def interceptor(next_fun, fn_args, fn_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) not in (nn.Dense, nn.Conv):
      return next_fun(*fn_args, **fn_kwargs)
    path = "/".join(module.path + ("kernel",))
    weight = ternary.get(path)
    if weight is None:
      return next_fun(*fn_args, **fn_kwargs)
    bare = module.clone(parent=None, use_bias=False)
    m_p, m_n = _masks(weight, jnp.float32)
    acc_p = bare.apply({"params": {"kernel": m_p}}, *fn_args, **fn_kwargs)
    acc_n = bare.apply({"params": {"kernel": m_n}}, *fn_args, **fn_kwargs)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _combine(acc_p, acc_n, weight, bias)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, *args, method=method, **kwargs)
