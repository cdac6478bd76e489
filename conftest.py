"""Doctests of the library's docstrings (``--doctest-modules ec2t_jax``).

Each example imports what it uses (a model, params or optimizer state come
from the fixture :func:`ec2t_jax.models.small_cnn_example`), so it can be
pasted as it stands. To prove it, every doctest runs in an empty namespace,
not in its module's globals. Nothing here may start a JAX backend at import:
``tests/conftest.py`` (8 CPU devices) must configure it first.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# ``python -m ...`` entry points exit when imported.
collect_ignore_glob = ["ec2t_jax/*/__main__.py"]


@pytest.fixture(autouse=True)
def _empty_doctest_namespace(request):
  """A doctest sees only what its examples import, as in a fresh interpreter."""
  dtest = getattr(request.node, "dtest", None)
  if dtest is not None:
    dtest.globs.clear()
    dtest.globs["__name__"] = "__main__"


_SLOW_BY_DURATION = os.path.join(os.path.dirname(__file__), "tests", "slow_by_duration.txt")


@pytest.hookimpl(tryfirst=True)  # before the ``-m "not slow"`` deselection
def pytest_collection_modifyitems(items):
  """Marks ``slow`` the tests listed in ``tests/slow_by_duration.txt``."""
  with open(_SLOW_BY_DURATION, encoding="utf-8") as f:
    slow = {line.strip() for line in f if line.strip() and not line.startswith("#")}
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
