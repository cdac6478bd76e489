"""Progress display: a bar only on a terminal, readable lines in a log."""

import io

import examples_support  # noqa: F401  (puts examples/ on sys.path)
from common import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _run(bar, steps):
  for _ in range(steps):
    bar.update(1)
  bar.close()


def test_a_log_gets_one_line_per_tenth_and_no_carriage_returns():
  log = io.StringIO()
  _run(progress.progress(True, 250, "fp", stream=log, lines=True), 250)
  lines = log.getvalue().splitlines()
  assert len(lines) == 10 and "\r" not in log.getvalue()
  assert lines[0].startswith("[fp] 10% (25/250 steps)")
  assert lines[-1].startswith("[fp] 100% (250/250 steps)")


def test_a_resumed_run_prints_only_the_tenths_it_reaches():
  log = io.StringIO()
  _run(progress.progress(True, 100, "ec2t", initial=55, stream=log, lines=True), 45)
  assert [l.split()[1] for l in log.getvalue().splitlines()] == ["60%", "70%", "80%", "90%",
                                                                 "100%"]


def test_a_log_without_lines_gets_nothing_between_epoch_lines():
  log = io.StringIO()
  _run(progress.progress(True, 100, "fp epoch 1", stream=log), 100)
  assert log.getvalue() == ""


def test_a_terminal_gets_a_redrawn_bar():
  terminal = _Terminal()
  bar = progress.progress(True, 100, "fp", stream=terminal, lines=True)
  _run(bar, 100)
  assert type(bar).__name__ == "tqdm" and "\r" in terminal.getvalue()


def test_disabled_progress_shows_nothing_anywhere():
  terminal = _Terminal()
  _run(progress.progress(False, 100, "fp", stream=terminal, lines=True), 100)
  assert terminal.getvalue() == ""


def test_postfix_values_appear_in_the_lines():
  log = io.StringIO()
  bar = progress.progress(True, 10, "fp", stream=log, lines=True)
  bar.set_postfix(loss="1.2345")
  bar.update(1)
  assert "loss 1.2345" in log.getvalue()
