"""Doctests of the library's docstrings (``--doctest-modules ec2t_jax``).

Each example imports what it uses (a model, params or optimizer state come
from the fixture :func:`ec2t_jax.models.small_cnn_example`), so it can be
pasted as it stands. To prove it, every doctest runs in an empty namespace,
not in its module's globals. Nothing here may start a JAX backend at import:
``tests/conftest.py`` (8 CPU devices) must configure it first.
"""

import os
import shutil
import tempfile

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


# The default set's longest tests, started first: with ``-n 2`` a long test dispatched last
# would leave one worker idle at the end (longest-first scheduling). Measured with
# ``--durations`` on the idle machine (2026-12-07: the quick GPT front alone is 45 s).
_FIRST = ("tests/examples/test_gpt_methods.py::test_quick_front_runs_end_to_end_and_resumes",)


@pytest.hookimpl(tryfirst=True)  # before the ``-m "not slow"`` deselection
def pytest_collection_modifyitems(items):
  """Marks ``slow`` the tests listed in ``tests/slow_by_duration.txt``; puts ``_FIRST`` first."""
  with open(_SLOW_BY_DURATION, encoding="utf-8") as f:
    slow = {line.strip() for line in f if line.strip() and not line.startswith("#")}
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: item.nodeid not in _FIRST)  # stable: the rest keep their order


_COMPILATION_CACHE = []


def pytest_configure(config):
  """A compilation cache for the session, so an identical program compiles once.

  jax.jit caches per function object: a test that rebuilds the same transform
  (or a doctest that re-jits ``model.init``) recompiles an identical program.
  XLA's persistent cache is keyed by the program itself, so those compile once
  per run (process CPU time, python tests/suite_budget.py -- PATH: tests/core
  135.8 -> 112.3 s, tests/methods/test_contract.py 71.4 -> 59.4 s). The cache lives
  in a temporary folder removed at the end, so every run starts cold, as on a
  fresh clone; ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used (and
  kept) instead. The pytest-xdist workers share the controller's folder (they
  inherit its environment), so a program one worker compiled is a hit for the other.
  """
  import jax  # pylint: disable=g-import-not-at-top  (no backend starts here)

  is_worker = hasattr(config, "workerinput")
  if not is_worker and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    path = tempfile.mkdtemp(prefix="ec2t_jax_test_xla_cache_")
    _COMPILATION_CACHE.append(path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # for the workers started after this
  if not jax.config.jax_compilation_cache_dir and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  del config
  for path in _COMPILATION_CACHE:
    shutil.rmtree(path, ignore_errors=True)
