"""A fresh inner optimizer at each stage of a staged method (INQ, SLQ, MLQ).

The official INQ code retrains each stage with a fresh learning rate: the
schedule starts again and the optimizer forgets the previous stage's
statistics. In an optax chain the inner optimizer cannot see the method's
stage, so :func:`restart_on_stage` composes the two itself:

.. math:: (u, s_{in}) = \\mathrm{inner}(g, s_{in}), \\quad
   (v, s_q) = \\mathrm{quantizer}(u, s_q), \\quad
   s_{in} \\leftarrow \\mathrm{inner.init}(\\theta) \\text{ if } \\sum_\\ell
   \\mathrm{stage}_\\ell(s_q) \\text{ grew}

(the sum over the selected layers' ``stage`` fields: MLQ's layers advance one
at a time). The restarted inner state is used from the next step on: its
``count`` is 0 again, so an ``optax`` schedule inside ``inner`` restarts, and
Adam's moments are zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax



class RestartState(NamedTuple):
  """State of :func:`restart_on_stage`: the inner optimizer's and the method's."""
  inner: Any
  quantizer: Any


def stage_sum(quantizer_state) -> jax.Array:
  """The sum of the ``stage`` fields of a quantizer state's leaves (0 if none has one).

  Reads grouped (same-shape, stacked) leaves too, through ``QuantizerState.field``.

  Example:
    >>> import jax.numpy as jnp
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax._src.methods._support.stage_restart import stage_sum  # internal
    >>> tx = ec2t.inq(2, (0.5, 1.0), selection=lambda path, leaf: True)
    >>> int(stage_sum(tx.init({"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))})))  # stage 0, 0
    0
  """
  stages = jax.tree.leaves(quantizer_state.field("stage"))
  return sum((jnp.sum(jnp.asarray(s, jnp.int32)) for s in stages), jnp.zeros((), jnp.int32))


def restart_on_stage(inner: optax.GradientTransformation,
                     quantizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optax.chain(inner, quantizer)`` whose ``inner`` restarts when a stage begins.

  Args:
    inner: the inner optimizer (e.g. ``optax.adam(schedule)``).
    quantizer: a staged method whose leaves have a ``stage`` field
      (:func:`ec2t.inq`, :func:`ec2t.slq`, :func:`ec2t.mlq`).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`RestartState`; the
    library's state functions (``ec2t.set_phase``, ``ec2t.quantized_params``)
    find the method's state inside it as usual.

  Example:
    >>> import optax
    >>> from ec2t_jax import inq, restart_on_stage
    >>> tx = restart_on_stage(optax.adam(optax.cosine_decay_schedule(1e-3, 500)),
    ...                       inq(5, steps_per_stage=500))
  """

  def init_fn(params):
    return RestartState(inner.init(params), quantizer.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("restart_on_stage needs params in update (the inner optimizer is "
                       "re-initialised from them)")
    proposed, inner_state = inner.update(updates, state.inner, params)
    out, quantizer_state = quantizer.update(proposed, state.quantizer, params)
    began = stage_sum(quantizer_state) > stage_sum(state.quantizer)
    fresh = inner.init(params)
    inner_state = jax.tree.map(lambda f, s: jnp.where(began, f, s), fresh, inner_state)
    return out, RestartState(inner_state, quantizer_state)

  return optax.GradientTransformation(init_fn, update_fn)

