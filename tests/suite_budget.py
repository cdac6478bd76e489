"""Where the default test suite's time goes: CPU and wall time per test.

A benchmark, not a test (``tests/conftest.py`` keeps pytest from collecting
it). It runs pytest in this process, with the project's own options
(``setup.cfg``: the default set, doctests included, ``slow`` excluded), and
measures each test's setup + call + teardown with ``time.process_time()``
(CPU time of the whole process, XLA's compile threads included) and
``time.perf_counter()`` (wall). On a shared, loaded machine wall times say
little; CPU times stay comparable between runs, so compare those.

Usage, from the repository root::

  python tests/suite_budget.py                      # the default suite, top 20
  python tests/suite_budget.py --top 40 --json budget.json
  python tests/suite_budget.py --top 10 -- tests/core -x   # any pytest args after --

It prints the slowest tests by CPU time, the time per file, the collection
time (imports, doctest parsing) and the totals; ``--json`` also writes every
test's figures, so two runs (before/after a change) can be compared with
``--compare OLD.json``.
"""

import argparse
import collections
import json
import os
import sys
import time


class _Budget:
  """A pytest plugin recording CPU and wall time per test and for collection."""

  def __init__(self):
    self.tests = {}  # nodeid -> {"cpu": s, "wall": s, "outcome": str}
    self.collect_cpu = 0.0
    self.collect_wall = 0.0
    self._collect_start = None

  def pytest_collection(self, session):
    del session
    self._collect_start = (time.process_time(), time.perf_counter())

  def pytest_collection_finish(self, session):
    del session
    cpu0, wall0 = self._collect_start
    self.collect_cpu = time.process_time() - cpu0
    self.collect_wall = time.perf_counter() - wall0

  def pytest_runtest_logstart(self, nodeid, location):
    del nodeid, location
    self._start = (time.process_time(), time.perf_counter())
    self._outcome = "passed"

  def pytest_runtest_logreport(self, report):
    if report.failed:
      self._outcome = "failed"
    elif report.skipped and self._outcome == "passed":
      self._outcome = "skipped"

  def pytest_runtest_logfinish(self, nodeid, location):
    del location
    cpu0, wall0 = self._start
    self.tests[nodeid] = {
        "cpu": time.process_time() - cpu0,
        "wall": time.perf_counter() - wall0,
        "outcome": self._outcome,
    }


def _file_of(nodeid):
  return nodeid.split("::", 1)[0]


def _report(budget, top, out=sys.stdout):
  tests = budget.tests
  cpu = sum(t["cpu"] for t in tests.values())
  wall = sum(t["wall"] for t in tests.values())
  counts = collections.Counter(t["outcome"] for t in tests.values())
  p = lambda *a: print(*a, file=out)
  p(f"\nslowest {top} tests by CPU time (setup + call + teardown):")
  p(f"{'cpu s':>8} {'wall s':>8}  test")
  for nodeid, t in sorted(tests.items(), key=lambda kv: -kv[1]["cpu"])[:top]:
    p(f"{t['cpu']:8.2f} {t['wall']:8.2f}  {nodeid}")
  per_file = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for nodeid, t in tests.items():
    f = per_file[_file_of(nodeid)]
    f[0] += t["cpu"]
    f[1] += t["wall"]
    f[2] += 1
  p(f"\nslowest {top} files by CPU time:")
  p(f"{'cpu s':>8} {'wall s':>8} {'tests':>6}  file")
  for name, (c, w, n) in sorted(per_file.items(), key=lambda kv: -kv[1][0])[:top]:
    p(f"{c:8.2f} {w:8.2f} {n:6d}  {name}")
  p(f"\ncollection: {budget.collect_cpu:.1f} s CPU, {budget.collect_wall:.1f} s wall")
  p(f"tests: {len(tests)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); "
    f"{cpu:.1f} s CPU, {wall:.1f} s wall")
  p(f"total (collection + tests): {budget.collect_cpu + cpu:.1f} s CPU, "
    f"{budget.collect_wall + wall:.1f} s wall")


def _compare(old_path, budget, top, out=sys.stdout):
  with open(old_path, encoding="utf-8") as f:
    old = json.load(f)
  old_tests = old["tests"]
  p = lambda *a: print(*a, file=out)
  both = [k for k in budget.tests if k in old_tests]
  delta = sorted(both, key=lambda k: budget.tests[k]["cpu"] - old_tests[k]["cpu"])
  p(f"\nlargest CPU savings against {old_path} (old -> new, s):")
  for k in delta[:top]:
    p(f"{old_tests[k]['cpu']:8.2f} -> {budget.tests[k]['cpu']:8.2f}  {k}")
  gone = sorted(set(old_tests) - set(budget.tests))
  new = sorted(set(budget.tests) - set(old_tests))
  if gone:
    p(f"\n{len(gone)} tests of the old run are not in this one (renamed or dropped):")
    for k in gone[:top]:
      p(f"  {k}")
  if new:
    p(f"{len(new)} tests are new in this run")
  old_total = old["collect_cpu"] + sum(t["cpu"] for t in old_tests.values())
  new_total = budget.collect_cpu + sum(t["cpu"] for t in budget.tests.values())
  p(f"total CPU: {old_total:.1f} s -> {new_total:.1f} s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--top", type=int, default=20, help="how many tests/files to list")
  parser.add_argument("--json", help="write every test's CPU and wall time here")
  parser.add_argument("--compare", help="a --json file of an earlier run to compare against")
  parser.add_argument("pytest_args", nargs="*",
                      help="arguments for pytest (after --); default: the default suite")
  args = parser.parse_args(argv)

  import pytest  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.chdir(root)  # setup.cfg's testpaths and the cwd-first import of ec2t_jax
  if root not in sys.path:
    sys.path.insert(0, root)
  budget = _Budget()
  start = (time.process_time(), time.perf_counter())
  status = pytest.main(["-q", "-p", "no:cacheprovider", *args.pytest_args], plugins=[budget])
  run_cpu = time.process_time() - start[0]
  run_wall = time.perf_counter() - start[1]
  _report(budget, args.top)
  print(f"pytest.main as a whole: {run_cpu:.1f} s CPU, {run_wall:.1f} s wall; "
        f"exit status {int(status)}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"collect_cpu": budget.collect_cpu, "collect_wall": budget.collect_wall,
                 "run_cpu": run_cpu, "run_wall": run_wall, "tests": budget.tests}, f, indent=1)
  if args.compare:
    _compare(args.compare, budget, args.top)
  return int(status)


if __name__ == "__main__":
  sys.exit(main())
