r"""The GPT front: every train-time method of the library registry on the character GPT.

Trains the full-precision GPT of ``examples/shakespeare_gpt.py`` once (cached in
``<workdir>/fp``), then runs each *run spec* from that checkpoint for each seed
(the data order of the method's phases) with the example's default schedule
(phase 1 + phase 2, AdamW with a cosine from ``--learning_rate``), so every row
gets the same steps. Writes ``benchmarks/RESULTS_gpt.md`` (mean +- std over
seeds of validation loss, sparsity of the quantized kernels and the exported
bytes, float32 leaves and float16 leaves) and a PNG with loss vs sparsity and
loss vs the float16 exported bytes, both from the runs' ``report.json``::

  TFDS_DATA_DIR=../shared/data/tfds python benchmarks/gpt_methods.py \
      --workdir=runs/gpt_methods --seeds=0,1,2

A run spec is ``NAME[:KEY=VALUE]...``. ``NAME`` is a method of
``ec2t.method_registry()`` (kind ``train``) or ``none``, the full-precision
model continued for the same steps with the same optimizer and schedule (the
reference every method is measured against). ``KEY`` is a flag of the example
(``gamma``, ``target_sparsity``, ``bits_per_weight``, ``activation_bits``, ...) or
else one of the method's knobs (``--method_options``): ``ec2t:gamma=0.1``,
``bitnet:activation_bits=8`` (W1.58A8), ``paretoq:bits=2``. A name the registry
does not hold is skipped with a message (e.g. a method of a branch not merged
yet); a key that is neither a flag nor a knob stops the script before any run.

Resumable: a run whose ``report.json`` exists is read, not re-run; a run cut
short resumes from its checkpoints. ``--quick`` is the smoke mode (a tiny model,
a few steps, one seed, three runs) that ``tests/examples/test_gpt_methods.py``
runs. Each row's CPU time (process CPU seconds of the method's run, all
threads) is in the table.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

# The front: a gamma sweep and two size budgets of EC2T, BitNet weights-only and W1.58A8,
# ParetoQ ternary and 2-bit, TWN, TTQ, STTN, Faraone et al., full precision continued.
# EC2T's rows train the latent weights for 950 of the 1000 steps (phase 2, assignment frozen,
# the last 50): the transformer recipe of item 4, which measured lower at the same size.
EC2T_PHASES = ":phase1_steps=950:phase2_steps=50"
# TTQ's defaults are the official code's, whose scales are momentum-SGD variables; under the
# GPT's AdamW the library's Adam variant is the fair row (README, "TTQ").
TTQ_ADAM = "ttq:init_scale=none:latent_step=update:scale_step=mean"
FRONT = ("none", *(f"ec2t:{knob}{EC2T_PHASES}" for knob in (
    "gamma=0.05", "gamma=0.1", "gamma=0.15", "gamma=0.2", "bits_per_weight=1.0",
    "bits_per_weight=0.7")), "bitnet", "bitnet:activation_bits=8", "paretoq", "paretoq:bits=2",
         "twn", "ttq", TTQ_ADAM, "sttn", "faraone")
QUICK_RUNS = ("none", "ec2t:gamma=0.2", "bitnet:activation_bits=8")
QUICK_FLAGS = ("--num_layers=1", "--num_heads=2", "--width=16", "--block_size=16",
               "--batch_size=4", "--fp_steps=4", "--warmup_steps=1", "--phase1_steps=3",
               "--phase2_steps=1", "--eval_every=4", "--eval_batch_size=8192")
NO_METHOD = "none"
PAPER = "ec2t"
# Hand-written notes below this line of RESULTS_gpt.md survive a rewrite of the table.
NOTES_MARKER = "<!-- notes below: kept when gpt_methods.py rewrites the table -->"

# Its own flags (not absl's global ones): the tests import this module beside
# compare_methods.py, whose --workdir, --seeds and --data_dir would clash.
FLAGS = flags.FlagValues()
_d = lambda define, *args, **kwargs: define(*args, flag_values=FLAGS, **kwargs)
_d(flags.DEFINE_string, "workdir", "runs/gpt_methods", "Folder of every run (fp/ is the cache).")
_d(flags.DEFINE_string, "seeds", "0,1,2", "Seeds of the methods' phases (comma-separated).")
_d(flags.DEFINE_string, "runs", ",".join(FRONT),
   "Run specs NAME[:KEY=VALUE]... (comma-separated).")
_d(flags.DEFINE_bool, "quick", False, "Smoke mode: a tiny model, a few steps, seed 0, "
   f"runs {','.join(QUICK_RUNS)} (unless --runs / --seeds are given).")
_d(flags.DEFINE_bool, "cached_only", False, "Only tabulate the runs that already finished.")
_d(flags.DEFINE_string, "example_flags", "", "Extra flags for every run of the example "
   "(space-separated).")
_d(flags.DEFINE_string, "data_dir", None, "tfds data folder; default $TFDS_DATA_DIR.")
_d(flags.DEFINE_string, "output", str(REPO / "benchmarks" / "RESULTS_gpt.md"), "Markdown table.")
_d(flags.DEFINE_string, "plot", str(REPO / "benchmarks" / "RESULTS_gpt_front.png"), "PNG front.")

class RunSpec:
  """One row: ``NAME[:KEY=VALUE]...`` as example flags and ``--method_options``."""

  def __init__(self, text: str):
    name, *items = text.strip().split(":")
    self.text, self.name = text.strip(), name.strip()
    self.items = []
    for item in items:
      key, sep, value = item.partition("=")
      if not sep or not key.strip():
        raise ValueError(f"run spec {text!r}: {item!r} is not KEY=VALUE")
      self.items.append((key.strip(), value.strip()))

  @property
  def label(self) -> str:
    return "full precision continued" if self.name == NO_METHOD else self.text

  @property
  def folder(self) -> str:
    return self.text.replace(":", "_").replace("/", "-")

  def example_args(self, example_flags: set[str], knobs: dict) -> list[str]:
    """The example's flags of this run; raises ``ValueError`` for an unknown key."""
    args, options = [f"--method={self.name}"], []
    for key, value in self.items:
      # A knob of the method is one of its options, except EC2T's knobs that are also flags
      # of the example (gamma, init_scale, sustain): TTQ's init_scale is TTQ's.
      paper_flag = self.name == PAPER and key in example_flags
      if key in knobs and not paper_flag:
        options.append(f"{key}={value}")
      elif key in example_flags and key not in ("method", "method_options"):
        args.append(f"--{key}={value}")
      else:
        raise ValueError(f"run spec {self.text!r}: {key!r} is neither a flag of "
                         f"examples/shakespeare_gpt.py nor a knob of {self.name!r} "
                         f"(knobs: {', '.join(sorted(knobs)) or 'none'})")
    return args + ([f"--method_options={','.join(options)}"] if options else [])


def _example_flags() -> tuple[set[str], object]:
  import shakespeare_gpt  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  shakespeare_gpt.define_flags(fv)
  return set(fv), shakespeare_gpt


def resolve(specs: list[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
  """``(spec, example flags)`` of every spec the registry holds; the others are reported
  and skipped. Raises ``ValueError`` for a key that is neither a flag nor a knob."""
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  from common import methods  # pylint: disable=g-import-not-at-top
  example_flags, _ = _example_flags()
  registry = ec2t.method_registry()
  out = []
  for spec in specs:
    if spec.name == NO_METHOD:
      out.append((spec, spec.example_args(example_flags, {})))
      continue
    if spec.name not in registry:
      print(f"skipping {spec.text!r}: {spec.name!r} is not a registered method "
            f"(ec2t.method_registry(): {', '.join(sorted(registry))})", flush=True)
      continue
    if registry[spec.name].kind != "train":
      raise ValueError(f"run spec {spec.text!r}: {spec.name!r} is a {registry[spec.name].kind} "
                       "method; the front compares train-time methods")
    knobs = methods.option_defaults(spec.name)
    out.append((spec, spec.example_args(example_flags, knobs)))
  return out


def _run_example(args: list[str]) -> dict:
  _, shakespeare_gpt = _example_flags()
  fv = flags.FlagValues()
  shakespeare_gpt.define_flags(fv)
  fv(["shakespeare_gpt", "--noprogress", "--sample_chars=0", *args])
  return shakespeare_gpt.run(fv)


def _cached(workdir: str, args: list[str]) -> dict:
  """The run's report.json (+ timing.json) if it finished, else runs it (resuming)."""
  report, timing = (os.path.join(workdir, n) for n in ("report.json", "timing.json"))
  if not os.path.exists(report):
    resume = ["--resume"] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    wall, cpu = time.perf_counter(), time.process_time()
    _run_example([f"--workdir={workdir}", *args, *resume])
    seconds = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "resumed": bool(resume)}
    with open(timing, "w", encoding="utf-8") as f:
      json.dump(seconds, f)
    print(f"{workdir}: {seconds['wall_s']:.0f} s wall, {seconds['cpu_s']:.0f} s CPU", flush=True)
  with open(report, encoding="utf-8") as f:
    result = json.load(f)
  if os.path.exists(timing):
    with open(timing, encoding="utf-8") as f:
      result["timing"] = json.load(f)
  return result


def _float16_export(workdir: str, args: list[str]) -> dict:
  """Bytes and validation loss of the run's ``model.ec2t`` re-exported with its float leaves
  as float16 (``ec2t.export.encode(..., float16=True)``; ternary leaves unchanged), evaluated
  by the run's own model (same flags), cached in ``<workdir>/float16.json``."""
  cache = os.path.join(workdir, "float16.json")
  if os.path.exists(cache):
    with open(cache, encoding="utf-8") as f:
      return json.load(f)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from common import language  # pylint: disable=g-import-not-at-top
  from ec2t_jax import export  # pylint: disable=g-import-not-at-top
  _, shakespeare_gpt = _example_flags()
  fv = flags.FlagValues()
  shakespeare_gpt.define_flags(fv)
  fv(["shakespeare_gpt", *args])
  data = language.load_tiny_shakespeare(fv.data_dir)
  _, apply_fn = shakespeare_gpt.build_model(fv, len(data.vocab))
  blob = export.encode(export.load(os.path.join(workdir, "model.ec2t")), float16=True)
  params = export.decode(blob)
  eval_step = jax.jit(language.make_eval_step(apply_fn))
  windows = language.eval_windows(data.val, fv.block_size)
  loss = count = 0.0
  for start in range(0, len(windows["x"]), fv.eval_batch_size):
    batch = {k: v[start:start + fv.eval_batch_size] for k, v in windows.items()}
    sums = eval_step(params, {**batch, "mask": np.ones(len(batch["x"]), np.float32)})
    loss, count = loss + float(sums["loss"]), count + float(sums["count"])
  result = {"float16_bytes": len(blob), "float16_val_loss": loss / count}
  with open(cache, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


def _stats(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one seed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _pm(values, fmt: str) -> str:
  mean, std = _stats(values)
  return f"{format(mean, fmt)} ± {format(std, fmt)}"


def bytes_front(rows: dict[str, list[dict]]) -> set[str]:
  """The rows on the loss-vs-bytes front (means over seeds, float16 exports): no other row
  has a file at most as large and a lower loss.

  Example:
    >>> r = lambda loss, size: [{"val_loss": loss, "float16_bytes": size}]
    >>> sorted(bytes_front({"a": r(1.0, 300), "b": r(1.2, 100), "c": r(1.3, 200)}))
    ['a', 'b']
  """
  points = {name: (_stats([r["float16_bytes"] for r in runs])[0],
                   _stats([r["val_loss"] for r in runs])[0]) for name, runs in rows.items()}
  return {name for name, (size, loss) in points.items()
          if not any(s <= size and l < loss for other, (s, l) in points.items()
                     if other != name)}


def table(fp: dict, rows: dict[str, list[dict]], command: str, skipped: list[str],
          plot_name: str = "RESULTS_gpt_front.png") -> str:
  """``RESULTS_gpt.md``: one row per run spec, mean ± std over its seeds."""
  lines = ["# Ternary methods on a character-level GPT (tiny Shakespeare): the front", "",
           f"Command: `{command}`", "",
           f"Model {fp['model']} (layers x heads x width x context; the example's default "
           "is nanoGPT's CPU configuration); full precision trained once "
           f"({fp.get('fp_steps', '?')} AdamW steps; val loss {fp['fp_val_loss']:.4f}); every "
           "row starts from that checkpoint and runs the example's phases (phase 1 + phase 2, "
           "the same steps, AdamW and cosine for every row). `full precision continued`: the "
           "same steps with nothing quantized. Quantized: every linear kernel of the blocks "
           "(embedding / tied head, position embedding, LayerNorms and biases stay float). "
           "`activation_bits=8`: those kernels' inputs are int8 per token (W1.58A8). Loss in "
           "nats/char on tfds validation+test; mean ± std (sample) over the seeds.", "",
           "Exported: `model.ec2t` with float32 float leaves; float16: the same file with "
           "the float leaves as float16 (ternary kernels unchanged) and that file's val loss. "
           "CPU: process CPU seconds of one run (all threads; mean over seeds). Front: on the "
           "loss-vs-float16-bytes front of the means (no other row has a file at most as "
           "large and a lower loss).", "",
           "| run | seeds | val loss | sparsity | exported (B) | float16 export (B) | "
           "its val loss | CPU s / run | front |",
           "|---|---|---|---|---|---|---|---|---|"]
  front = bytes_front(rows)
  for name, runs in rows.items():
    cpu = [r["timing"]["cpu_s"] for r in runs if r.get("timing")]
    lines.append(
        f"| {name} | {len(runs)} | {_pm([r['val_loss'] for r in runs], '.4f')} | "
        f"{_pm([100 * r['sparsity'] for r in runs], '.1f')}% | "
        f"{_pm([r['export_bytes'] for r in runs], ',.0f')} | "
        f"{_pm([r['float16_bytes'] for r in runs], ',.0f')} | "
        f"{_pm([r['float16_val_loss'] for r in runs], '.4f')} | "
        + (f"{_stats(cpu)[0]:,.0f} |" if cpu else "- |")
        + (" yes |" if name in front else " |"))
  lines += ["", f"![loss vs sparsity and bytes]({plot_name})"]
  lines += [""] + [f"Skipped (not in `ec2t.method_registry()`): `{s}`" for s in skipped]
  return "\n".join(lines) + "\n"


def kept_notes(path: str) -> str:
  """The marker and what follows it in the existing ``path`` ("" if none)."""
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  at = text.find(NOTES_MARKER)
  return "" if at < 0 else "\n" + text[at:]


def plot(fp: dict, rows: dict[str, list[dict]], path: str) -> None:
  """Loss vs sparsity and loss vs float16 exported bytes, mean ± std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
  for name, runs in rows.items():
    loss = _stats([r["val_loss"] for r in runs])
    for ax, key, scale in ((axes[0], "sparsity", 100.0), (axes[1], "float16_bytes", 1 / 1024)):
      x = _stats([r[key] * scale for r in runs])
      ax.errorbar(x[0], loss[0], xerr=x[1], yerr=loss[1], fmt="o", capsize=3, label=name)
  for ax in axes:
    ax.axhline(fp["fp_val_loss"], color="k", ls="--", lw=1, label="full precision (start)")
  axes[0].set_xlabel("sparsity of the quantized kernels (%)")
  axes[1].set_xlabel("exported file, float leaves as float16 (KiB)")
  axes[0].set_ylabel("validation loss (nats/char)")
  axes[1].legend(fontsize=7, loc="upper right")
  fig.suptitle("tiny Shakespeare GPT: every method, the same steps")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _runs_and_seeds(quick: bool) -> tuple[str, str]:
  """``--runs`` and ``--seeds``, or the smoke mode's when ``--quick`` leaves them unset."""
  runs = FLAGS.runs if FLAGS["runs"].present or not quick else ",".join(QUICK_RUNS)
  seeds = FLAGS.seeds if FLAGS["seeds"].present or not quick else "0"
  return runs, seeds


def _extra_flags(quick: bool) -> list[str]:
  """Flags every example run gets: the smoke mode's, ``--example_flags``, ``--data_dir``."""
  extra = [*(QUICK_FLAGS if quick else ()), *FLAGS.example_flags.split()]
  if FLAGS.data_dir:
    extra.append(f"--data_dir={FLAGS.data_dir}")
  return extra


def _full_precision(extra: list[str]) -> tuple[dict, str]:
  """The cached full-precision run's report and the ``--init_from`` flag of its checkpoint."""
  fp_dir = os.path.join(FLAGS.workdir, "fp")
  fp = _cached(fp_dir, ["--phase1_steps=0", *[a for a in extra if "phase" not in a]])
  fp["fp_steps"] = next((a.split("=")[1] for a in extra if a.startswith("--fp_steps=")), 2000)
  return fp, f"--init_from={os.path.join(fp_dir, 'checkpoints', 'fp', 'latest')}"


def _command() -> str:
  """The command line that reproduces the table (without the output-only flags)."""
  return "python benchmarks/gpt_methods.py " + " ".join(
      a for a in sys.argv[1:] if not a.startswith(("--output", "--plot", "--cached_only")))


def _run_one(spec: RunSpec, args: list[str], seed: int, init: str,
             extra: list[str]) -> dict | None:
  """One run's results (cached or run now); None with ``--cached_only`` and no report."""
  workdir = os.path.join(FLAGS.workdir, f"{spec.folder}_s{seed}")
  if FLAGS.cached_only and not os.path.exists(os.path.join(workdir, "report.json")):
    return None
  run_args = [init, *args, f"--seed={seed}", *extra]
  return {**_cached(workdir, run_args), **_float16_export(workdir, run_args)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  quick = FLAGS.quick
  runs, seeds = _runs_and_seeds(quick)
  extra = _extra_flags(quick)
  specs = [RunSpec(r) for r in runs.split(",") if r.strip()]
  planned = resolve(specs)
  skipped = [s.text for s in specs if s not in [p for p, _ in planned]]
  fp, init = _full_precision(extra)
  command = _command()
  rows: dict[str, list[dict]] = {}
  notes = kept_notes(FLAGS.output)
  for spec, args in planned:
    for seed in (int(s) for s in seeds.split(",") if s.strip()):
      result = _run_one(spec, args, seed, init, extra)
      if result is None:
        continue
      rows.setdefault(spec.label, []).append(result)
      with open(FLAGS.output, "w", encoding="utf-8") as f:  # rewritten after every run
        f.write(table(fp, rows, command, skipped, os.path.basename(FLAGS.plot)) + notes)
  print(table(fp, rows, command, skipped, os.path.basename(FLAGS.plot)), flush=True)
  if rows:
    plot(fp, rows, FLAGS.plot)


def _parse_flags(argv):
  """This script's flags, then absl's own (logging, ...) on the rest."""
  return flags.FLAGS(FLAGS(argv, known_only=True))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
