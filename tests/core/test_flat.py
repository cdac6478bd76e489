"""Flat buffers: one trace of a method's step for every leaf, the same numbers as per leaf.

The oracle of the flat path (``_src/core/flat.py``) is the grouped / per-leaf path
(``Quantizer(layout="grouped")``): every registered train-time method follows the same
trajectory on both; the segment reductions equal per-leaf numpy reductions.
"""

import functools
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core
from ec2t_jax._src.core import flat as flat_lib
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.methods import inq as inq_lib
from ec2t_jax._src.methods.ec2t import ternary
from models_for_tests import stack_and_head

# ------------------------------------------------------------- segments


# Segment sizes with a gcd of 2 (per-element segment ids) and of 16 (chunk by chunk).
SHAPES = [((3, 4), -1), ((2, 3, 5), 1), ((6,), 0), ((4, 2), 0)]
CHUNKED_SHAPES = [((4, 8), -1), ((2, 4, 8), 1), ((16,), 0), ((8, 2), 0)]


def _flat_segments(shapes):
  contexts, states = [], []
  for i, (shape, axis) in enumerate(shapes):
    contexts.append(core.LeafContext(f"w{i}", shape, jnp.float32, "ternary", None, 1.0,
                                     output_axis=axis))
    states.append(_Latent(jnp.zeros(shape)))
  return segments_lib.FlatSegments(flat_lib.pack(states, contexts, ("element",)).table)


class _Latent(NamedTuple):  # a one-field state, enough for pack()
  latent: jax.Array


@pytest.mark.parametrize("shapes", [SHAPES, CHUNKED_SHAPES], ids=["ids", "chunks"])
@pytest.mark.parametrize("per_filter", [False, True], ids=["per_layer", "per_filter"])
@pytest.mark.parametrize("op", ["sum", "max", "min", "numel", "std"])
def test_flat_segment_reductions_expanded_equal_each_leafs_own(op, per_filter, shapes):
  segments = _flat_segments(shapes)
  assert bool(segments.chunk) == (shapes is CHUNKED_SHAPES)
  rng = np.random.default_rng(0)
  leaves = [rng.normal(size=shape).astype(np.float32) for shape, _ in shapes]
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
  reduce = {"sum": segments.sum, "max": segments.max, "min": segments.min,
            "numel": segments.numel,
            "std": lambda x, pf: segments_lib.std(segments, x, pf)}[op]
  flat = flat.reshape(segments.element_shape)  # as a step sees the buffer
  got = np.broadcast_to(segments.expand(reduce(flat, per_filter), per_filter),
                        segments.element_shape).ravel()
  offset = 0
  for x, (shape, axis) in zip(leaves, shapes):
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim) if per_filter else None
    want = {"sum": lambda: np.sum(x, axis=axes, keepdims=True),
            "max": lambda: np.max(x, axis=axes, keepdims=True),
            "min": lambda: np.min(x, axis=axes, keepdims=True),
            "numel": lambda: np.full((1,) * x.ndim, x.size // (x.shape[axis] if per_filter
                                                               else 1), np.float32),
            "std": lambda: np.std(x, axis=axes, keepdims=True)}[op]()
    np.testing.assert_allclose(got[offset:offset + x.size].reshape(shape),
                               np.broadcast_to(want, shape), rtol=1e-6, atol=1e-6)
    offset += x.size


@pytest.mark.parametrize("shapes", [SHAPES, CHUNKED_SHAPES], ids=["ids", "chunks"])
def test_flat_descending_rank_equals_each_leafs_stable_argsort(shapes):
  segments = _flat_segments(shapes)
  rng = np.random.default_rng(1)
  leaves = [rng.integers(0, 4, size=shape).astype(np.float32) for shape, _ in shapes]  # ties
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves]).reshape(segments.element_shape)
  got = np.asarray(segments.descending_rank(flat)).ravel()
  offset = 0
  for x in leaves:
    want = np.empty(x.size, np.int32)
    want[np.argsort(-x.ravel(), kind="stable")] = np.arange(x.size)
    np.testing.assert_array_equal(got[offset:offset + x.size], want)
    np.testing.assert_array_equal(segments_lib.LeafSegments().descending_rank(x).ravel(), want)
    offset += x.size


@pytest.mark.parametrize("shapes", [SHAPES, CHUNKED_SHAPES], ids=["ids", "chunks"])
def test_flat_cluster_sums_equal_each_leafs_per_cluster_sums(shapes):
  segments = _flat_segments(shapes)
  rng = np.random.default_rng(2)
  k = 3
  leaves = [rng.normal(size=shape + (k,)).astype(np.float32) for shape, _ in shapes]
  flat = jnp.concatenate([x.reshape(-1, k) for x in leaves]).reshape(
      segments.element_shape + (k,))
  got = np.asarray(segments.cluster_sum(flat))
  assert got.shape == (len(shapes), k)
  for row, x in zip(got, leaves):
    np.testing.assert_allclose(row, x.reshape(-1, k).sum(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(segments_lib.LeafSegments().cluster_sum(x), row,
                               rtol=1e-5, atol=1e-6)


def test_a_step_input_shaped_neither_like_the_params_nor_per_layer_is_an_error():
  contexts = [core.LeafContext(f"w{i}", shape, jnp.float32, "ternary", None, 1.0)
              for i, shape in enumerate([(3, 4), (6,)])]
  group = flat_lib.pack([_Latent(jnp.zeros((3, 4))), _Latent(jnp.zeros((6,)))], contexts,
                        ("element",))
  with pytest.raises(ValueError, match=r"shaped like each member's param or its stack.*\(4,\)"):
    flat_lib.step(lambda x, state, ctx: state, [jnp.zeros((3, 4)), jnp.zeros((4,))], group,
                  contexts[0], jnp.asarray(False))


def test_leaf_segments_reduce_a_layer_to_a_scalar_and_a_filter_to_its_channel():
  w = jnp.arange(6.0).reshape(2, 3)
  segments = segments_lib.LeafSegments(output_axis=0)
  assert segments.sum(w).shape == ()
  np.testing.assert_array_equal(segments.sum(w, per_filter=True), [[3.0], [12.0]])
  assert float(segments.numel(w, per_filter=True)) == 3.0


def test_ec2t_cluster_probabilities_per_segment_equal_each_layers():
  segments = _flat_segments([((4,), 0), ((6,), 0)])
  a = jnp.array([1, 1, 1, -1, 0, 0, 0, 1, -1, -1], jnp.int8)
  got = ternary.cluster_probabilities(a, segments=segments)
  assert got.shape == (3, 2)  # one (P_n, P_0, P_p) per segment
  np.testing.assert_allclose(got[:, 0], ternary.cluster_probabilities(a[:4]))
  np.testing.assert_allclose(got[:, 1], ternary.cluster_probabilities(a[4:]))


# ------------------------------------------------------------- the trajectory


class Net(nn.Module):
  """Three selected kernels of three shapes (a 4-d one among them) between the full-precision
  first and last layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x.mean(axis=(1, 2))
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


MODEL = Net()
X = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), X)["params"]  # one compile, not one per op
SELECT = ec2t.Selection(order=ec2t.forward_order(
    lambda p, x: MODEL.apply({"params": p}, x), PARAMS, X))
# Every method that trains: "train" and the staged ones (INQ, SLQ/MLQ).
TRAIN = sorted(n for n, spec in ec2t.method_registry().items() if spec.kind != "one_shot")
STEPS = 2  # the second step is the one a non-finite test poisons
# The loss: a smooth function of each param against a fixed target (no forward pass of the
# model, whose compilation would dominate these tests; the quantizer sees varied gradients).
TARGETS = jax.tree.map(  # numpy: no compilation per shape at import
    lambda p: np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), PARAMS)


def _loss(params):
  terms = jax.tree.map(lambda p, t: jnp.mean(jnp.sin(3.0 * p) * t + 0.5 * p * p), params,
                       TARGETS)
  return sum(jax.tree.leaves(terms))


# Knobs that make a method's few steps exercise all of its step: the staged methods advance
# a stage every step (INQ's partition by magnitude, ranked within each layer; SLQ/MLQ's
# re-clustering and freezing, each layer on its own codebook).
KNOBS = {"inq": {"steps_per_stage": 1}, "slq": {"steps_per_stage": 1},
         "mlq": {"steps_per_stage": 1}}


def _trajectory(name, layout, params=PARAMS, nonfinite_at=None, knobs=()):
  spec = ec2t.method_registry()[name]
  quantizer = spec.build(selection=SELECT, **KNOBS.get(name, {}), **dict(knobs))._replace(
      layout=layout)
  tx = optax.chain(optax.adam(1e-2), quantizer.transform())
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)

  @jax.jit
  def step(params, state, poison):
    grads = jax.grad(_loss)(params)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.where(poison & (jax.tree_util.keystr(path) == nonfinite_at),
                                  jnp.nan, g), grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    params, state = step(params, state, jnp.asarray(i == 1))
  return params, ec2t.find_quantizer_state(state)


def _layout_trajectory(name, layout, knobs=()):
  """:func:`_trajectory` from ``PARAMS``, computed once per module (``knobs``: pairs)."""
  return _cached_trajectory(name, layout, tuple(knobs))


@functools.cache  # one key per trajectory, however the caller spells the knobs
def _cached_trajectory(name, layout, knobs):
  return _trajectory(name, layout, knobs=knobs)


def _is_flat(name):
  return ec2t.method_registry()[name].build().method.flat


# A method without a flat step takes the grouped path under both layouts: the same code,
# so its case is in the slow set.
@pytest.mark.parametrize("name", [n if _is_flat(n) else pytest.param(n, marks=pytest.mark.slow)
                                  for n in TRAIN])
def test_flat_and_grouped_layouts_follow_the_same_trajectory(name):
  flat_params, flat_state = _layout_trajectory(name, "flat")
  grouped_params, grouped_state = _layout_trajectory(name, "grouped")
  chex.assert_trees_all_close(flat_params, grouped_params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(flat_state.resolved_leaves(), grouped_state.resolved_leaves(),
                              atol=1e-6, rtol=1e-5)
  assert int(flat_state.nonfinite_count) == int(grouped_state.nonfinite_count)


def test_inq_stages_freeze_the_same_weights_of_each_layer_in_a_flat_buffer_as_per_leaf():
  # KNOBS: a stage every step, so the second step froze the second portion of each layer.
  # (The trajectories are equal up to the compiler: the test above.)
  frozen = {}
  for layout in ("flat", "grouped"):
    leaves = jax.tree.leaves(_layout_trajectory("inq", layout)[1].resolved_leaves(),
                             is_leaf=lambda x: isinstance(x, ec2t.InqLeaf))
    frozen[layout] = [np.asarray(leaf.frozen) for leaf in leaves]
  for flat_mask, grouped_mask in zip(frozen["flat"], frozen["grouped"]):
    np.testing.assert_array_equal(flat_mask, grouped_mask)
  first, second = inq_lib.OFFICIAL_PORTIONS[:2]
  fractions = [float(np.mean(mask)) for mask in frozen["flat"]]
  assert len(fractions) == 3 and all(first < f <= second + 0.05 for f in fractions), fractions


# SLQ's official order (by index) is in the trajectory test; its loss order here.
# The loss order's case computes two more trajectories: slow (its flat freezing is also
# tested on its own, in tests/methods/test_slq.py).
@pytest.mark.parametrize("name,knobs", [
    ("slq", ()), pytest.param("slq", (("freeze_order", "loss"),), marks=pytest.mark.slow),
    ("mlq", ())], ids=["slq-index", "slq-loss", "mlq"])
def test_slq_and_mlq_cluster_and_freeze_each_layer_in_a_flat_buffer_as_per_leaf(name, knobs):
  # KNOBS: a stage every step, so the second step re-clustered each started layer's free
  # weights and froze more clusters (MLQ: the first layer only; the second starts).
  got = {}
  for layout in ("flat", "grouped"):
    state = _layout_trajectory(name, layout, knobs)[1]
    got[layout] = jax.tree.leaves(state.resolved_leaves(),
                                  is_leaf=lambda x: isinstance(x, ec2t.SlqLeaf))
  for flat_leaf, grouped_leaf in zip(got["flat"], got["grouped"]):
    for field in ("frozen", "locked", "stage"):
      np.testing.assert_array_equal(getattr(flat_leaf, field), getattr(grouped_leaf, field))
    np.testing.assert_allclose(flat_leaf.levels, grouped_leaf.levels, rtol=1e-5, atol=1e-6)
  stages = [int(leaf.stage) for leaf in got["flat"]]
  assert stages == ([1, 1, 1] if name == "slq" else [1, 0, -1]), stages
  first = got["flat"][0]
  assert 0 < float(np.mean(first.frozen)) and np.asarray(first.locked).any()


@pytest.mark.parametrize("name", [n for n in TRAIN if _is_flat(n)])
def test_a_flat_method_keeps_all_its_leaves_in_one_buffer(name):
  state = ec2t.method_registry()[name].build(selection=SELECT).transform().init(PARAMS)
  assert [type(g).__name__ for g in state.groups] == ["FlatGroup"]
  assert len(state.groups[0].layout.members) == len(ec2t.summary(state).layers)


def test_a_non_finite_update_keeps_only_that_leafs_state_in_a_flat_buffer():
  poisoned = "['Conv_1']['kernel']"
  flat_params, flat_state = _trajectory("twn", "flat", nonfinite_at=poisoned)
  grouped_params, grouped_state = _trajectory("twn", "grouped", nonfinite_at=poisoned)
  # Adam's moments carry the NaN on: every later step is non-finite too, on both paths.
  assert int(flat_state.nonfinite_count) == int(grouped_state.nonfinite_count) > 0
  chex.assert_trees_all_close(flat_params, grouped_params, atol=1e-6)
  chex.assert_trees_all_close(flat_state.resolved_leaves(), grouped_state.resolved_leaves(),
                              atol=1e-6)


def test_a_stacked_leaf_is_one_segment_per_slice():
  params, selection = stack_and_head()
  states = {}
  for layout in ("flat", "grouped"):
    tx = ec2t.method_registry()["twn"].build(selection=selection)._replace(
        layout=layout).transform()
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state,
                                  ec2t.quantized_params(params, state))
    states[layout] = state
  flat = states["flat"]
  assert flat.groups[0].table.num_segments == 4  # three slices and the head
  chex.assert_trees_all_close(flat.resolved_leaves(), states["grouped"].resolved_leaves(),
                              atol=1e-6)
  assert flat.field("scale")["stack"].shape == (3,)


def test_leaves_sharded_over_devices_stay_out_of_the_flat_buffer_and_stay_sharded():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = lambda x: NamedSharding(mesh, P(None, "fsdp") if x.shape == (16, 16) else P())
  params = jax.tree.map(lambda x: jax.device_put(x, sharded(x)), PARAMS)
  state = ec2t.method_registry()["twn"].build(selection=SELECT)._replace(
      layout="flat").transform().init(params)
  kernel = params["Dense_1"]["kernel"]
  assert flat_lib.may_be_sharded(kernel)
  slot = state.leaves["Dense_1"]["kernel"]
  assert not isinstance(slot, core.GroupSlot) or not isinstance(
      state.groups[slot.group], flat_lib.FlatGroup)
  assert state.field("latent")["Dense_1"]["kernel"].sharding.is_equivalent_to(
      kernel.sharding, 2)
  # The unsharded leaves still share one buffer.
  assert any(isinstance(g, flat_lib.FlatGroup) for g in state.groups)


def test_params_traced_by_a_jitted_init_on_several_devices_keep_the_grouped_layout():
  # A tracer does not show its sharding: with 8 devices it may be sharded, so no flat buffer.
  assert jax.device_count() > 1
  state = jax.jit(ec2t.twn(selection=SELECT).init)(PARAMS)
  assert not any(isinstance(g, flat_lib.FlatGroup) for g in state.groups)


def test_the_flat_layout_is_the_default_of_a_flat_method():
  state = ec2t.twn(selection=SELECT).init(PARAMS)
  assert [type(g).__name__ for g in state.groups] == ["FlatGroup"]


def test_an_unknown_layout_is_refused_naming_it():
  with pytest.raises(ValueError, match="layout.*'auto'"):
    ec2t.method_registry()["twn"].build()._replace(layout="auto").transform()
