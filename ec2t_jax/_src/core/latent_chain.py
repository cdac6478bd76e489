"""``ec2t.chain``: an optax chain whose weight decay acts on the latent weights.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

In ``optax.chain(optax.adamw(lr, weight_decay=wd), method)`` the params hold
the quantized values ``T`` (the method's grid), so AdamW's decoupled decay
``-lr * wd * T`` acts on them: a weight whose value is 0 gets no decay and the
latent weights ``W`` the method keeps in its state see the decay only through
``T``. :func:`chain` gives the inner transformations the latent weights as
their params and applies their decay to ``W`` itself:

.. math:: u_W = \\mathrm{inner}(g, s, W), \\quad u_0 = \\mathrm{inner}(g, s, 0),
   \\quad W \\leftarrow W + (u_W - u_0), \\quad
   \\mathrm{method\\ step\\ with\\ } u_0

at every selected leaf (``W`` the leaf's latent weights, 0 at the same leaves,
the same gradients ``g`` and state ``s``). For any decay linear in the params
(``optax.adamw``, ``optax.add_decayed_weights`` anywhere in the inner chain,
with any schedule or mask) ``u_W - u_0`` is exactly the decoupled decay
``-lr * wd * W``; ``u_0`` is the gradient part, which the method turns into
its own latent step (TWN's straight-through step, TTQ's scaled step, INQ's
masked step, ...). The decay goes first, then the method's step, as
``torch.optim.AdamW`` decays before its Adam step. Leaves the method does not
quantize take the inner update as in ``optax.chain``. Under ``jax.jit`` XLA
computes the part the two inner calls share once.

The state is the one ``optax.chain`` of the same transformations keeps (a
tuple, one state per transformation), so :func:`~ec2t_jax.find_quantizer_state`,
:func:`~ec2t_jax.quantized_params`, :func:`~ec2t_jax.set_phase`,
:func:`~ec2t_jax.summary`, ``nnx.Optimizer`` and orbax checkpoints work as
with ``optax.chain``. Without any decay (``weight_decay=0``, a plain Adam)
``chain`` gives bitwise the updates and states of ``optax.chain``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ec2t_jax._src.core.protocol import QuantizerState
from ec2t_jax._src.core.state_access import find_quantizer_state
from ec2t_jax._src.core.transform import check_same_tree
from ec2t_jax._src.core.transform import flat_leaf_states
from ec2t_jax._src.core.transform import latent_fields
from ec2t_jax._src.core.transform import QuantizerTransformation
from ec2t_jax._src.core.trees import path_to_str
from ec2t_jax._src.core.trees import pure_tree


def _leaf_states(quantizer_state: QuantizerState, params) -> list:
  """Per param leaf (flattening order), its method state (None if unselected)."""
  check_same_tree("params", params, quantizer_state.leaves)
  states, _ = flat_leaf_states(quantizer_state.resolved_leaves())
  return states


def latent_params(quantizer_state: QuantizerState, params, field: str = "latent"):
  """``params`` with each selected leaf replaced by its latent weights.

  Leaves that are not selected, or whose state has no such field, keep their
  params.

  Args:
    quantizer_state: a method's :class:`~ec2t_jax.QuantizerState`.
    params: the params (a tree like the one given to ``init``).
    field: which latent field (:func:`~ec2t_jax._src.core.transform.latent_fields`;
      STTN has ``"latent2"`` too).

  Returns:
    A tree like ``params``.

  Example:
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax._src.core.latent_chain import latent_params  # internal
    >>> from ec2t_jax.models import small_cnn_example
    >>> example = small_cnn_example()  # a small CNN (fixture)
    >>> state = ec2t.find_quantizer_state(example.opt_state)
    >>> bool((latent_params(state, example.params)["Conv_1"]["kernel"]
    ...       == state.latent["Conv_1"]["kernel"]).all())
    True
  """
  return _with_field(_leaf_states(quantizer_state, params), params, field)


def _with_field(states: list, params, field: str):
  flat, treedef = jax.tree.flatten(params)
  out = [p if s is None or field not in latent_fields(s) else getattr(s, field)
         for p, s in zip(flat, states)]
  return treedef.unflatten(out)


def _with_zeros(states: list, params):
  """``params`` with zeros (latent dtype) at every leaf that has latent weights."""
  flat, treedef = jax.tree.flatten(params)
  out = [p if s is None or not latent_fields(s) else
         jnp.zeros_like(getattr(s, latent_fields(s)[0])) for p, s in zip(flat, states)]
  return treedef.unflatten(out)


def _decayed_fields(states: list) -> tuple[str, ...]:
  """Every latent field some selected leaf has, ``"latent"`` first."""
  found = []
  for s in states:
    for f in () if s is None else latent_fields(s):
      if f not in found:
        found.append(f)
  return tuple(sorted(found, key=lambda f: (f != "latent", f)))


def _method_name(leaf_state) -> str:
  try:
    return str(leaf_state.describe()["method"])
  except Exception:  # pylint: disable=broad-except
    return type(leaf_state).__name__


def check_decay_targets(inner: optax.GradientTransformation, quantizer_state: QuantizerState,
                        params) -> None:
  """Raises if ``inner`` decays a selected leaf whose method keeps no latent weights.

  Runs only when such a leaf exists: ``inner`` is initialised on stand-in
  params (ones at those leaves, zeros elsewhere) and updated with zero
  gradients; a non-zero update there is a weight decay with nothing to act on.

  Raises:
    ValueError: naming the method and the leaf.
  """
  flat, treedef = jax.tree.flatten(params)
  states = _leaf_states(quantizer_state, params)
  bare = [i for i, s in enumerate(states) if s is not None and not latent_fields(s)]
  if not bare:
    return
  # Concrete stand-ins, evaluated now even when init is traced (jax.jit(tx.init)).
  with jax.ensure_compile_time_eval():
    probe = [np.ones if i in bare else np.zeros for i in range(len(flat))]
    probe = treedef.unflatten([make(np.shape(p), jnp.asarray(p).dtype)
                               for make, p in zip(probe, flat)])
    zeros = jax.tree.map(jnp.zeros_like, probe)
    proposed, _ = inner.update(zeros, inner.init(probe), probe)
    proposed = jax.tree.leaves(proposed)
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for i in bare:
      if bool(jnp.any(proposed[i] != 0)):
        raise ValueError(
            f"the inner optimizer decays the weights of {paths[i]!r} (its update on zero "
            f"gradients is not zero), but method {_method_name(states[i])!r} keeps no latent "
            "weights there for a weight decay to act on: drop the decay for this leaf "
            "(e.g. optax.adamw(..., mask=...)) or use optax.chain")


def latent_update(inner: optax.GradientTransformationExtraArgs,
                  quantizer: optax.GradientTransformationExtraArgs,
                  updates, inner_state, quantizer_state, params, **extra_args
                  ) -> tuple[Any, Any, Any]:
  """One step of ``inner`` then ``quantizer``, the inner decay on the latent weights.

  See the module docstring for the math.

  Args:
    inner: the inner optimizer (extra arguments supported).
    quantizer: a method's transformation (:class:`QuantizerTransformation`, or
      a wrapper that forwards extra arguments to it, e.g.
      ``optax.inject_hyperparams``).
    updates: the gradients.
    inner_state, quantizer_state: their states.
    params: the params (the quantized values at selected leaves).
    **extra_args: passed to both.

  Returns:
    ``(updates, new inner_state, new quantizer_state)``.
  """
  if params is None:
    raise ValueError("ec2t.chain needs params in update: call `tx.update(grads, state, params)`")
  states = _leaf_states(find_quantizer_state(quantizer_state), params)
  proposed, new_inner_state = inner.update(updates, inner_state,
                                           _with_field(states, params, "latent"), **extra_args)
  fields = _decayed_fields(states)
  if fields:
    without, _ = inner.update(updates, inner_state, _with_zeros(states, params), **extra_args)
    decay = {}
    for f in fields:
      with_f = proposed if f == "latent" else inner.update(
          updates, inner_state, _with_field(states, params, f), **extra_args)[0]
      decay[f] = jax.tree.map(jnp.subtract, with_f, without)
    flat, treedef = jax.tree.flatten(proposed)
    proposed = treedef.unflatten(
        [w if s is not None and latent_fields(s) else p
         for p, w, s in zip(flat, treedef.flatten_up_to(without), states)])
    extra_args = {**extra_args, "latent_decay": decay}
  out, new_quantizer_state = quantizer.update(proposed, quantizer_state, params, **extra_args)
  return out, new_inner_state, new_quantizer_state


def init_inner(inner: optax.GradientTransformation, quantizer_state, params):
  """``inner``'s state on the latent params (after :func:`check_decay_targets`)."""
  state = find_quantizer_state(quantizer_state)
  params = pure_tree(params)  # an nnx.State of variables: its arrays
  check_decay_targets(inner, state, params)
  return inner.init(latent_params(state, params))


def check_quantizer(quantizer, name: str = "the last transformation") -> None:
  """A ``TypeError`` unless ``quantizer`` can take ``latent_decay`` (module docstring)."""
  if not isinstance(quantizer, optax.GradientTransformationExtraArgs):
    kind = type(quantizer).__name__
    raise TypeError(
        f"{name} must be a method's transformation (e.g. ec2t.twn(), ec2t.bitnet(), or "
        "optax.inject_hyperparams of one), which takes the latent weight decay; got a "
        f"{kind} that cannot take it")


# No inner transformation: the state of ``optax.chain()`` (an empty tuple), updates unchanged.
_NOTHING = optax.GradientTransformationExtraArgs(
    lambda params: (), lambda updates, state, params=None, **extra_args: (updates, state))


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*transforms)`` whose weight decay shrinks the latent weights.

  The last transformation is a method (``ec2t.twn()``, ``ec2t.ternarize_transform()``,
  ...); the ones before it (the inner optimizer) see, as their params, the
  latent full-precision weights ``W`` of every quantized leaf, and their
  decoupled weight decay (``optax.adamw``'s ``weight_decay``,
  ``optax.add_decayed_weights``) shrinks ``W``: ``W <- W - lr * wd * W``
  before the method's own step on the gradient part (module docstring). With
  ``optax.chain`` instead, the decay would act on the quantized values ``T``.
  Leaves the method leaves alone are updated as by ``optax.chain``.

  Args:
    *transforms: the inner transformations, then the method's transformation
      (a :class:`~ec2t_jax._src.core.transform.QuantizerTransformation`, or
      ``optax.inject_hyperparams`` of one).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is that of
    ``optax.chain(*transforms)`` (a tuple, one state per transformation).

  Raises:
    TypeError: (construction) the last transformation cannot take the
      latent decay.
    ValueError: (``init``) the inner optimizer decays a leaf whose method
      keeps no latent weights.

  Example:
    >>> import optax
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> tx = ec2t.chain(optax.adamw(1e-3, weight_decay=0.1), ec2t.twn())
    >>> opt_state = tx.init(params)
    >>> params = ec2t.quantized_params(params, opt_state)
  """
  if not transforms:
    raise ValueError("ec2t.chain needs at least the method's transformation")
  *inner, quantizer = transforms
  check_quantizer(quantizer)
  inner = optax.chain(*inner) if inner else _NOTHING

  def init_fn(params):
    quantizer_state = quantizer.init(params)
    return (*init_inner(inner, quantizer_state, params), quantizer_state)

  def update_fn(updates, state, params=None, **extra_args):
    *inner_state, quantizer_state = state
    out, inner_state, quantizer_state = latent_update(
        inner, quantizer, updates, tuple(inner_state), quantizer_state, params, **extra_args)
    return out, (*inner_state, quantizer_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ("chain", "latent_params", "latent_update", "QuantizerTransformation")
