"""Doctests of the library's docstrings (``--doctest-modules ec2t_jax``).

The examples run in a namespace with ``jax``, ``jnp``, ``np``, ``optax``,
``ec2t`` and every public name, plus a small model's ``params`` / ``grads``
and a chained EC2T ``opt_state`` / ``state`` / ``tx``, so they really run.
Nothing here may start a JAX backend at import: ``tests/conftest.py`` (8 CPU
devices) must configure it first.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# ``python -m ...`` entry points exit when imported.
collect_ignore_glob = ["ec2t_jax/*/__main__.py"]


@pytest.fixture(autouse=True)
def _doctest_namespace(request):
  if type(request.node).__name__ != "DoctestItem":
    return  # only the doctests need it (and building it costs seconds)
  doctest_namespace = request.getfixturevalue("doctest_namespace")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top

  doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax, nn=nn,
                           ec2t=ec2t)
  doctest_namespace.update({name: getattr(ec2t, name) for name in ec2t.__all__})
  doctest_namespace.update(_small_model())


_CACHE = {}


def _small_model():
  """A small CNN's params, gradients and a chained EC2T state (built once)."""
  if not _CACHE:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top

    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    class SmallCNN(nn.Module):
      """Conv_0 and Dense_1 stay full precision; Conv_1 and Dense_0 ternary."""

      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x)).mean((1, 2))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)

    model = SmallCNN()
    x = jnp.ones((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.2))
    opt_state = tx.init(params)
    params = ec2t.ternary_params(params, opt_state)
    grads = jax.tree.map(lambda p: 1e-2 * jnp.ones_like(p), params)
    _CACHE.update(model=model, x=x, params=params, grads=grads,
                  tx=tx, opt_state=opt_state,
                  state=ec2t.find_ternarize_state(opt_state))
  return dict(_CACHE)
