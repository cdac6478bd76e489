"""benchmarks/device_check.py on CPU: the sections run on small shapes and report one table."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import device_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_no_section_gives_the_device_and_total_rows():
  rows = device_check.run_check([], smoke=True)
  assert [r.section for r in rows] == ["device", "total"]
  assert rows[0].value.startswith("cpu")


def test_an_unknown_section_is_refused_before_anything_runs():
  seen = []
  with pytest.raises(ValueError, match="unknown section 'speed'"):
    device_check.run_check(["decode", "speed"], smoke=True, echo=seen.append)
  assert [r.section for r in seen] == ["device"]


def test_sections_past_the_time_limit_are_skipped_not_run_and_every_row_is_echoed():
  seen = []
  rows = device_check.run_check(["decode", "overhead"], smoke=True, max_seconds=-1,
                                echo=seen.append)
  assert [(r.section, r.value) for r in rows[1:3]] == [("decode", "skipped"),
                                                       ("overhead", "skipped")]
  assert seen == rows


def test_val_loss_without_data_is_skipped_with_the_reason(tmp_path):
  row, = device_check.val_loss_rows(1, "1,1,1", str(tmp_path / "none"))
  assert row.value == "skipped" and ("no tfds data folder" in row.note
                                     or "tensorflow_datasets" in row.note)


def test_the_table_has_one_line_per_row_and_a_header():
  rows = [device_check.Row("decode", "a", "1 tok/s", "n"), device_check.Row("x", "bb", "2")]
  lines = device_check.format_table(rows).splitlines()
  assert len(lines) == 3 and lines[0].split()[:3] == ["section", "item", "value"]


@pytest.mark.slow  # three decoders compiled, the Pallas one interpreted (~15 s)
def test_cpu_smoke_decode_reports_every_route_with_the_same_greedy_tokens():
  rows = device_check.run_check(["decode"], smoke=True, batches=(1,), repeats=1)
  decode = [r for r in rows if r.section == "decode"]
  assert [r.item for r in decode] == [f"smoke {route} batch 1"
                                      for route in ("dense", "xla", "pallas")]
  assert all("tok/s" in r.value for r in decode)
  assert all("same greedy True" in r.note for r in decode[1:])


@pytest.mark.slow  # LeNet-5 steps of adam and the chain compiled twice each
def test_cpu_smoke_overhead_reports_the_chain_ratios():
  row, = device_check.overhead_rows(smoke=True, rounds=2)
  assert row.item == "LeNet-5 chain vs adam" and row.value.startswith("step ")
