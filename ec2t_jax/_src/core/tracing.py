"""Following parameter leaves through a jaxpr.

:func:`jax.make_jaxpr` turns ``fn(params, *inputs)`` into a list of primitive
equations. :func:`walk` runs through them in execution order and tracks, for
every variable, its :class:`Provenance`: the set of parameter leaves it derives
from and whether it depends on the inputs ("data"). Calls with a body of the
same arity (``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``,
``scan``, ``shard_map``...) are entered; ``cond`` and ``while`` optionally too
(every branch is visited; the union of their outputs is the result). Any other
equation's outputs derive from the union of its inputs.

Two users: :func:`forward_order` (which leaf the computation uses first) and
the report's layer geometry (``_src/report/geometry.py``: which conv / dense reads
which kernel).

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax import forward_order
  >>> params = {"b": {"kernel": jnp.ones((3, 2))}, "a": {"kernel": jnp.ones((2, 4))}}
  >>> forward_order(lambda p, x: x @ p["b"]["kernel"] @ p["a"]["kernel"],
  ...               params, jnp.ones((1, 3)))
  ['b/kernel', 'a/kernel']
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import jax

from ec2t_jax._src.core.trees import path_to_str
from ec2t_jax._src.core.trees import pure_tree


class Provenance(NamedTuple):
  """What a jaxpr variable derives from.

  Attributes:
    leaves: indices of the parameter leaves it depends on.
    data: whether it depends on the example inputs.
  """
  leaves: frozenset = frozenset()
  data: bool = False


NOTHING = Provenance()

# visit(eqn, ins): called for each equation walk() does not enter.
Visit = Callable[[object, list], None]


def is_literal(var) -> bool:
  return type(var).__name__ == "Literal"


def _as_jaxpr(item):
  """``(jaxpr)`` of a ClosedJaxpr or Jaxpr parameter, else ``None``."""
  jaxpr = getattr(item, "jaxpr", None)
  if jaxpr is not None and hasattr(jaxpr, "eqns"):
    return jaxpr
  if hasattr(item, "eqns") and hasattr(item, "invars"):
    return item
  return None


def sub_jaxprs(eqn) -> Iterator:
  """The jaxprs among an equation's parameters (bodies, branches)."""
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      jaxpr = _as_jaxpr(item)
      if jaxpr is not None:
        yield jaxpr


def union(provenances: Sequence[Provenance]) -> Provenance:
  """The provenance of a value computed from all of ``provenances``."""
  if not provenances:
    return NOTHING
  return Provenance(frozenset().union(*(p.leaves for p in provenances)),
                    any(p.data for p in provenances))


def walk(jaxpr, inputs: Sequence[Provenance], visit: Visit, *,
         control_flow: bool = True) -> list[Provenance]:
  """Propagates provenance through ``jaxpr``; calls ``visit`` on each equation.

  Args:
    jaxpr: a ``jax.core.Jaxpr`` (``closed.jaxpr`` of :func:`jax.make_jaxpr`).
    inputs: provenance of each of ``jaxpr.invars``.
    visit: ``visit(eqn, ins)`` for every equation not entered, in execution
      order, with the provenance of its inputs (literals and constants have
      :data:`NOTHING`).
    control_flow: also enter ``cond`` branches and ``while`` bodies.

  Returns:
    The provenance of each of ``jaxpr.outvars``.
  """
  env = dict(zip(jaxpr.invars, inputs))

  def get(var):
    return NOTHING if is_literal(var) else env.get(var, NOTHING)

  for eqn in jaxpr.eqns:
    ins = [get(v) for v in eqn.invars]
    outs = _enter(eqn, ins, visit, control_flow)
    if outs is None:
      visit(eqn, ins)
      outs = [union(ins)] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [get(v) for v in jaxpr.outvars]


def _enter(eqn, ins, visit, control_flow):
  """Walks the body of a call-like equation; ``None`` if not entered."""
  name = eqn.primitive.name
  if control_flow and name == "cond":
    branches = [_as_jaxpr(b) for b in eqn.params["branches"]]
    results = [walk(b, ins[1:], visit, control_flow=True) for b in branches]
    index = ins[0]
    return [union([index, *outs]) for outs in zip(*results)]
  if control_flow and name == "while":
    n_cond = eqn.params["cond_nconsts"]
    n_body = eqn.params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
    carry = ins[n_cond + n_body:]
    walk(_as_jaxpr(eqn.params["cond_jaxpr"]), cond_consts + carry, visit,
         control_flow=True)
    outs = walk(_as_jaxpr(eqn.params["body_jaxpr"]), body_consts + carry, visit,
                control_flow=True)
    return [union([c, o]) for c, o in zip(carry, outs)]
  subs = list(sub_jaxprs(eqn))
  if len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
    outs = walk(subs[0], ins, visit, control_flow=control_flow)
    if len(outs) == len(eqn.outvars):
      return outs
  return None


def trace(fn: Callable, params, *inputs, **kwargs):
  """``make_jaxpr`` of ``fn(params, *inputs, **kwargs)`` with flat inputs.

  Returns:
    ``(jaxpr, provenances, paths)``: the jaxpr, the provenance of each of its
    inputs (leaf ``i`` of ``params`` for the first ones, data for the rest) and
    the ``/``-joined path of each parameter leaf (the convention of
    :mod:`ec2t_jax._src.core.selection`).
  """
  leaves, structure = jax.tree.flatten(params)
  named = jax.tree_util.tree_flatten_with_path(pure_tree(params))[0]
  if len(named) != len(leaves):
    raise ValueError(f"params has {len(leaves)} leaves but {len(named)} after "
                     "unwrapping NNX variables; pass a plain tree or an nnx.State")
  paths = [path_to_str(p) for p, _ in named]

  def flat_fn(flat_params, flat_inputs):
    return fn(jax.tree.unflatten(structure, flat_params), *flat_inputs, **kwargs)

  closed = jax.make_jaxpr(flat_fn)(list(leaves), list(inputs))
  jaxpr = closed.jaxpr
  provenances = [Provenance(frozenset([i]), False) if i < len(leaves)
                 else Provenance(frozenset(), True)
                 for i in range(len(jaxpr.invars))]
  return jaxpr, provenances, paths


class TracedPath(str):
  """One path of a :class:`ForwardOrder`: a ``str`` that remembers its trace.

  ``list(order)``, ``tuple(order)`` or ``order[:]`` keep the paths' link to
  what the trace showed, so :class:`~ec2t_jax.Selection` can keep it (an
  unchanged copy) or refuse it (an edited one) instead of losing it.
  ``str(path)`` is a plain string.
  """
  __slots__ = ("trace",)


class ForwardOrder(list):
  """:func:`forward_order`'s result: the paths (a ``list``), plus what the
  trace showed about them, which :class:`~ec2t_jax.Selection` reads.

  Attributes:
    stack_ndim: path -> number of leading axes along which a ``scan`` slices
      the leaf (``nn.scan`` / ``nnx.scan`` stacks of layers: one layer per
      slice); only stacked leaves are listed.
    last_use: path -> rank of the leaf's *last* use (same counting as the
      first use that orders the list); a tied embedding is used first (the
      lookup) and last (the output projection).
    lookups: paths read by a ``gather`` indexed by the data (embedding
      lookups).
    output_axes: path -> output axis of one slice, for every leaf that
      enters a ``dot_general`` or a convolution as the weight operand (the
      other operand derived from the data): the weight's non-contracting,
      non-batch axis that survives into the output (the leaf's last such axis when
      several do, ``-1`` when it is the slice's last axis or could not be
      followed back to the leaf).
    all_paths: every leaf path of the traced tree, used or not.
  """

  def __init__(self, paths=(), *, stack_ndim=None, last_use=None,
               lookups=frozenset(), output_axes=None, all_paths=None):
    super().__init__(TracedPath(p) for p in paths)
    for p in self:
      p.trace = self
    self.stack_ndim = dict(stack_ndim or {})
    self.last_use = dict(last_use or {})
    self.lookups = frozenset(lookups)
    self.output_axes = dict(output_axes or {})
    self.all_paths = tuple(self if all_paths is None else all_paths)

  @property
  def multiplied(self) -> frozenset:
    """The paths that enter a matrix multiply or a convolution as a weight."""
    return frozenset(self.output_axes)


_PASS_THROUGH = ("convert_element_type", "copy", "copy_p", "reduce_precision",
                 "optimization_barrier")


def stacked_leaves(jaxpr, num_leaves: int) -> dict[int, int]:
  """Leaf index -> number of leading axes sliced by (nested) ``scan``-s.

  Follows each parameter leaf, unchanged or cast, into call bodies and into
  ``scan``: a leaf passed as one of a scan's ``xs`` is sliced along its
  leading axis; inside the body, the slice may enter a nested scan (the next
  axis). Leaves whose slicing is not consistent (two scans slicing different
  depths) count the deepest.
  """
  found: dict[int, int] = {}

  def visit(jaxpr, env):
    for eqn in jaxpr.eqns:
      ins = [None if is_literal(v) else env.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in _PASS_THROUGH and len(eqn.outvars) == 1:
        if ins and ins[0] is not None:
          env[eqn.outvars[0]] = ins[0]
        continue
      if name == "scan":
        body = _as_jaxpr(eqn.params["jaxpr"])
        n_fixed = eqn.params["num_consts"] + eqn.params["num_carry"]
        inner = {}
        for k, (var, entry) in enumerate(zip(body.invars, ins)):
          if entry is None:
            continue
          leaf, depth = entry
          if k >= n_fixed:
            found[leaf] = max(found.get(leaf, 0), depth + 1)
            inner[var] = (leaf, depth + 1)
          elif k < eqn.params["num_consts"]:
            inner[var] = entry
        visit(body, inner)
        continue
      if name == "cond":
        for branch in eqn.params["branches"]:
          branch = _as_jaxpr(branch)
          visit(branch, {v: e for v, e in zip(branch.invars, ins[1:])
                         if e is not None})
        continue
      subs = list(sub_jaxprs(eqn))
      if len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
        visit(subs[0], {v: e for v, e in zip(subs[0].invars, ins)
                        if e is not None})

  visit(jaxpr, {v: (i, 0) for i, v in enumerate(jaxpr.invars[:num_leaves])})
  return found


# Ops whose output axes are the operand's axes, one to one (sizes may change).
_SAME_AXES = frozenset(_PASS_THROUGH) | {
    "neg", "abs", "sign", "sqrt", "rsqrt", "exp", "log", "tanh", "logistic",
    "integer_pow", "pow", "mul", "add", "sub", "div", "max", "min", "select_n",
    "clamp", "slice", "dynamic_slice", "pad", "concatenate", "rev", "cumsum",
    "sharding_constraint", "real", "stop_gradient", "square", "round", "floor", "ceil"}


def _next_run(old_shape, new_shape, i, j):
  """Ends ``(i, j)`` of the shortest runs ``old_shape[i:]``, ``new_shape[j:]``
  whose sizes multiply to the same product."""
  a = b = 1
  if i < len(old_shape):
    a *= old_shape[i]; i += 1
  if j < len(new_shape):
    b *= new_shape[j]; j += 1
  while a != b and (i < len(old_shape) or j < len(new_shape)):
    if (a < b or j == len(new_shape)) and i < len(old_shape):
      a *= old_shape[i]; i += 1
    else:
      b *= new_shape[j]; j += 1
  return i, j


def _reshape_axes(old_shape, new_shape, axes):
  """Leaf axes of a reshaped view: runs of axes whose sizes multiply to the
  same product map to each other; a merged or split run maps to its last
  leaf axis (size-1 axes to none)."""
  out = [None] * len(new_shape)
  i = j = 0
  while i < len(old_shape) or j < len(new_shape):
    i0, j0 = i, j
    i, j = _next_run(old_shape, new_shape, i, j)
    mapped = [axes[k] for k in range(i0, i) if old_shape[k] != 1 and axes[k] is not None]
    single = i - i0 == 1 and j - j0 == 1
    for k in range(j0, j):
      if new_shape[k] != 1 and mapped:
        out[k] = mapped[0] if single else mapped[-1]
  return tuple(out)


# Same-axes primitives whose output shape may differ from the input's.
_RESHAPING_SAME_AXES = ("slice", "dynamic_slice", "pad", "concatenate", "rev")


def _keeps_axes(name, in_shape, out_shape) -> bool:
  """Whether primitive ``name`` keeps each operand axis at the same index."""
  return name in _SAME_AXES and len(in_shape) == len(out_shape) and (
      in_shape == out_shape or name in _RESHAPING_SAME_AXES)


def _squeeze_axes(dimensions, axes):
  """Leaf axes left after ``squeeze`` drops ``dimensions``."""
  drop = {d % len(axes) for d in dimensions}
  return tuple(a for d, a in enumerate(axes) if d not in drop)


def _broadcast_axes(broadcast_dimensions, in_shape, out_shape, axes):
  """Leaf axes of a ``broadcast_in_dim`` output (new and broadcast axes: None)."""
  new = [None] * len(out_shape)
  for d, target in enumerate(broadcast_dimensions):
    if in_shape[d] == out_shape[target]:  # a broadcast axis is not the leaf's
      new[target] = axes[d]
  return tuple(new)


def _operand_view(eqn, k, in_shape, out_shape, axes):
  """A leaf's axes in the output of ``eqn``, given its ``axes`` in operand
  ``k`` (None: the output is not a view of it)."""
  name = eqn.primitive.name
  if name == "transpose":
    return tuple(axes[a] for a in eqn.params["permutation"])
  if name == "reshape" and k == 0:
    return _reshape_axes(in_shape, out_shape, axes)
  if name == "squeeze":
    return _squeeze_axes(eqn.params["dimensions"], axes)
  if name == "broadcast_in_dim" and k == 0:
    return _broadcast_axes(eqn.params["broadcast_dimensions"], in_shape, out_shape, axes)
  if _keeps_axes(name, in_shape, out_shape):
    return axes
  return None


def _view_of(eqn, ins):
  """Per leaf, its axes in the single output of ``eqn`` (``{}``: not a view)."""
  out_shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
  views = {}
  for k, (_, view) in enumerate(ins):
    if not view:
      continue
    in_shape = tuple(getattr(eqn.invars[k].aval, "shape", ()))
    for leaf, axes in view.items():
      new = _operand_view(eqn, k, in_shape, out_shape, axes)
      if new is not None:
        views.setdefault(leaf, new)
  return views


def _weight_specs(eqn):
  """``((contracting, batch) axes of the lhs, of the rhs)`` of a matmul or
  convolution; None for any other primitive."""
  name = eqn.primitive.name
  if name == "dot_general":
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    return ((contract_l, batch_l), (contract_r, batch_r))
  if name == "conv_general_dilated":
    lhs, rhs, _ = eqn.params["dimension_numbers"]
    return ((tuple(lhs[1:]), ()), (tuple(rhs[1:]), ()))
  return None


def _is_weight_operand(ins, k) -> bool:
  """Whether operand ``k`` derives from leaves alone and the other from the data."""
  (data, view), other = ins[k], ins[1 - k]
  return bool(view) and not data and bool(other[0])


def _free_axes(eqn, k, contract, batch):
  """Operand ``k``'s axes that survive into the output (a convolution's: its
  feature axis)."""
  if eqn.primitive.name == "conv_general_dilated":
    return [eqn.params["dimension_numbers"][k][0]]
  ndim = len(getattr(eqn.invars[k].aval, "shape", ()))
  return [d for d in range(ndim) if d not in contract and d not in batch]


def _weight_axes(view, contract, free):
  """``{leaf: output axis or None}`` of the leaves in a weight operand's ``view``."""
  found = {}
  for leaf, axes in view.items():
    if not any(axes[d] is not None for d in contract):
      continue  # only broadcast axes are summed over: not a weight
    mapped = [axes[d] for d in free if axes[d] is not None]
    found.setdefault(leaf, max(mapped) if mapped else None)
  return found


def _weight_use(eqn, ins):
  """``{leaf: output axis or None}`` of a matmul or convolution's weight operand."""
  specs = _weight_specs(eqn)
  if specs is None:
    return {}
  found = {}
  for k in (0, 1):
    if not _is_weight_operand(ins, k):
      continue
    contract, batch = (tuple(x) for x in specs[k])
    free = _free_axes(eqn, k, contract, batch)
    for leaf, axis in _weight_axes(ins[k][1], contract, free).items():
      found.setdefault(leaf, axis)
  return found


def weight_uses(jaxpr, num_leaves: int) -> dict[int, Optional[int]]:
  """Leaf index -> output axis (of the whole leaf; None if not followed) of
  every leaf that enters a ``dot_general`` or ``conv_general_dilated`` as the
  weight: the operand derived from the leaf alone (through casts, reshapes,
  transposes, slices, broadcasts, elementwise ops and ``scan`` slicing) while
  the other operand derives from the data. The first such use counts.
  """
  found: dict[int, Optional[int]] = {}
  NONE = (False, {})

  def run(jaxpr, inputs):
    env = dict(zip(jaxpr.invars, inputs))
    get = lambda v: NONE if is_literal(v) else env.get(v, NONE)
    for eqn in jaxpr.eqns:
      ins = [get(v) for v in eqn.invars]
      outs = enter(eqn, ins)
      if outs is None:
        for leaf, axis in _weight_use(eqn, ins).items():
          found.setdefault(leaf, axis)
        data = any(d for d, _ in ins)
        view = {} if data or len(eqn.outvars) != 1 else _view_of(eqn, ins)
        if eqn.primitive.name == "optimization_barrier":
          outs = list(ins)
        else:
          outs = [(data, view)] * len(eqn.outvars)
      env.update(zip(eqn.outvars, outs))
    return [get(v) for v in jaxpr.outvars]

  def loop(body, fixed, carry, xs=()):
    """Runs a loop body until the carry's data flags settle."""
    for _ in range(2):
      outs = run(body, fixed + [(d, {}) for d, _ in carry] + list(xs))
      settled = [(d or o[0], {}) for (d, _), o in zip(carry, outs)]
      if settled == [(d, {}) for d, _ in carry]:
        break
      carry = settled
    return outs

  def enter(eqn, ins):
    name = eqn.primitive.name
    if name == "scan":
      body = _as_jaxpr(eqn.params["jaxpr"])
      n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
      xs = [(d, {leaf: axes[1:] for leaf, axes in view.items()})
            for d, view in ins[n_consts + n_carry:]]
      outs = loop(body, ins[:n_consts], ins[n_consts:n_consts + n_carry], xs)
      return [(d, {}) for d, _ in outs]
    if name == "while":
      n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
      carry = ins[n_cond + n_body:]
      outs = loop(_as_jaxpr(eqn.params["body_jaxpr"]), ins[n_cond:n_cond + n_body], carry)
      run(_as_jaxpr(eqn.params["cond_jaxpr"]), ins[:n_cond] + [(True, {})] * len(carry))
      return [(d or c[0], {}) for (d, _), c in zip(outs, carry)]
    if name == "cond":
      results = [run(_as_jaxpr(b), ins[1:]) for b in eqn.params["branches"]]
      return [(ins[0][0] or any(o[0] for o in outs), {}) for outs in zip(*results)]
    subs = list(sub_jaxprs(eqn))
    if len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
      outs = run(subs[0], ins)
      if len(outs) == len(eqn.outvars):
        return outs
    return None

  leaves = [(False, {i: tuple(range(len(getattr(v.aval, "shape", ()))))})
            for i, v in enumerate(jaxpr.invars[:num_leaves])]
  run(jaxpr, leaves + [(True, {})] * (len(jaxpr.invars) - num_leaves))
  return found


def _check_params_tree(params) -> None:
  """Raises TypeError if ``params`` is a bare array rather than a tree."""
  if not jax.tree_util.treedef_children(jax.tree.structure(pure_tree(params))) \
      and jax.tree.leaves(params):
    raise TypeError(
        "forward_order(fn, params, *example_args): params is a bare "
        f"{type(params).__name__} of shape {getattr(params, 'shape', '?')}, not a "
        "tree of parameters; pass the params tree first and the example inputs "
        "after it (were the arguments swapped?)")


def _first_paths(paths) -> str:
  """The first six ``paths``, comma-joined, with ``, ...`` if there are more."""
  return f"{', '.join(paths[:6])}{', ...' if len(paths) > 6 else ''}"


def _is_lookup(eqn, ins) -> bool:
  """Whether ``eqn`` gathers from a leaf-only operand at data indices."""
  return (eqn.primitive.name == "gather" and len(ins) >= 2
          and not ins[0].data and ins[1].data)


class _LeafUses:
  """Ranks, per leaf index, of its first and last use with the data and of
  its first operation, and the embedding lookups, recorded by :meth:`visit`
  (a :func:`walk` callback) in execution order."""

  def __init__(self):
    self.meets_data: dict[int, int] = {}
    self.last_meets: dict[int, int] = {}
    self.touched: dict[int, int] = {}
    self.lookups: set[int] = set()
    self.count = 0

  def visit(self, eqn, ins) -> None:
    """Records one operation ``eqn`` on operands of provenances ``ins``."""
    self.count += 1
    leaves = union(ins).leaves
    for i in leaves:
      self.touched.setdefault(i, self.count)
    if any(p.data for p in ins):
      self._meet_data(leaves, ins)
    if _is_lookup(eqn, ins):
      self.lookups.update(ins[0].leaves)

  def _meet_data(self, leaves, ins) -> None:
    """Records an operation that combines ``leaves`` with the data."""
    for i in leaves:
      self.meets_data.setdefault(i, self.count)
    # The last use reads the leaf itself (a value of params only), not an
    # activation that merely derives from it.
    for p in ins:
      if not p.data:
        for i in p.leaves:
          self.last_meets[i] = self.count

  def used(self, reaching) -> set[int]:
    """Leaves that meet the data or reach the outputs (``reaching``)."""
    for i in reaching:  # returned as is, with no operation on them
      self.touched.setdefault(i, self.count + 1)
    return set(self.meets_data) | (set(self.touched) & reaching)

  def first_key(self, i):
    """Sort key of leaf ``i`` by first use (meeting the data before not)."""
    return ((0, self.meets_data[i]) if i in self.meets_data else (1, self.touched[i]), i)

  def last_key(self, i):
    """Sort key of leaf ``i`` by last use (meeting the data before not)."""
    return ((0, self.last_meets[i]) if i in self.last_meets else (1, self.touched[i]), i)


def forward_order(fn: Callable, params, *example_args, **kwargs) -> ForwardOrder:
  """Parameter paths in the order ``fn(params, *example_args)`` first uses them.

  A leaf is *used* by the first primitive operation (in execution order,
  inside ``pjit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``scan``,
  ``cond`` and ``while`` bodies too) that combines a value derived from it
  with a value derived from the example arguments, e.g. the
  ``conv_general_dilated`` of a kernel with the activations, or the ``add``
  of a bias. Casts and reshapes of a leaf alone are not uses, so the order is
  the forward order of the layers even when a function prepares its
  parameters up front. Leaves that never meet the data but still flow into
  the outputs follow, by the order of their first operation; leaves ``fn``
  ignores are left out. Only :func:`jax.make_jaxpr` runs: nothing is computed.

  Pass the result to :class:`Selection` (``Selection(order=...)``) so that the
  paper's "first and last kernel" rule means the input and output layer
  whatever the names and however the tree's keys were re-sorted.

  Args:
    fn: ``fn(params, *example_args, **kwargs)``, e.g.
      ``lambda p, x: model.apply({"params": p}, x)`` (Linen) or
      ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX).
    params: the tree the optimizer will see: a Linen params dict, an
      ``nnx.State``, arrays or ``jax.ShapeDtypeStruct``.
    *example_args: example inputs (shapes and dtypes matter, values do not).
    **kwargs: forwarded to ``fn`` (static, e.g. ``train=False``).

  Returns:
    A :class:`ForwardOrder`: the ``/``-joined paths
    (``params/Conv_0/kernel``-style, as in :func:`describe_selection`), first
    used first, a ``list``; it also carries which leaves are stacks of layers
    sliced by a ``scan`` (``stack_ndim``), each leaf's last use and which
    leaves are embedding lookups, which :class:`~ec2t_jax.Selection` uses.

  Raises:
    ValueError: ``fn`` uses none of the leaves of ``params``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from ec2t_jax import forward_order
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     head, stem = nn.Dense(2, name="head"), nn.Dense(3, name="stem")
    ...     return head(nn.relu(stem(x)))
    >>> x = jnp.ones((1, 4))
    >>> params = Net().init(jax.random.key(0), x)["params"]
    >>> forward_order(lambda p, x: Net().apply({"params": p}, x), params, x)
    ['stem/kernel', 'stem/bias', 'head/kernel', 'head/bias']
  """
  _check_params_tree(params)
  jaxpr, provenances, paths = trace(fn, params, *example_args, **kwargs)
  uses = _LeafUses()
  outs = walk(jaxpr, provenances, uses.visit)
  used = uses.used(union(outs).leaves)
  if not used:
    raise ValueError(
        f"forward_order: fn uses none of the {len(paths)} parameter leaves "
        f"({_first_paths(paths)}); does fn "
        "read its first argument (e.g. lambda p, x: model.apply({'params': p}, x))?")
  ordered = sorted(used, key=uses.first_key)
  stacked = stacked_leaves(jaxpr, len(paths))
  weights = weight_uses(jaxpr, len(paths))
  if not weights:
    raise ValueError(
        f"forward_order: none of the {len(paths)} parameter leaves "
        f"({_first_paths(paths)}) enters a "
        "matrix multiply or a convolution as a weight; is the first argument "
        "after fn the params tree (forward_order(fn, params, *example_args)), "
        "and does fn multiply the example inputs by it?")
  in_vars = jaxpr.invars
  return ForwardOrder(
      [paths[i] for i in ordered],
      stack_ndim={paths[i]: n for i, n in stacked.items() if i in used},
      last_use={paths[i]: rank for rank, i in enumerate(sorted(used, key=uses.last_key))},
      lookups={paths[i] for i in uses.lookups if i in used},
      output_axes={paths[i]: _slice_axis(axis, stacked.get(i, 0),
                                         len(getattr(in_vars[i].aval, "shape", ())))
                   for i, axis in weights.items()},
      all_paths=paths)


def _slice_axis(axis: Optional[int], stack_ndim: int, ndim: int) -> int:
  """A leaf's output axis as an index into one slice; -1 for the last (or unknown)."""
  if axis is None or axis < stack_ndim or axis == ndim - 1:
    return -1
  return axis - stack_ndim
