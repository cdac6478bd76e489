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
  >>> params = {"b": {"kernel": jnp.ones((3, 2))}, "a": {"kernel": jnp.ones((2, 4))}}
  >>> forward_order(lambda p, x: x @ p["b"]["kernel"] @ p["a"]["kernel"],
  ...               params, jnp.ones((1, 3)))
  ['b/kernel', 'a/kernel']
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

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
  """

  def __init__(self, paths=(), *, stack_ndim=None, last_use=None,
               lookups=frozenset()):
    super().__init__(paths)
    self.stack_ndim = dict(stack_ndim or {})
    self.last_use = dict(last_use or {})
    self.lookups = frozenset(lookups)


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
  jaxpr, provenances, paths = trace(fn, params, *example_args, **kwargs)
  meets_data: dict[int, int] = {}
  last_meets: dict[int, int] = {}
  touched: dict[int, int] = {}
  lookups: set[int] = set()
  counter = [0]

  def visit(eqn, ins):
    counter[0] += 1
    leaves = union(ins).leaves
    for i in leaves:
      touched.setdefault(i, counter[0])
    if any(p.data for p in ins):
      for i in leaves:
        meets_data.setdefault(i, counter[0])
      # The last use reads the leaf itself (a value of params only), not an
      # activation that merely derives from it.
      for p in ins:
        if not p.data:
          for i in p.leaves:
            last_meets[i] = counter[0]
    if (eqn.primitive.name == "gather" and len(ins) >= 2
        and not ins[0].data and ins[1].data):
      lookups.update(ins[0].leaves)

  outs = walk(jaxpr, provenances, visit)
  reaching = union(outs).leaves
  for i in reaching:  # returned as is, with no operation on them
    touched.setdefault(i, counter[0] + 1)
  used = set(meets_data) | (set(touched) & reaching)
  if not used:
    raise ValueError(
        f"forward_order: fn uses none of the {len(paths)} parameter leaves "
        f"({', '.join(paths[:6])}{', ...' if len(paths) > 6 else ''}); does fn "
        "read its first argument (e.g. lambda p, x: model.apply({'params': p}, x))?")
  key = lambda i: ((0, meets_data[i]) if i in meets_data else (1, touched[i]), i)
  last = lambda i: ((0, last_meets[i]) if i in last_meets else (1, touched[i]), i)
  ordered = sorted(used, key=key)
  stacked = stacked_leaves(jaxpr, len(paths))
  return ForwardOrder(
      [paths[i] for i in ordered],
      stack_ndim={paths[i]: n for i, n in stacked.items() if i in used},
      last_use={paths[i]: rank for rank, i in enumerate(sorted(used, key=last))},
      lookups={paths[i] for i in lookups if i in used})
