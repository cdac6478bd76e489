"""Forward order: which kernel the computation uses first and last, and the
selection that keeps the input and output layer in full precision by it."""

import functools
import warnings

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import ec2t_jax as ec2t

_X = jnp.ones((2, 6, 6, 1))


class _NamedLinen(nn.Module):
  """Names whose sorted order (block, features, head, stem) is not the call order."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(4, (3, 3), name="block")(x))
    x = nn.relu(nn.Dense(8, name="features")(x.mean((1, 2))))
    return nn.Dense(3, name="head")(x)


class _NamedNnx(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.block = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.features = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.block(nnx.relu(self.stem(x))))
    return self.head(nnx.relu(self.features(x.mean((1, 2)))))


class _DenseFirstLinen(nn.Module):
  """Auto-named: Dense_0 runs before Conv_0, so natural sort != forward order."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(4)(x))               # Dense_0, per pixel
    x = nn.relu(nn.Conv(4, (3, 3))(x))        # Conv_0
    x = nn.relu(nn.Conv(4, (3, 3))(x))        # Conv_1
    return nn.Dense(3)(x.mean((1, 2)))        # Dense_1


@functools.cache
def _linen_params(model_class):
  # Eager init: a jitted one would return its dicts with sorted keys.
  return model_class().init(jax.random.key(0), _X)["params"]


def _linen(model):
  return (_linen_params(type(model)),
          lambda p, x: model.apply({"params": p}, x))


def _nnx():
  graphdef, state = nnx.split(_NamedNnx(nnx.Rngs(0)))
  return state, lambda s, x: nnx.merge(graphdef, s)(x)


def _ternary(selection, params):
  return sorted(p.path for p in selection.plan(params) if p)


def _resorted(tree):
  return jax.tree.map(lambda x: x, tree)  # what optax.apply_updates does to key order


def _no_warning(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    return fn(*args)


# ----------------------------------------------------------------- forward_order


def test_forward_order_of_named_linen_model_is_call_order():
  params, fn = _linen(_NamedLinen())
  assert ec2t.forward_order(fn, params, _X) == [
      f"{m}/{leaf}" for m in ("stem", "block", "features", "head")
      for leaf in ("kernel", "bias")]


def test_forward_order_of_nnx_state_is_call_order():
  state, fn = _nnx()
  order = ec2t.forward_order(fn, state, _X)
  assert [p for p in order if p.endswith("kernel")] == [
      "stem/kernel", "block/kernel", "features/kernel", "head/kernel"]


def test_forward_order_of_auto_named_model_differs_from_natural_sort():
  params, fn = _linen(_DenseFirstLinen())
  order = ec2t.forward_order(fn, params, _X)
  assert [p for p in order if p.endswith("kernel")] == [
      "Dense_0/kernel", "Conv_0/kernel", "Conv_1/kernel", "Dense_1/kernel"]


def test_forward_order_follows_leaves_into_sub_jaxprs():
  @jax.custom_vjp
  def custom(h, w):
    return h @ w
  custom.defvjp(lambda h, w: (h @ w, (h, w)), lambda res, ct: (ct, ct))

  def fn(p, x):
    late = p["z"].astype(jnp.bfloat16)                           # prepared, used last
    h = jax.jit(lambda h, w: h @ w)(x, p["c"])                   # pjit
    h = jax.nn.relu(h @ p["a"])                                  # custom_jvp after
    h = custom(h, p["f"])                                        # custom_vjp
    h = jax.lax.scan(lambda h, _: (h @ p["e"], None), h, None, length=2)[0]
    h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["b"], lambda h: h @ p["d"], h)
    steps = 1 + (x[0, 0] > 0).astype(jnp.int32)                  # traced: a while loop
    h = jax.lax.fori_loop(0, steps, lambda i, h: h @ p["g"], h)
    return h.astype(jnp.bfloat16) @ late

  params = {k: jnp.ones((3, 3)) for k in "abcdefgz"}
  # cond's branches are (false, true): d's branch comes first.
  assert ec2t.forward_order(fn, params, jnp.ones((2, 3))) == list("cafedbgz")


def test_forward_order_leaves_out_unused_leaves():
  params = {"used": jnp.ones((3, 3)), "unused": jnp.ones((3, 3))}
  assert ec2t.forward_order(lambda p, x: x @ p["used"], params, jnp.ones((1, 3))) == ["used"]


def test_forward_order_of_function_that_uses_no_params_is_an_error():
  params = {"w": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match=r"uses none of the 1 parameter leaves \(w\)"):
    ec2t.forward_order(lambda p, x: x * 2, params, jnp.ones((1, 3)))


# ------------------------------------------------- the paper's rule by that order


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_given_order_keeps_stem_and_head_in_full_precision(model):
  params, fn = _linen(_NamedLinen()) if model == "linen" else _nnx()
  selection = ec2t.Selection(order=ec2t.forward_order(fn, params, _X))
  assert _no_warning(_ternary, selection, _resorted(params)) == [
      "block/kernel", "features/kernel"]


def test_linen_params_fresh_from_init_carry_their_call_order():
  params, _ = _linen(_NamedLinen())
  opt_state = _no_warning(ec2t.ternarize_transform(gamma=0.1).init, params)
  assert sorted(layer.path for layer in ec2t.summary(opt_state).layers) == [
      "block/kernel", "features/kernel"]


def test_resorted_named_tree_without_order_warns_how_to_pass_it():
  params, _ = _linen(_NamedLinen())
  with pytest.warns(UserWarning, match=r"first 'block/kernel', last 'stem/kernel'.*"
                    r"Selection\(order=ec2t.forward_order"):
    ec2t.Selection().plan(_resorted(params))


def test_nnx_state_without_order_warns():
  state, _ = _nnx()
  with pytest.warns(UserWarning, match="carry no forward order"):
    ec2t.Selection().plan(state)


def test_auto_named_tree_without_order_falls_back_to_natural_sort_silently():
  params, _ = _linen(_DenseFirstLinen())
  assert _no_warning(_ternary, ec2t.Selection(), _resorted(params)) == [
      "Conv_1/kernel", "Dense_0/kernel"]


def test_auto_names_that_sort_differently_are_right_by_forward_order():
  params, fn = _linen(_DenseFirstLinen())
  selection = ec2t.Selection(order=ec2t.forward_order(fn, params, _X))
  assert _ternary(selection, _resorted(params)) == ["Conv_0/kernel", "Conv_1/kernel"]
  assert _ternary(ec2t.Selection(), params) == ["Conv_0/kernel", "Conv_1/kernel"]


def test_order_is_used_by_ternarize_transform_after_apply_updates():
  params, fn = _linen(_NamedLinen())
  order = ec2t.forward_order(fn, params, _X)
  params = optax.apply_updates(params, jax.tree.map(jnp.zeros_like, params))
  tx = ec2t.ternarize_transform(gamma=0.1, selection=ec2t.Selection(order=order))
  summary = ec2t.summary(_no_warning(tx.init, params))
  assert sorted(layer.path for layer in summary.layers) == ["block/kernel", "features/kernel"]


def test_kernel_missing_from_order_is_an_error_naming_it():
  params, _ = _linen(_NamedLinen())
  order = ["stem/kernel", "block/kernel", "head/kernel"]
  with pytest.raises(ValueError, match=r"lacks the kernel 'features/kernel'.*forward_order"):
    ec2t.Selection(order=order).plan(params)


def test_order_from_another_tree_prefix_is_an_error():
  params, fn = _linen(_NamedLinen())
  order = ec2t.forward_order(lambda v, x: _NamedLinen().apply(v, x), {"params": params}, _X)
  with pytest.raises(ValueError, match=r"lacks the kernel 'block/kernel' \(and 3 more\).*"
                     r"'params/stem/kernel'"):
    ec2t.Selection(order=order).plan(params)


@pytest.mark.parametrize("order, error, match", [
    ("stem/kernel", TypeError, "sequence of paths, got the string"),
    ([], ValueError, "order is empty"),
    (["a", "a"], ValueError, "lists 'a' twice"),
    ([3], TypeError, "path strings, got 3"),
])
def test_bad_order_is_an_error_at_construction(order, error, match):
  with pytest.raises(error, match=match):
    ec2t.Selection(order=order)


def test_order_reaches_an_nnx_optimizer():
  model = _NamedNnx(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  order = ec2t.forward_order(lambda s, x: nnx.merge(graphdef, s)(x), state, _X)
  tx = ec2t.ternarize_transform(gamma=0.1, selection=ec2t.Selection(order=order))
  optimizer = _no_warning(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param))
  assert sorted(layer.path for layer in ec2t.summary(optimizer).layers) == [
      "block/kernel", "features/kernel"]
