"""Each weight layer's input, captured from forward passes of any JAX model.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

``apply_fn(params, x)`` is traced once with :func:`jax.make_jaxpr` and the
jaxpr is evaluated by a small interpreter that follows every parameter leaf
to the ``dot_general`` / ``conv_general_dilated`` that consumes it (through
dtype conversions, reshapes, transposes and nested ``jit``\\ s). At that
equation it records the other operand (the layer's input on this model) and
enough to replay the layer alone: the primitive, its parameters, and the ops
applied to the leaf on the way. Because it works on the traced program, the
same code serves Flax Linen (``model.apply``), NNX (``nnx.merge`` of a
state) and plain functions; only forward passes of the user's model run.

A leaf used by several layers is captured at its first use.

Example:
  >>> from ec2t_jax._src.methods._support.layer_capture import capture_layer_inputs  # internal
  >>> from ec2t_jax.models import small_cnn_example
  >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params, ex.x
  >>> apply_fn = lambda p, x: ex.model.apply({"params": p}, x)
  >>> calls, _ = capture_layer_inputs(apply_fn, ex.params, [ex.x], [3])  # 3: Conv_1/kernel
  >>> y = calls[3].output(calls[3].inputs[0], ex.params["Conv_1"]["kernel"])
  >>> y.shape  # Conv_1 before its bias and ReLU
  (2, 8, 8, 8)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax

_LAYER_PRIMITIVES = ("dot_general", "conv_general_dilated")
# Single-operand ops a kernel may pass through before its layer.
_KERNEL_OPS = ("convert_element_type", "copy", "copy_p", "reshape", "transpose",
               "squeeze", "expand_dims", "reduce_precision")
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


class LayerCall(NamedTuple):
  """How one kernel leaf is used, and the layer's input.

  Attributes:
    leaf_index: index of the kernel in ``jax.tree.leaves(params)``.
    primitive: the layer's primitive (``dot_general`` or ``conv_general_dilated``).
    params: its bind parameters.
    kernel_position: which operand (0 or 1) is the kernel.
    kernel_ops: ``(primitive, params)`` applied to the leaf before the layer.
    inputs: the other operand (the layer's input), one array per batch.
  """
  leaf_index: int
  primitive: Any
  params: dict
  kernel_position: int
  kernel_ops: tuple
  inputs: tuple

  def output(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The layer's output (without bias) for input ``x`` and ``kernel``."""
    for primitive, params in self.kernel_ops:
      kernel = _bind(primitive, params, [kernel])[0]
    operands = [x, kernel] if self.kernel_position == 1 else [kernel, x]
    return _bind(self.primitive, self.params, operands)[0]


def _bind(primitive, params, values):
  out = primitive.bind(*values, **primitive.get_bind_params(params))
  return out if primitive.multiple_results else [out]


def _is_literal(var) -> bool:
  return type(var).__name__ == "Literal"


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    value = eqn.params.get(key)
    if value is None:
      continue
    if hasattr(value, "consts") and hasattr(value, "jaxpr"):
      return value.jaxpr, value.consts
    if hasattr(value, "eqns"):
      return value, ()
  return None


class _Frame:
  """Values and kernel provenance of one jaxpr's variables while it is interpreted."""

  def __init__(self, jaxpr, consts, args, provenance_in):
    self.env, self.provenance = dict(zip(jaxpr.constvars, consts)), {}
    for var, value, prov in zip(jaxpr.invars, args, provenance_in):
      self.env[var] = value
      if prov is not None:
        self.provenance[var] = prov

  def read(self, var):
    return var.val if _is_literal(var) else self.env[var]

  def origin(self, var):
    return None if _is_literal(var) else self.provenance.get(var)

  def write(self, outvars, values, provenances=None):
    for i, (var, value) in enumerate(zip(outvars, values)):
      self.env[var] = value
      if provenances is not None and provenances[i] is not None:
        self.provenance[var] = provenances[i]


def _record_layer(eqn, ins, prov, wanted, found) -> None:
  """At a dot/conv with exactly one operand traced to a wanted leaf: record the layer."""
  for position in (0, 1):
    p = prov[position]
    if p is None or prov[1 - position] is not None:
      continue
    leaf, ops = p
    if leaf in wanted and leaf not in found:
      found[leaf] = (eqn.primitive, dict(eqn.params), position, ops, ins[1 - position])


def _step(frame: _Frame, eqn, wanted, found) -> None:
  """Interprets one equation: nested calls recursively, layers recorded, kernel ops followed."""
  ins = [frame.read(v) for v in eqn.invars]
  prov = [frame.origin(v) for v in eqn.invars]
  name = eqn.primitive.name
  sub = _sub_jaxpr(eqn) if name in _CALLS and any(prov) else None
  if sub is not None and len(sub[0].invars) == len(ins):
    outs, out_prov = _run(sub[0], sub[1], ins, prov, wanted, found)
    frame.write(eqn.outvars, outs, out_prov)
    return
  frame.write(eqn.outvars, _bind(eqn.primitive, eqn.params, ins))
  if name in _LAYER_PRIMITIVES and len(ins) == 2:
    _record_layer(eqn, ins, prov, wanted, found)
  elif name in _KERNEL_OPS and len(ins) == 1 and prov[0] is not None:
    leaf, ops = prov[0]
    frame.provenance[eqn.outvars[0]] = (leaf, ops + ((eqn.primitive, dict(eqn.params)),))


def _run(jaxpr, consts, args, provenance_in, wanted, found):
  """Evaluates ``jaxpr``; returns its outputs and their kernel provenance."""
  frame = _Frame(jaxpr, consts, args, provenance_in)
  for eqn in jaxpr.eqns:
    _step(frame, eqn, wanted, found)
  return ([frame.read(v) for v in jaxpr.outvars], [frame.origin(v) for v in jaxpr.outvars])


def capture_layer_inputs(apply_fn: Callable, params, batches: Sequence[jax.Array],
                         leaf_indices: Sequence[int]) -> tuple[dict[int, LayerCall], list]:
  """Runs ``apply_fn(params, x)`` on each batch, recording the wanted layers' inputs.

  Args:
    apply_fn: ``(params, x) -> outputs``, any JAX-traceable function.
    params: the parameter tree.
    batches: input batches (same shape each, so one trace serves all).
    leaf_indices: indices in ``jax.tree.leaves(params)`` of the kernels.

  Returns:
    ``({leaf_index: LayerCall}, outputs)`` where ``outputs`` holds the model's
    flattened outputs per batch. Leaves not consumed by a dot/conv are absent.
  """
  leaves, treedef = jax.tree.flatten(params)
  wanted = set(leaf_indices)
  closed = {}
  per_batch = []
  outputs = []
  for x in batches:
    key = (x.shape, str(x.dtype))
    if key not in closed:
      closed[key] = jax.make_jaxpr(
          lambda flat, x: apply_fn(treedef.unflatten(flat), x))(leaves, x)
    jaxpr = closed[key]
    args = list(leaves) + jax.tree.leaves(x)
    prov = [(i, ()) for i in range(len(leaves))] + [None] * (len(args) - len(leaves))
    found = {}
    outs, _ = _run(jaxpr.jaxpr, jaxpr.consts, args, prov, wanted, found)
    per_batch.append(found)
    outputs.append(outs)
  calls = {}
  for leaf in per_batch[0]:
    primitive, params_, position, ops, _ = per_batch[0][leaf]
    inputs = tuple(found[leaf][4] for found in per_batch)
    calls[leaf] = LayerCall(leaf, primitive, params_, position, ops, inputs)
  return calls, outputs
