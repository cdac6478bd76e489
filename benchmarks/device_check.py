r"""Device check: packed ternary decoding, step/compile overhead and the GPT's val loss, one table.

Sections (``--sections``; a section or model not started within ``--max_seconds``, default
330, is skipped, so that the run ends within 8 minutes on a GPU; every row is also printed as
it is made):

* ``decode``: tokens/s of greedy decoding with a KV cache
  (:func:`ec2t_jax.models.gpt_decode.generate`, one jitted loop of
  ``--new_tokens`` steps, default 64, after a 1-token prompt) at batch 1 and 16, for the
  GPT at nanoGPT's GPU size (6 layers x 6 heads x 384, context 256) and a
  12 x 12 x 768 GPT, both with random ternary block kernels (per-column
  scales, 50% zeros), through the routes (``--routes``) of
  :func:`ec2t_jax.export.pack_params`: ``dense`` (bf16 kernels), ``xla``
  (int4 codes decoded in the matmul's prologue) and ``pallas`` (2-bit codes,
  the Pallas kernel; ``pallas:32`` with 32 output columns a program, 4x the
  programs for batch 1). Each route also decodes the dense route's greedy tokens
  teacher-forced (batch 1): ``same greedy`` says whether its own greedy tokens
  equal the dense route's, ``max|dlogit|`` is the largest logit difference to
  the dense route on the same inputs, relative to the largest logit.
* ``overhead``: the chained EC2T step and its compile time vs Adam
  (``benchmarks/step_overhead.py``'s ``_benchmark``) on ResNet-20 and the
  12-layer GPT of that benchmark.
* ``val_loss`` (opt-in, time-boxed by ``--val_loss_seconds``): runs
  ``examples/shakespeare_gpt.py`` at nanoGPT's GPU size (6 x 6 x 384,
  context 256, batch 64, 5000 iterations; nanoGPT's README gives 1.4697 val
  loss for it, with dropout 0.2 which this GPT does not have) and reports the
  full-precision and EC2T val loss. Needs tensorflow-datasets and the
  prepared data (``--data_dir`` or ``$TFDS_DATA_DIR``); its time comes on top
  of the 8 minutes.

Without a GPU (or with ``--cpu_smoke``) it runs the same code on small
shapes (a 2 x 2 x 64 GPT, context 32, 8 new tokens; LeNet-5 for the
overhead), the Pallas kernel in interpret mode: that is what the test suite
runs. Every section catches its own failures and prints them in the table.

Run::

  python benchmarks/device_check.py                      # GPU: decode + overhead, < 8 min
  python benchmarks/device_check.py --sections decode,overhead,val_loss --val_loss_seconds 300
  python benchmarks/device_check.py --cpu_smoke          # small shapes, any machine
  nice python benchmarks/device_check.py --sections decode --decode_models gpu_size \
      --routes dense,xla,pallas --new_tokens 16          # the decode table at GPU size on CPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np  # pylint: disable=wrong-import-position

from ec2t_jax import export  # pylint: disable=wrong-import-position
from ec2t_jax.models import GPT, GPTConfig, gpt_decode

_SECTIONS = flags.DEFINE_list("sections", ["decode", "overhead"],
                              "decode, overhead, val_loss.")
_CPU_SMOKE = flags.DEFINE_bool("cpu_smoke", None,
                               "Small shapes (default: when the backend is not a GPU).")
_MODELS_DECODE = flags.DEFINE_list("decode_models", None,
                                   "Decode models: gpu_size, gpt12x768, smoke "
                                   "(default: gpu_size,gpt12x768; smoke with --cpu_smoke).")
_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16"], "Decode batch sizes.")
_ROUTES = flags.DEFINE_list("routes", ["dense", "xla", "pallas", "pallas:32"],
                            "Routes of pack_params (pallas:N: block_n = N).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None,
                                   "Tokens decoded per timed call (default 64; 8 smoke).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per cell (median).")
_OVERHEAD_ROUNDS = flags.DEFINE_integer("overhead_rounds", 10, "Step rounds per variant.")
_VAL_LOSS_SECONDS = flags.DEFINE_integer("val_loss_seconds", 300,
                                         "Time box of the val_loss section (killed after).")
_VAL_LOSS_STEPS = flags.DEFINE_string("val_loss_steps", "5000,750,250",
                                      "fp_steps,phase1_steps,phase2_steps of the val_loss run.")
# allow_override: the tests import this module and compare_methods.py (which has its own
# --data_dir) into one process; absl would refuse the second definition.
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data folder (default $TFDS_DATA_DIR).",
                                allow_override=True)
_MAX_SECONDS = flags.DEFINE_integer("max_seconds", 330,
                                    "Skip the sections (decode models, overhead models) not "
                                    "started after this many seconds.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON here.")

DECODE_MODELS = {
    "gpu_size": GPTConfig(vocab_size=65, block_size=256, num_layers=6, num_heads=6, width=384),
    "gpt12x768": GPTConfig(vocab_size=65, block_size=256, num_layers=12, num_heads=12,
                           width=768),
    "smoke": GPTConfig(vocab_size=65, block_size=32, num_layers=2, num_heads=2, width=64),
}


@dataclasses.dataclass
class Row:
  """One line of the final table."""
  section: str
  item: str
  value: str
  note: str = ""


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
  """Median ``(wall, process CPU)`` seconds of ``fn`` (CPU time: less sensitive to a loaded
  machine; it sums the process's threads)."""
  walls, cpus = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - start_cpu)
  return statistics.median(walls), statistics.median(cpus)


def random_gpt_params(config: GPTConfig, seed: int = 0):
  """A GPT's params (numpy) with random ternary block kernels (per-column scales)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(seed)), nnx.Param))
  params = gpt_decode.random_ternary(params, seed + 1)
  return jax.tree.map(np.asarray, params)


def decode_rows(name: str, config: GPTConfig, *, routes, batches, new_tokens: int,
                repeats: int, dtype=jnp.bfloat16) -> list[Row]:
  """Tokens/s per route and batch, greedy agreement and logit differences vs ``dense``."""
  params = random_gpt_params(config)
  rows, reference, speeds = [], {}, {}
  for route in routes:
    try:
      kind, _, block_n = route.partition(":")  # "pallas:32": 32 output columns a program
      tree = jax.device_put(export.pack_params(params, kind, dtype=dtype,
                                               block_n=int(block_n) if block_n else None))
      resident = export.resident_bytes(tree)
      for batch in batches:
        prompt = jnp.zeros((batch, 1), jnp.int32)
        run = lambda: gpt_decode.generate(tree, prompt, config=config, new_tokens=new_tokens)
        start = time.perf_counter()
        tokens, _ = jax.block_until_ready(run())
        compile_s = time.perf_counter() - start
        seconds, cpu_seconds = _median_seconds(run, repeats)
        speed = batch * new_tokens / seconds
        speeds[(route, batch)] = speed
        note = (f"{batch * new_tokens / cpu_seconds:,.0f} tok/CPU-s, compile+first "
                f"{compile_s:.1f} s, resident {resident / 2**20:.2f} MiB")
        if route == "dense":
          reference[batch] = np.asarray(tokens)
        elif batch in reference:
          same = bool(np.array_equal(np.asarray(tokens), reference[batch]))
          note += f", same greedy {same}"
          if batch == batches[0]:
            forced = jnp.asarray(reference[batch])  # the dense route's inputs, step by step
            _, mine = gpt_decode.generate(tree, prompt, config=config, new_tokens=new_tokens,
                                          forced=forced)
            if "forced" not in reference:
              reference["forced"] = gpt_decode.generate(
                  reference["tree"], prompt, config=config, new_tokens=new_tokens,
                  forced=forced)[1]
            base = reference["forced"]
            diff = float(jnp.abs(mine - base).max() / jnp.abs(base).max())
            note += f", max|dlogit| {diff:.2e}"
        ratio = (f" ({speed / speeds[('dense', batch)]:.2f}x dense)"
                 if ("dense", batch) in speeds and route != "dense" else "")
        rows.append(Row("decode", f"{name} {route} batch {batch}",
                        f"{speed:,.0f} tok/s{ratio}", note))
      if route == "dense":
        reference["tree"] = tree
    except Exception as e:  # pylint: disable=broad-except  # one failing route, not the run
      rows.append(Row("decode", f"{name} {route}", "failed",
                      f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
      traceback.print_exc()
  return rows


def overhead_rows(smoke: bool, rounds: int, late=lambda: False) -> list[Row]:
  """Chain step and compile ratios vs Adam, from ``step_overhead._benchmark``."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import step_overhead  # pylint: disable=g-import-not-at-top
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  flags.FLAGS.variants = ["adam", "chain"]
  cases = ([("LeNet-5", models.LeNet5(), (28, 28, 1), 8)] if smoke else
           [("ResNet-20", models.cifar_resnet(20), (32, 32, 3), 128),
            ("GPT 12x128 unrolled", step_overhead._GPTModel(12, scan=False), "tokens", 12)])
  rows = []
  for name, model, shape, batch in cases:
    if late():
      rows.append(Row("overhead", name, "skipped", "not started within --max_seconds"))
      continue
    try:
      ratios = step_overhead._benchmark(name, model, shape, rounds, batch, 1)["chain"]
      rows.append(Row("overhead", f"{name} chain vs adam",
                      f"step {ratios['step']:.3f}x, compile {ratios['compile']:.2f}x",
                      f"{rounds} rounds, 1 compile"))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(Row("overhead", name, "failed", f"{type(e).__name__}: {e}"[:160]))
      traceback.print_exc()
  return rows


def val_loss_rows(seconds: int, steps: str, data_dir) -> list[Row]:
  """The example at nanoGPT's GPU size, killed after ``seconds``; its report's val losses."""
  fp, phase1, phase2 = (int(s) for s in steps.split(","))
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
  if not data_dir or not os.path.isdir(data_dir):
    return [Row("val_loss", "gpt 6x6x384", "skipped", f"no tfds data folder ({data_dir!r})")]
  try:
    import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return [Row("val_loss", "gpt 6x6x384", "skipped", "tensorflow_datasets not installed")]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tempfile.mkdtemp(prefix="device_check_gpt_")
  command = [sys.executable, os.path.join(root, "examples", "shakespeare_gpt.py"),
             f"--workdir={workdir}", f"--data_dir={data_dir}", "--num_layers=6",
             "--num_heads=6", "--width=384", "--block_size=256", "--batch_size=64",
             f"--fp_steps={fp}", f"--phase1_steps={phase1}", f"--phase2_steps={phase2}",
             "--eval_every=1000", "--sample_chars=0", "--noprogress"]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, cwd=root, timeout=seconds, capture_output=True, text=True,
                          check=False)
  except subprocess.TimeoutExpired:
    return [Row("val_loss", "gpt 6x6x384", "timed out", f"after {seconds} s ({steps} steps)")]
  report = os.path.join(workdir, "report.json")
  if done.returncode or not os.path.exists(report):
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    return [Row("val_loss", "gpt 6x6x384", "failed", f"exit {done.returncode}: {tail[0][:150]}")]
  with open(report, encoding="utf-8") as f:
    r = json.load(f)
  took = f"{time.perf_counter() - start:.0f} s, steps {steps}"
  return [Row("val_loss", "gpt 6x6x384 full precision", f"{r['fp_val_loss']:.4f}",
              f"nanoGPT 1.4697 (dropout 0.2); {took}"),
          Row("val_loss", "gpt 6x6x384 EC2T", f"{r['val_loss']:.4f}",
              f"sparsity {100 * r['sparsity']:.1f}%")]


def format_table(rows: list[Row]) -> str:
  """The one table the script prints."""
  widths = [max([len(getattr(r, f)) for r in rows] + [len(f)])
            for f in ("section", "item", "value")]
  lines = [f"{'section':<{widths[0]}}  {'item':<{widths[1]}}  {'value':<{widths[2]}}  note"]
  lines += [f"{r.section:<{widths[0]}}  {r.item:<{widths[1]}}  {r.value:<{widths[2]}}  {r.note}"
            for r in rows]
  return "\n".join(lines)


def _check_sections(sections) -> None:
  """Raises a ``ValueError`` naming the first section that is not a known one."""
  for section in sections:
    if section not in ("decode", "overhead", "val_loss"):
      raise ValueError(f"unknown section {section!r}: decode, overhead, val_loss")


def _device_row(smoke: bool) -> Row:
  """The first row: backend, device kind and jax version (and whether a CPU smoke run)."""
  device = jax.devices()[0]
  return Row("device", "backend", f"{jax.default_backend()} {device.device_kind}",
             f"jax {jax.__version__}" + (", cpu_smoke" if smoke else ""))


def _skipped(section: str, item: str, max_seconds: float) -> Row:
  """The row of a section (or a model of one) not started within ``max_seconds``."""
  return Row(section, item, "skipped", f"not started within --max_seconds={max_seconds}")


def _decode_section(emit, late, decode_models, max_seconds, **decode_kwargs) -> None:
  """Emits the decode rows of each model, or a skipped row for a model started too late."""
  for name in decode_models:
    if late():
      emit([_skipped("decode", name, max_seconds)])
      continue
    emit(decode_rows(name, DECODE_MODELS[name], **decode_kwargs))


def run_check(sections, *, smoke: bool, decode_models=None, routes=("dense", "xla", "pallas"),
              batches=(1, 16), new_tokens=None, repeats: int = 3, overhead_rounds: int = 10,
              max_seconds: float = 330, val_loss_seconds: int = 300,
              val_loss_steps: str = "5000,750,250", data_dir=None, echo=None) -> list[Row]:
  """Runs the sections; returns the rows (see the module docstring).

  A section (a decode model, an overhead model) not started within ``max_seconds`` is
  skipped with a row saying so; ``echo(row)`` is called on every row as it is made (so a run
  killed from outside still leaves its rows in the log).
  """
  start = time.perf_counter()
  rows = []
  emit = lambda new: [rows.append(r) or (echo(r) if echo else None) for r in new]
  emit([_device_row(smoke)])
  decode_models = decode_models or (["smoke"] if smoke else ["gpu_size", "gpt12x768"])
  new_tokens = new_tokens or (8 if smoke else 64)
  late = lambda: time.perf_counter() - start > max_seconds
  _check_sections(sections)
  for section in sections:
    if late():
      emit([_skipped(section, "-", max_seconds)])
    elif section == "decode":
      _decode_section(emit, late, decode_models, max_seconds, routes=list(routes),
                      batches=[int(b) for b in batches], new_tokens=new_tokens,
                      repeats=repeats)
    elif section == "overhead":
      emit(overhead_rows(smoke, 2 if smoke else overhead_rounds, late=late))
    else:
      emit(val_loss_rows(val_loss_seconds, val_loss_steps, data_dir))
  emit([Row("total", "wall time", f"{time.perf_counter() - start:.0f} s")])
  return rows


def main(argv):
  del argv
  smoke = (_CPU_SMOKE.value if _CPU_SMOKE.value is not None
           else jax.default_backend() not in ("gpu", "cuda", "rocm"))
  rows = run_check(_SECTIONS.value, smoke=smoke, decode_models=_MODELS_DECODE.value,
                   routes=_ROUTES.value, batches=_BATCHES.value, new_tokens=_NEW_TOKENS.value,
                   repeats=_REPEATS.value, overhead_rounds=_OVERHEAD_ROUNDS.value,
                   max_seconds=_MAX_SECONDS.value, val_loss_seconds=_VAL_LOSS_SECONDS.value,
                   val_loss_steps=_VAL_LOSS_STEPS.value, data_dir=_DATA_DIR.value,
                   echo=lambda r: print(f"[row] {r.section} | {r.item} | {r.value} | {r.note}",
                                        flush=True))
  print("\n" + format_table(rows), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
  app.run(main)
