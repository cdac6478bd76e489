r"""MNIST LeNet-5 benchmark: full precision vs EC2T for several gammas, with the example's defaults.

Runs ``examples/mnist_lenet.py`` once with full-precision pretraining, then once
per further gamma starting from that same pretrained model (``--init_from``), so
every gamma ternarizes the same network. Collects each run's ``report.json``
and prints (and writes to ``<workdir>/sweep.md`` and ``sweep.json``) one table:
test accuracy FP vs EC2T, sparsity and entropy (bits/weight) of the ternarized
layers, size vs float32, and training time per epoch FP vs EC2T.

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/mnist_gamma_sweep.py
  python benchmarks/mnist_gamma_sweep.py --gammas=0,0.2 --workdir=runs/sweep_small \
      -- --phase1_epochs=2          # flags after -- go to mnist_lenet.py

Each run resumes from its checkpoints, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/mnist_gamma_sweep", "Output folder (one run per gamma).")
flags.DEFINE_list("gammas", ["0", "0.1", "0.2", "0.3", "0.5"], "Gammas to run; the first one "
                  "also pretrains the full-precision model.")
flags.DEFINE_string("model", "lenet5", "lenet5 or lenet300100.")
flags.DEFINE_integer("timing_steps", 200, "Steps per round of the interleaved FP vs EC2T step "
                     "timing (0: skip it).")
flags.DEFINE_integer("timing_rounds", 5, "Rounds of the interleaved timing.")


def interleaved_step_timing(model_name: str, steps: int, rounds: int) -> dict[str, float]:
  """Runs ``benchmarks/mnist_step_timing.py`` (with ``examples/`` importable) and
  returns its JSON result."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO / "examples"), env.get("PYTHONPATH")) if p)
  command = [sys.executable, str(REPO / "benchmarks" / "mnist_step_timing.py"),
             f"--model={model_name}", f"--steps={steps}", f"--rounds={rounds}"]
  print("$", " ".join(command), flush=True)
  out = subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _run(gamma: str, workdir: pathlib.Path, extra: list[str], init_from: str | None) -> dict:
  command = [sys.executable, str(REPO / "examples" / "mnist_lenet.py"), f"--model={FLAGS.model}",
             f"--gamma={gamma}", f"--workdir={workdir}", "--resume", "--noprogress", *extra]
  if init_from:
    command.append(f"--init_from={init_from}")
  print("$", " ".join(command), flush=True)
  started = time.perf_counter()
  subprocess.run(command, check=True, cwd=REPO)
  report = json.loads((workdir / "report.json").read_text())
  report["wall_seconds"] = time.perf_counter() - started
  return report


def _table(reports: list[dict], fp_seconds: float | None) -> str:
  lines = ["| gamma | FP test acc | EC2T test acc | delta (pts) | sparsity (ternarized) "
           "| bits/weight (entropy) | size vs fp32 (2-bit / entropy) | s/epoch FP | s/epoch EC2T "
           "| EC2T/FP |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    ec2t_s = r.get("ec2t_seconds_per_epoch")
    ratio = f"{ec2t_s / fp_seconds:.2f}x" if fp_seconds and ec2t_s else "-"
    lines.append(
        f"| {r['gamma']:g} | {100 * r['fp_test_accuracy']:.2f}% | "
        f"{100 * r['ternary_test_accuracy']:.2f}% | "
        f"{100 * (r['ternary_test_accuracy'] - r['fp_test_accuracy']):+.2f} | "
        f"{100 * r['sparsity']:.1f}% | {r['bits_per_weight']:.3f} | "
        f"{r['sizes']['ratio_packed']:.3f} / {r['sizes']['ratio_entropy']:.3f} | "
        f"{fp_seconds:.1f} | {ec2t_s:.1f} | {ratio} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  extra = argv[1:]  # everything after "--"
  root = pathlib.Path(FLAGS.workdir)
  root.mkdir(parents=True, exist_ok=True)
  first = root / f"gamma_{FLAGS.gammas[0]}"
  reports = [_run(FLAGS.gammas[0], first, extra, None)]
  fp_seconds = reports[0].get("fp_seconds_per_epoch")
  for gamma in FLAGS.gammas[1:]:
    reports.append(_run(gamma, root / f"gamma_{gamma}", extra,
                        str(first / "checkpoints" / "fp")))
  table = _table(reports, fp_seconds)
  if FLAGS.timing_steps:
    timing = interleaved_step_timing(FLAGS.model, FLAGS.timing_steps, FLAGS.timing_rounds)
    table += (f"\n\nInterleaved step timing ({FLAGS.timing_rounds} rounds x "
              f"{FLAGS.timing_steps} steps, batch 128, median): FP "
              f"{1000 * timing['fp_seconds_per_step']:.1f} ms/step, EC2T "
              f"{1000 * timing['ec2t_seconds_per_step']:.1f} ms/step, ratio "
              f"{timing['ratio']:.2f}x")
    reports.append({"interleaved_step_timing": timing})
  (root / "sweep.json").write_text(json.dumps(reports, indent=2))
  (root / "sweep.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
