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

**Annealing within each stage.** A schedule built for the whole run (the
examples' cosine over all steps) restarts at its peak and, in a stage much
shorter than the run, ends it near the peak (about 85% for INQ's three
phase-1 stages over a cosine of the whole run). As in the official INQ
code, where each stage is a fresh run with its own decay, give
``restart_on_stage`` a *factory* ``inner(steps)`` and the length of each run
of the inner optimizer (``stage_steps``): run ``i`` (the updates between two
restarts) uses ``inner(stage_steps[i])``, so a schedule built over ``steps``
ends every stage at its end value.

The inner optimizer sees the latent weights as its params and its weight
decay acts on them, as in :func:`~ec2t_jax.chain`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src.core import latent_chain
from ec2t_jax._src.core.state_access import find_quantizer_state
from ec2t_jax._src.core.trees import pure_tree


class RestartState(NamedTuple):
  """State of :func:`restart_on_stage`.

  Attributes:
    inner: the inner optimizer's state.
    quantizer: the method's state.
    run: int32, how many times the inner optimizer restarted (which entry of
      ``stage_steps`` the current run uses).
  """
  inner: Any
  quantizer: Any
  run: Any = None


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
  stages = jax.tree.leaves(find_quantizer_state(quantizer_state).field("stage"))
  return sum((jnp.sum(jnp.asarray(s, jnp.int32)) for s in stages), jnp.zeros((), jnp.int32))


def check_stage_steps(stage_steps) -> tuple[int, ...]:
  """``stage_steps`` (an int or a sequence of ints, each >= 1) as a tuple.

  Raises:
    ValueError: naming the bad value.
  """
  values = (stage_steps,) if np.ndim(stage_steps) == 0 else tuple(stage_steps)
  if not values:
    raise ValueError("stage_steps must not be empty")
  for value in values:
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
      raise ValueError(f"stage_steps must be whole numbers >= 1, got {value!r} "
                       f"(in {stage_steps!r})")
  return tuple(int(v) for v in values)


def _per_run(factory: Callable[[int], optax.GradientTransformation], lengths: tuple):
  """One inner optimizer per distinct run length, and each run's index into them."""
  distinct = sorted(set(lengths))
  built = []
  for steps in distinct:
    tx = factory(steps)
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(f"inner({steps}) must return an optax.GradientTransformation, got "
                      f"{type(tx).__name__}")
    built.append(optax.with_extra_args_support(tx))
  return tuple(built), np.asarray([distinct.index(n) for n in lengths], np.int32)


def _selected(inners: tuple, which) -> optax.GradientTransformationExtraArgs:
  """The ``which``-th of ``inners`` (a traced index): all are run, one result kept."""
  if len(inners) == 1:
    return inners[0]

  def update(updates, state, params=None, **extra_args):
    outs = [tx.update(updates, state, params, **extra_args) for tx in inners]
    out = outs[0]
    for k, other in enumerate(outs[1:], start=1):
      out = jax.tree.map(lambda a, b, k=k: jnp.where(which == k, b, a), out, other)
    return out

  return optax.GradientTransformationExtraArgs(inners[0].init, update)


def restart_on_stage(
    inner: Union[optax.GradientTransformation, Callable[[int], optax.GradientTransformation]],
    quantizer: optax.GradientTransformation, *,
    stage_steps: Union[int, Sequence[int], None] = None) -> optax.GradientTransformation:
  """``ec2t.chain(inner, quantizer)`` whose ``inner`` restarts when a stage begins.

  Args:
    inner: the inner optimizer (e.g. ``optax.adam(1e-3)``), or with
      ``stage_steps`` a factory ``steps -> optimizer`` whose schedule spans
      ``steps`` updates (e.g. ``lambda n: optax.adam(optax.cosine_decay_schedule(1e-3, n))``).
    quantizer: a staged method whose leaves have a ``stage`` field
      (:func:`ec2t.inq`, :func:`ec2t.slq`, :func:`ec2t.mlq`).
    stage_steps: with a factory, the number of updates of each run of the
      inner optimizer: an int (every run) or a sequence (run ``i`` uses entry
      ``i``, the last entry every later run). A stage that begins in update
      ``k`` restarts the inner optimizer from update ``k + 1``, so with the
      method's ``steps_per_stage = N`` the runs are ``N + 1, N, N, ...``
      updates long, and a stage begun by ``ec2t.set_phase`` before update
      ``k`` runs from ``k + 1`` to the end.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`RestartState`; the
    library's state functions (``ec2t.set_phase``, ``ec2t.quantized_params``)
    find the method's state inside it as usual.

  Raises:
    TypeError: ``stage_steps`` with an optimizer instead of a factory (its
      schedule cannot restart with another length), a factory without
      ``stage_steps``, or a factory that returns no transformation.
    ValueError: a ``stage_steps`` entry that is not a whole number >= 1, or
      factories whose states differ in structure.

  Example:
    >>> import optax
    >>> from ec2t_jax import inq, restart_on_stage
    >>> tx = restart_on_stage(lambda n: optax.adam(optax.cosine_decay_schedule(1e-3, n)),
    ...                       inq(5, steps_per_stage=500), stage_steps=(501, 500, 500, 2000))
  """
  latent_chain.check_quantizer(quantizer, "quantizer")
  if stage_steps is None:
    if not isinstance(inner, optax.GradientTransformation):
      raise TypeError(
          "restart_on_stage: inner is a factory; give stage_steps (the updates of each run "
          f"of the inner optimizer), or an optax transformation; got {inner!r}")
    inners, runs = (optax.with_extra_args_support(inner),), np.zeros((1,), np.int32)
  else:
    lengths = check_stage_steps(stage_steps)
    if isinstance(inner, optax.GradientTransformation) or not callable(inner):
      raise TypeError(
          "restart_on_stage: with stage_steps, inner must be a factory steps -> optimizer "
          "(e.g. lambda n: optax.adam(optax.cosine_decay_schedule(1e-3, n))): a built "
          f"optimizer's schedule cannot restart with each stage's length; got {inner!r}")
    inners, runs = _per_run(inner, lengths)

  def fresh(quantizer_state, params):
    state = find_quantizer_state(quantizer_state)
    return inners[0].init(latent_chain.latent_params(state, pure_tree(params)))

  def init_fn(params):
    quantizer_state = quantizer.init(params)
    inner_state = latent_chain.init_inner(inners[int(runs[0])], quantizer_state, params)
    for tx in inners:  # restarts use inners[0].init: every run's state must look alike
      other = fresh(quantizer_state, params) if tx is inners[0] else tx.init(
          latent_chain.latent_params(find_quantizer_state(quantizer_state), pure_tree(params)))
      if (jax.tree.structure(other) != jax.tree.structure(inner_state)
          or jax.tree.map(jnp.shape, other) != jax.tree.map(jnp.shape, inner_state)):
        raise ValueError("restart_on_stage: the factory's optimizers for different "
                         "stage_steps keep states of different structures")
    return RestartState(inner_state, quantizer_state, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("restart_on_stage needs params in update (the inner optimizer is "
                       "re-initialised from them)")
    run = jnp.zeros((), jnp.int32) if state.run is None else state.run
    which = jnp.asarray(runs)[jnp.minimum(run, len(runs) - 1)]
    out, inner_state, quantizer_state = latent_chain.latent_update(
        _selected(inners, which), quantizer, updates, state.inner, state.quantizer, params,
        **extra_args)
    began = stage_sum(quantizer_state) > stage_sum(state.quantizer)
    inner_state = jax.tree.map(lambda f, s: jnp.where(began, f, s),
                               fresh(quantizer_state, params), inner_state)
    return out, RestartState(inner_state, quantizer_state, run + began.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
