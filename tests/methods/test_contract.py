"""The contract every registered method passes (the model: optax's contrib/_common_test.py).

Parametrised over ``ec2t.method_registry()``: a method registered in the
library is tested here with no test code of its own. Train and staged methods:
jit equals eager; a knob traced through ``optax.inject_hyperparams`` equals
the same knob given at construction; Linen and NNX training land exactly on
the method's grid (from its ``last_phase``); 8-device sharded equals one
device; bf16 params keep their dtype; ``quantized_params``, ``summary`` and
``set_phase`` work; the export round trip is bitwise; the second update does
not compile again. One-shot methods: ``instant`` lands on the grid, equals the
public function bitwise, keeps bf16, round-trips through the export. Every
method: its knobs are exactly its quantizer's keyword parameters with the same
defaults (and its public function's); a bad knob and a rule option it does
not accept are ``ValueError``\\ s naming them.

What runs where: the default suite (what CI runs, ``.ci/run``) runs every case
for every method, the cases that compile their own steps (eager, NNX,
sharded, bf16) for one step; the same cases over ``STEPS`` steps, through the
method's last phase, are marked slow (``python -m pytest -m slow``).

A toy two-level method, registered below (test code only), passes the whole
contract by that registration alone.
"""

import functools
import inspect
from typing import Any, NamedTuple

import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax._src import core
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry

# ------------------------------------------------------------- a toy method


class ToyLeaf(NamedTuple):
  """Two levels ``{-a, a}``, ``a`` the mean ``|W|``."""
  latent: jax.Array
  scale: jax.Array

  def value(self, dtype):
    a = core.snap_to_grid(self.scale, dtype)
    return jnp.where(self.latent >= 0, a, -a).astype(dtype)

  def describe(self):
    return {"method": "Toy", "mode": "two-level", "scale": self.scale}


class ToyHyper(NamedTuple):
  shrink: Any = 1.0


def toy_quantizer(shrink=1.0, *, selection=None) -> core.Quantizer:
  def init_leaf(param, ctx, hyper):
    del ctx
    latent = jnp.asarray(param, jnp.float32)
    return ToyLeaf(latent, hyper.shrink * jnp.mean(jnp.abs(latent)))

  def step_leaf(update, leaf, ctx, hyper, phase):
    del ctx, phase
    latent = leaf.latent + update
    return ToyLeaf(latent, hyper.shrink * jnp.mean(jnp.abs(latent)))

  return core.Quantizer(core.Method("toy", init_leaf, step_leaf), ToyHyper(shrink),
                        {"shrink": core.Range(0.0, low_open=True)}, selection)


def toy(shrink=1.0, *, selection=None):
  return toy_quantizer(shrink, selection=selection).transform()


TOY = "toy_two_level"
registry.register_method(registry.MethodSpec(
    name=TOY, kind="train", quantizer=toy_quantizer, transform=toy,
    knobs={"shrink": registry.Knob(core.Range(0.0, low_open=True), (0.5, 1.0), traced=True)},
    grid=lambda options: grids.Grid(2, ternary=False)), replace=True)


@pytest.fixture(scope="module", autouse=True)
def _unregister_toy():
  yield
  registry.unregister_method(TOY)


# ------------------------------------------------------------- the model

WIDTH = 16  # divisible by the 8 devices


class Mlp(nn.Module):
  """Dense_0 and Dense_3 stay full precision (the paper's rule); Dense_1, Dense_2 quantized."""

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Dense(WIDTH)(x))
    return nn.Dense(4)(x)


SELECTED = ("Dense_1/kernel", "Dense_2/kernel")
MODEL = Mlp()
X = jax.random.normal(jax.random.key(1), (16, 8))
Y = jax.random.normal(jax.random.key(2), (16, 4))
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), X)["params"]  # one compile, not one per op
STEPS = 3  # the full cases (slow); the default suite runs one step of each
# Speed only: fewer calibration steps for calibrated pruning.
FAST_KNOBS = {"prune": {"steps_per_level": 2}}

SPECS = ec2t.method_registry()
TRAINED = sorted(n for n, s in SPECS.items() if s.kind != "one_shot")
ONE_SHOT = sorted(n for n, s in SPECS.items() if s.kind == "one_shot")
FULL = [pytest.param(STEPS, marks=pytest.mark.slow, id="full"), pytest.param(1, id="one_step")]


def _loss(params, x=X, y=Y):
  return jnp.mean((MODEL.apply({"params": params}, x).astype(jnp.float32) - y) ** 2)


def _transform(name, **knobs):
  return optax.chain(optax.sgd(0.05), SPECS[name].make_transform(**knobs))


def _last_phase(name):
  spec = SPECS[name]
  return spec.last_phase(spec.options(), len(SELECTED))


def _step(tx):
  def step(params, opt_state):
    grads = jax.grad(_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _counting_jit(fn):
  """``jax.jit(fn)`` and the list that grows by one each time ``fn`` is traced."""
  traces = []

  def counted(*args):
    traces.append(1)
    return fn(*args)

  return jax.jit(counted), traces


def _jumps_to_the_last_phase(name, i, steps):
  """Whether step ``i`` of ``steps`` starts in the method's last phase: the full
  runs step once in phase 0 first, a one-step run starts there."""
  return bool(_last_phase(name)) and i == min(1, steps - 1)


def _train(name, params=PARAMS, *, jit=True, tx=None, shard=None, steps=STEPS, step=None):
  """``(params, opt_state)`` after ``steps`` steps (see :func:`_jumps_to_the_last_phase`)."""
  tx = tx or _transform(name)
  params = params if shard is None else shard(params)
  opt_state = (jax.jit(tx.init) if jit else tx.init)(params)
  params = ec2t.quantized_params(params, opt_state)
  step = step or (jax.jit(_step(tx)) if jit else _step(tx))
  for i in range(steps):
    if _jumps_to_the_last_phase(name, i, steps):
      opt_state = ec2t.set_phase(opt_state, _last_phase(name))
    params, opt_state = step(params, opt_state)
  return params, opt_state


@functools.cache
def _shared_step(name):
  """The method's transformation, its one jitted step, and that step's trace count."""
  tx = _transform(name)
  step, traces = _counting_jit(_step(tx))
  return tx, step, traces


@functools.cache
def _trained(name, steps=STEPS):
  """``_train`` with the shared compiled step (full or one-step runs compile it once)."""
  tx, step, _ = _shared_step(name)
  return _train(name, tx=tx, step=step, steps=steps)


def _selected(params):
  flat = {"/".join(str(k.key) for k in path): np.asarray(leaf, np.float32)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  return [(path, flat[path]) for path in SELECTED]


def _assert_on_grid(name, params):
  problems = SPECS[name].grid_for().problems(_selected(params))
  assert not problems, problems


# ------------------------------------------------------- train and staged


@pytest.mark.parametrize("name", TRAINED)
def test_the_second_update_does_not_compile_again(name):
  _trained(name), _trained(name, 1)
  traces = len(_shared_step(name)[2])
  assert traces == 1, f"{name}: the jitted step was traced {traces} times in {STEPS + 1} updates"


@pytest.mark.parametrize("steps", FULL)
@pytest.mark.parametrize("name", TRAINED)
def test_jit_equals_eager(name, steps):
  params_jit, state_jit = _trained(name, steps)
  params_eager, state_eager = _train(name, jit=False, steps=steps)
  chex.assert_trees_all_close(params_eager, params_jit, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(ec2t.find_quantizer_state(state_eager).resolved_leaves(),
                              ec2t.find_quantizer_state(state_jit).resolved_leaves(),
                              atol=1e-6, rtol=1e-5)


def _traced_knob(name, at_default=False):
  """A traced knob and a value: its last swept one, or (``at_default``) the default of the
  first traced knob that has one (so the constructed side is the shared training)."""
  knobs = [(k, knob) for k, knob in SPECS[name].knobs.items()
           if knob.traced and any(v is not None for v in knob.sweep)]
  if not knobs:
    pytest.skip(f"{name} has no traced knob")
  defaults = [(k, knob.default) for k, knob in knobs if knob.default is not None]
  if at_default and defaults:
    return defaults[0]
  knob_name, knob = knobs[0]
  return knob_name, [v for v in knob.sweep if v is not None][-1]


@functools.cache
def _injected(name, at_default=True):
  """The method with a traced knob injected (:func:`_traced_knob`), and its jitted step."""
  spec = SPECS[name]
  knob, value = _traced_knob(name, at_default)
  static = ("selection",) + tuple(k for k, v in spec.knobs.items() if not v.traced)
  injected = optax.inject_hyperparams(spec.transform, static_args=static)(
      **{knob: value}, selection=None)
  tx = optax.chain(optax.sgd(0.05), injected)
  return tx, jax.jit(_step(tx))


# The default suite injects a knob at its default (the constructed side is the shared
# training); the slow set at a swept value (its own compiled step).
INJECTED_AT = [pytest.param(False, marks=pytest.mark.slow, id="swept"),
               pytest.param(True, id="default")]


@pytest.mark.parametrize("at_default", INJECTED_AT)
@pytest.mark.parametrize("name", TRAINED)
def test_a_knob_traced_through_inject_hyperparams_equals_a_constructed_one(name, at_default):
  knob, value = _traced_knob(name, at_default)
  tx, step = _injected(name, at_default)
  got, _ = _train(name, tx=tx, step=step, steps=1)
  if value == SPECS[name].knobs[knob].default:
    want, _ = _trained(name, 1)
  else:
    want, _ = _train(name, tx=_transform(name, **{knob: value}), steps=1)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TRAINED)
def test_an_invalid_traced_knob_skips_the_step_and_is_counted(name):
  knob, _ = _traced_knob(name, at_default=True)
  tx, step = _injected(name)  # the same compiled step: the value is in the state
  opt_state = jax.jit(tx.init)(PARAMS)
  params = ec2t.quantized_params(PARAMS, opt_state)
  old = opt_state[1].hyperparams[knob]
  # NaN of the knob's own dtype (and weak type) where it is a float: no new compilation.
  opt_state[1].hyperparams[knob] = (old + jnp.nan if jnp.issubdtype(old.dtype, jnp.floating)
                                    else jnp.asarray(jnp.nan, jnp.float32))
  new_params, new_state = step(params, opt_state)
  assert int(ec2t.find_quantizer_state(new_state).invalid_hyper_count) == 1
  for path in SELECTED:  # the quantized leaves keep their state, so their values
    layer = path.split("/")[0]
    np.testing.assert_array_equal(new_params[layer]["kernel"], params[layer]["kernel"])


@pytest.mark.parametrize("name", TRAINED)
def test_linen_training_lands_exactly_on_the_grid(name):
  params, opt_state = _trained(name)
  chex.assert_trees_all_equal(params, ec2t.quantized_params(params, opt_state))
  _assert_on_grid(name, params)
  unselected = PARAMS["Dense_0"]["kernel"]
  assert not np.array_equal(params["Dense_0"]["kernel"], unselected)  # trained, not quantized


@pytest.mark.parametrize("name", TRAINED)
def test_ternary_params_summary_and_set_phase_work(name):
  params, opt_state = _trained(name)
  summary = ec2t.summary(opt_state)
  assert [row.path for row in summary.layers] == list(SELECTED)
  assert int(ec2t.find_quantizer_state(opt_state).count) == STEPS
  assert summary.off_grid_count == 0  # every update found the params on the grid
  later = ec2t.set_phase(opt_state, 5)
  assert int(ec2t.find_quantizer_state(later).phase) == 5
  chex.assert_trees_all_equal(ec2t.quantized_params(params, later), params)


@pytest.mark.parametrize("name", TRAINED)
def test_export_round_trips_bitwise(name, tmp_path):
  params, _ = _trained(name)
  export.save(tmp_path / "m.ec2t", params)
  loaded = export.load(tmp_path / "m.ec2t")
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert np.asarray(got).dtype == np.asarray(want).dtype
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


@pytest.mark.parametrize("steps", FULL)
@pytest.mark.parametrize("name", TRAINED)
def test_bf16_params_keep_their_dtype_and_land_on_the_grid(name, steps):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  params, opt_state = _train(name, params, steps=steps)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  chex.assert_trees_all_equal(params, ec2t.quantized_params(params, opt_state))
  _assert_on_grid(name, params)
  assert int(ec2t.find_quantizer_state(opt_state).off_grid_count) == 0


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(8, WIDTH, rngs=rngs), nnx.Linear(WIDTH, WIDTH, rngs=rngs),
                            nnx.Linear(WIDTH, WIDTH, rngs=rngs), nnx.Linear(WIDTH, 4, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


NNX_ORDER = ec2t.Selection(order=tuple(f"layers/{i}/kernel" for i in range(4)))


@pytest.mark.parametrize("steps", FULL)
@pytest.mark.parametrize("name", TRAINED)
def test_nnx_optimizer_keeps_the_model_on_the_grid(name, steps):
  model = NnxMlp(nnx.Rngs(0))
  tx = optax.chain(optax.sgd(0.05), SPECS[name].make_transform(selection=NNX_ORDER))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model))

  for i in range(steps):
    if _jumps_to_the_last_phase(name, i, steps):
      ec2t.set_phase(optimizer, _last_phase(name))  # in place
    step(model, optimizer)
  state = nnx.as_pure(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, state,
               ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))
  selected = [(f"layers/{i}/kernel", np.asarray(state["layers"][i]["kernel"])) for i in (1, 2)]
  problems = SPECS[name].grid_for().problems(selected)
  assert not problems, problems


@pytest.mark.parametrize("steps", FULL)
@pytest.mark.parametrize("name", TRAINED)
def test_sharded_over_8_devices_equals_one_device(name, steps):
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = lambda x: NamedSharding(mesh, P(None, "model") if x.ndim == 2 and x.shape[-1] == WIDTH
                                 else P())
  shard = lambda tree: jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)
  params_1, state_1 = _trained(name, steps)
  params_8, state_8 = _train(name, shard=shard, steps=steps)
  chex.assert_trees_all_close(params_8, params_1, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(ec2t.find_quantizer_state(state_8).resolved_leaves(),
                              ec2t.find_quantizer_state(state_1).resolved_leaves(), atol=1e-6, rtol=1e-5)
  assert params_8["Dense_1"]["kernel"].sharding.spec == P(None, "model")
  _assert_on_grid(name, params_8)


# ----------------------------------------------------------------- one-shot


def _inputs(name):
  supplied = {"key": jax.random.key(3), "apply_fn": lambda p, x: MODEL.apply({"params": p}, x),
              "calibration_data": X}
  return {k: supplied[k] for k in SPECS[name].inputs}


@functools.cache
def _one_shot(name, dtype=jnp.float32):
  params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
  quantizer = SPECS[name].build(**FAST_KNOBS.get(name, {}), **_inputs(name))
  return quantizer.instant(params, return_state=True)


@pytest.mark.parametrize("name", ONE_SHOT)
def test_one_shot_lands_on_the_grid(name):
  params, state = _one_shot(name)
  _assert_on_grid(name, params)
  assert [row.path for row in ec2t.summary(state).layers] == list(SELECTED)
  chex.assert_trees_all_equal(params["Dense_0"], PARAMS["Dense_0"])


@pytest.mark.parametrize("name", ONE_SHOT)
def test_one_shot_equals_the_public_function_bitwise(name):
  spec = SPECS[name]
  if spec.one_shot is None:
    pytest.skip(f"{name} has no public one-shot function")
  inputs = _inputs(name)
  args = [inputs.pop(k) for k in ("apply_fn", "calibration_data") if k in inputs]
  want = spec.one_shot(PARAMS, *args, **FAST_KNOBS.get(name, {}), **inputs)
  got, _ = _one_shot(name)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("name", ONE_SHOT)
def test_one_shot_keeps_bf16_and_round_trips_through_the_export(name, tmp_path):
  params, _ = _one_shot(name, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  export.save(tmp_path / "m.ec2t", params)
  for got, want in zip(jax.tree.leaves(export.load(tmp_path / "m.ec2t")),
                       jax.tree.leaves(params)):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


# ------------------------------------------------------------ every method

# Keyword parameters of a one-shot public function that choose what it returns, not a knob.
OUTPUT_OPTIONS = ("return_report", "return_integers")


def _keyword_defaults(fn, *, skip_first=False) -> dict:
  """Parameter -> default (``inspect.Parameter.empty`` if none) of ``fn``'s keyword-able
  parameters, the first one (a one-shot function's ``params``) left out if asked."""
  parameters = list(inspect.signature(fn).parameters.values())[int(skip_first):]
  return {p.name: p.default for p in parameters
          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _knob_defaults(name) -> dict:
  return {knob: k.default for knob, k in SPECS[name].knobs.items()}


def _without(defaults: dict, names) -> dict:
  return {k: v for k, v in defaults.items() if k not in names}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_knobs_are_the_quantizers_keyword_parameters_with_its_defaults(name):
  spec = SPECS[name]
  factory = _without(_keyword_defaults(spec.quantizer), ("selection",) + spec.inputs)
  assert factory == _knob_defaults(name)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_public_function_has_the_quantizers_defaults(name):
  spec = SPECS[name]
  public = spec.transform if spec.transform is not None else spec.one_shot
  if public is None:
    pytest.skip(f"{name} has no public function")
  defaults = _keyword_defaults(public, skip_first=public is spec.one_shot)
  assert _without(defaults, ("selection",) + spec.inputs + OUTPUT_OPTIONS) == _knob_defaults(name)



def _bad_values(knob):
  if isinstance(knob.valid, core.Range):
    if knob.valid.high != float("inf"):
      return [knob.valid.high + 1.0]
    return [knob.valid.low - 1.0]
  if isinstance(knob.valid, tuple):
    return ["not-a-choice"]
  return []


BAD_KNOBS = [(name, knob, value) for name, spec in sorted(SPECS.items())
             for knob, k in sorted(spec.knobs.items()) for value in _bad_values(k)]


@pytest.mark.parametrize("name, knob, value", BAD_KNOBS,
                         ids=[f"{n}-{k}" for n, k, _ in BAD_KNOBS])
def test_a_bad_knob_is_a_value_error_naming_it(name, knob, value):
  with pytest.raises(ValueError, match=knob):
    SPECS[name].build(**{knob: value}, **_inputs(name))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_rule_option_the_method_does_not_accept_is_a_value_error_naming_the_rule(name):
  accepts = SPECS[name].build(**_inputs(name)).method.accepts
  rule = (ec2t.Rule("Dense_1/kernel", gamma=0.3) if "ecp" in accepts.modes
          else ec2t.Rule("Dense_1/kernel", mode="ecp", gamma=0.3))
  if accepts.rule_gamma and "ecp" in accepts.modes:
    pytest.skip(f"{name} accepts every rule option")
  with pytest.raises(ValueError, match=r"'Dense_1/kernel'.*(mode 'ecp'|gamma=0.3)"):
    quantizer = SPECS[name].build(selection=[rule], **_inputs(name))
    quantizer.instant(PARAMS)


def test_the_toy_method_is_registered_by_this_module_alone():
  assert SPECS[TOY].kind == "train" and TOY in TRAINED
