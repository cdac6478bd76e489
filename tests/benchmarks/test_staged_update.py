"""benchmarks/staged_update.py on a one-block GPT: both layouts agree; each variant is timed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import staged_update  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_every_case_and_layout_of_a_staged_method_gets_a_row():
  # measure() itself fails if the flat and grouped updates differ.
  rows = staged_update.measure(["slq"], layers=1, rounds=1, echo=lambda line: None)
  assert [(r["case"], r["layout"]) for r in rows] == [
      ("between stages", "flat"), ("between stages", "grouped"),
      ("at a stage step", "flat"), ("at a stage step", "grouped")]
  assert all(r["update"] > 0 and r["compile_cpu"] > 0 for r in rows)
