r"""Every registered method on one MNIST LeNet-5 front: accuracy vs sparsity and vs bytes.

One command:

  TFDS_DATA_DIR=/work/shared/data/tfds python benchmarks/compare_methods.py
  python benchmarks/compare_methods.py --quick          # smoke test (minutes)

1. **Dense model** (once, cached in ``<workdir>/dense.msgpack``): LeNet-5
   (6C5-MP2-16C5-MP2-120-84-10) trained by this script in full precision,
   Adam ``3e-3`` cosine-decayed over ``--dense_steps`` batches of 128.
2. **Every method of the library's registry** (built by the examples' generic
   builder, ``examples/common/methods.py``) starts from that model with one knob
   swept over its ``Knob.sweep`` (:func:`swept_knob`; a method with no numeric
   sweep runs once with its defaults) at the **same training budget**: ``--phase1_steps`` + ``--phase2_steps``
   batches of 128, the same inner optimizer for every chain-form method
   (L2 ``5e-6`` + Adam ``1e-3``, constant; staged methods: restarted and cosine-annealed
   per stage, the examples' ``solver=inner``), phase 2 after
   ``ec2t.set_phase`` (EC2T: assignment frozen; Faraone et al.: prune and
   retrain; staged INQ/SLQ/MLQ: last stage); post-training methods (MCQ,
   calibrated pruning) get no training, only the dense model (and calibration
   images for pruning). ``--seeds`` seeds each (data order, MCQ sampling,
   calibration subset).
3. **Measures** of each run: test accuracy (10,000 images), sparsity of the
   compressed layers (the paper's rule: every kernel but the first and the last
   in forward order, 60,480 weights), the exported file's bytes
   (``ec2t.export.save`` of the whole model) and the zeroth-order value
   entropy of the compressed layers.
4. **Output** in ``--workdir``: one JSON per run under ``runs/`` (a rerun
   resumes: finished runs are read back), ``compare.json``, ``compare.md``
   (mean +- std over seeds, the two fronts) and ``compare.png``.
   ``--results_md`` / ``--png`` also write the table and the figure elsewhere
   (the repository's ``benchmarks/RESULTS_compare.md``).

Staged methods (INQ, SLQ, MLQ) restart their inner optimizer at each stage and anneal
its rate within the stage (the examples' option ``solver=inner``); ``EXTRA_POINTS`` adds
INQ and SLQ under the official INQ solver (``solver=official``: SGD momentum, the
official step schedule per stage). Rows marked *before* re-run a method the way it ran
before issue 25 (e.g. SLQ freezing by ascending error from a quantile start); they are
listed for the before/after figures and left out of the fronts.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
import types
from typing import Any

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from ec2t_jax import models as ec2t_models  # pylint: disable=g-import-not-at-top,wrong-import-position
import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top,wrong-import-position
from ec2t_jax import export as _export  # noqa: F401  pylint: disable=unused-import
from common import methods as methods_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from common import posttrain  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/compare_methods", "Output and cache folder.")
flags.DEFINE_string("data_dir", None, "tfds data folder (default $TFDS_DATA_DIR).",
                    allow_override=True)  # gpt_methods.py defines it too (one test process)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every point.")
flags.DEFINE_list("methods", [], "Registered methods to run (default: all).")
flags.DEFINE_integer("dense_steps", 2000, "Steps of the dense model's training.")
flags.DEFINE_integer("phase1_steps", 400, "Phase 1 steps of every train-time method.")
flags.DEFINE_integer("phase2_steps", 200, "Phase 2 steps of every train-time method.")
flags.DEFINE_bool("quick", False, "Smoke test: 1 seed, one point per method, tiny budgets, "
                  "1,000 test images, fast calibrated pruning.")
flags.DEFINE_bool("before", True, "Also run the 'before' rows (seed 0 only).")
flags.DEFINE_bool("report_only", False, "Only summarise the runs already in the cache.")
flags.DEFINE_bool("reduced", False, "Only the REDUCED subset of each sweep (and the 'before' rows).")
flags.DEFINE_string("results_md", None, "Also write the markdown here.")
flags.DEFINE_string("png", None, "Also write the figure here.")

MEAN, STD = 0.1307, 0.3081
BATCH = 128


@dataclasses.dataclass(frozen=True)
class Point:
  """One knob setting of one method.

  Attributes:
    label: the knob as printed (``gamma=0.2``).
    x: the knob's value (for sorting).
    options: the method's ``method_options`` overrides.
    config: overrides of the shared config (EC2T's ``gamma``).
    before: a pre-fix variant (seed 0 only, not on the fronts).
  """
  label: str
  x: float
  options: dict = dataclasses.field(default_factory=dict)
  config: dict = dataclasses.field(default_factory=dict)
  before: bool = False


# Which knob of a method this front sweeps, where it is not the first knob with a numeric
# sweep (its values always come from the library: ``Knob.sweep``). None: the defaults only.
SWEPT = {"ttq": "sparsity", "faraone": "strength", "mlq": None}

# Extra points of the paper's method: the size budget (ec2t.Budget), a target bits/weight
# ramped in over 30% of phase 1 (a flag of the examples, not a knob).
BUDGET_POINTS = [Point(f"bits_per_weight={b}", b, config={"bits_per_weight": b,
                                                          "budget_ramp": 0.3})
                 for b in (0.6, 1.0)]

# Rows re-running a method as it ran before issue 25 (the official behaviours; seed 0 only,
# not on the fronts): each sets back the knobs that issue changed. Issue 18's rows are in
# RESULTS_compare.md's history (commit 4bc4393).
_OLD_PORTIONS = (0.5, 0.75, 0.875, 1.0)
BEFORE = {
    "ttq": [Point("sparsity=0.8, least-squares init, mean scale step (Adam variant)", 0.8,
                  {"sparsity": 0.8, "init_scale": None, "latent_step": "update",
                   "scale_step": "mean"}, before=True)],
    "sttn": [Point("init_factor=0.7, scale term over both sub-kernels", 0.7,
                   {"init_factor": 0.7, "gradient": "exact"}, before=True)],
    "inq": [Point("bits=5, portions 50/75/87.5/100, constant rate per stage", 5,
                  {"bits": 5, "portions": _OLD_PORTIONS, "solver": "constant"}, before=True)],
    "slq": [Point("bits=2, loss order, quantile init, weight portions, constant rate", 2,
                  {"bits": 2, "freeze_order": "loss", "init": "quantile",
                   "portions": _OLD_PORTIONS, "solver": "constant"}, before=True)],
    "mlq": [Point("constant rate per stage", 0.0, {"solver": "constant"}, before=True)],
    "prune": [Point("sparsity=0.7, exact statistics, every step, best kept", 0.7,
                    {"sparsity": 0.7, "statistics_correction": "exact",
                     "grads_on_loss_increase_only": False, "keep_best": True}, before=True)],
}

# Points on the fronts beside the swept knob: the staged methods under the official INQ
# solver (SGD momentum 0.9, L2 5e-4, 0.003 x 0.2 every 15/63 of each stage, restarted).
# TTQ's official defaults are momentum-SGD defaults (its scales are variables of the same
# SGD); this front's inner optimizer is Adam, under which the official sum step moves the
# scales by about |p| times the rate, so TTQ is also run as its Adam variant.
_TTQ_ADAM = {"init_scale": None, "latent_step": "update", "scale_step": "mean"}
EXTRA_POINTS = {
    "inq": [Point("bits=5, official solver", 5, {"bits": 5, "solver": "official"})],
    "slq": [Point("bits=3, official solver", 3, {"bits": 3, "solver": "official"})],
    "ttq": [Point(f"sparsity={r}, Adam variant", r, {"sparsity": r, **_TTQ_ADAM})
            for r in (0.5, 0.8, 0.9)],
}

# --reduced: the subset run when the shared machine cannot give the full sweep its time.
# Listed by priority: the runs go round-robin over the methods in this order.
REDUCED = {"ec2t": ("gamma=0.35", "gamma=0.5", "gamma=0.2", "gamma=0.0"),
           "twn": ("factor=0.7", "factor=1.0"),
           "ttq": ("sparsity=0.8", "sparsity=0.5", "sparsity=0.9"),
           "sttn": ("init_factor=0.7", "init_factor=1.0"),
           "faraone": ("strength=3.0", "strength=10.0", "strength=1.0"),
           "inq": ("bits=2", "bits=5"), "slq": ("bits=2", "bits=3"),
           "mcq": ("samples_per_weight=1.0", "samples_per_weight=0.5",
                   "samples_per_weight=2.0"),
           "prune": ("sparsity=0.7", "sparsity=0.9", "sparsity=0.5")}


def swept_knob(method: str) -> tuple[str, Any] | None:
  """``(name, Knob)`` of the knob this front sweeps: :data:`SWEPT`, else the first knob of
  the method (or of its regulariser) whose ``sweep`` holds two numbers or more."""
  spec = ec2t.get_method(method)
  knobs = {**spec.knobs, **spec.regularizer_knobs}
  if method in SWEPT:
    return None if SWEPT[method] is None else (SWEPT[method], knobs[SWEPT[method]])
  for name, knob in knobs.items():
    numbers = [v for v in knob.sweep if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) >= 2:
      return name, knob
  return None


def _knob_points(method: str) -> list[Point]:
  """One point per value of the swept knob's ``Knob.sweep`` (the defaults without one)."""
  swept = swept_knob(method)
  if swept is None:
    return [Point("defaults", 0.0)]
  name, knob = swept
  return [Point(f"{name}={v}", float(v), {name: v}) for v in knob.sweep if v is not None]


def _quick_point(method: str, points: list[Point]) -> Point:
  """The swept knob's default if it is one of the points, else the first point."""
  swept = swept_knob(method)
  default = [p for p in points if swept and p.options[swept[0]] == swept[1].default]
  return (default or points)[0]


def sweep(method: str, quick: bool = False, before: bool = True,
          reduced: bool = False) -> list[Point]:
  """The points of ``method``: its swept knob's ``Knob.sweep`` (the defaults when it has
  none), the paper's budget points, the 'before' rows; ``quick``: one point."""
  points = _knob_points(method)
  if quick:
    return [_quick_point(method, points)]
  points += ((BUDGET_POINTS if method == methods_lib.PAPER else []) + EXTRA_POINTS.get(method, [])
             + BEFORE.get(method, []))
  if reduced and method in REDUCED:
    by_label = {p.label: p for p in points}
    points = [by_label[label] for label in REDUCED[method]] + [p for p in points if p.before]
  return [p for p in points if before or not p.before]


def schedule(methods: list[str], seeds: list[int], quick: bool = False, before: bool = True,
             reduced: bool = False) -> list[tuple[str, Point, int]]:
  """The runs, seed-major; within a seed round-robin over the methods (each method's first
  point, then the 'before' rows, then each method's second point...), so an interrupted run
  still covers every method."""
  runs = []
  for seed in seeds:
    points = {m: sweep(m, quick, before, reduced) for m in methods}
    main = {m: [p for p in ps if not p.before] for m, ps in points.items()}
    rounds = max((len(ps) for ps in main.values()), default=0)
    for r in range(rounds):
      runs += [(m, main[m][r], seed) for m in methods if r < len(main[m])]
      if r == 0 and seed == seeds[0]:
        runs += [(m, p, seed) for m in methods for p in points[m] if p.before]
  return runs


def registered_methods() -> list[str]:
  """Every method of the library's registry."""
  return list(ec2t.method_registry())


# ------------------------------------------------------------------------- data and model


def load_mnist(data_dir: str | None) -> dict[str, np.ndarray]:
  """MNIST as float32 ``[N, 28, 28, 1]`` images in ``[0, 1]`` and int32 labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for split in ("train", "test"):
    ds = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, data_dir=data_dir,
                                 download=False))
    out[f"{split}_x"] = ds["image"].astype(np.float32) / 255.0
    out[f"{split}_y"] = ds["label"].astype(np.int32)
  return out


def standardise(images):
  return (images - MEAN) / STD


MODEL = ec2t_models.LeNet5()


def apply_fn(params, x):
  return MODEL.apply({"params": params}, x)


def _loss(params, x, y):
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def _predict(params, x):
  return jnp.argmax(apply_fn(params, x), -1)


def accuracy(params, images, labels, batch: int = 2000) -> float:
  """Top-1 accuracy of ``params`` on ``images`` in ``[0, 1]`` (standardised here)."""
  predict = _predict
  hits = 0
  for start in range(0, len(images), batch):
    x = standardise(jnp.asarray(images[start:start + batch]))
    hits += int(jnp.sum(predict(params, x) == jnp.asarray(labels[start:start + batch])))
  return hits / len(images)


def batches(data: dict, steps: int, seed: int):
  """``steps`` batches of 128 training images, shuffled by ``seed`` (epochs repeat)."""
  rng = np.random.default_rng(seed)
  n = len(data["train_x"])
  order = np.concatenate([rng.permutation(n) for _ in range(steps * BATCH // n + 1)])
  for i in range(steps):
    idx = order[i * BATCH:(i + 1) * BATCH]
    yield standardise(jnp.asarray(data["train_x"][idx])), jnp.asarray(data["train_y"][idx])


def make_step(tx, regularizer=None):
  """A jitted ``(params, state, x, y) -> (params, state)`` of ``tx`` on cross-entropy."""

  def loss(params, x, y):
    value = _loss(params, x, y)
    return value + regularizer(params) if regularizer is not None else value

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def train(params, tx, data, steps: int, seed: int, regularizer=None, state=None,
          quantized: bool = True, step=None):
  """``steps`` steps of ``tx`` from ``params`` (and ``state``, else ``tx.init``).

  ``step``: a compiled :func:`make_step` of ``tx`` to reuse (one compilation
  for both phases).
  """
  if state is None:
    state = tx.init(params)
    if quantized:
      params = ec2t.quantized_params(params, state)
  step = step or make_step(tx, regularizer)
  for x, y in batches(data, steps, seed):
    params, state = step(params, state, x, y)
  return params, state


def dense_model(workdir: pathlib.Path, data, steps: int):
  """The dense LeNet-5, trained once and cached (``dense.msgpack``)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  path = workdir / f"dense_{steps}.msgpack"
  template = MODEL.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  if path.exists():
    return serialization.from_bytes(template, path.read_bytes())
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  params, _ = train(template, tx, data, steps, seed=1000, quantized=False)
  path.write_bytes(serialization.to_bytes(params))
  return params


# ------------------------------------------------------------------------------ one run


def _option_text(options: dict) -> str:
  """``{"portions": (0.5, 1.0), "restart": False}`` -> ``portions=0.5/1.0,restart=False``."""
  text = lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else str(v)
  return ",".join(f"{k}={text(v)}" for k, v in options.items())


def _config(method: str, point: Point, phase1_steps: int,
            options: dict) -> types.SimpleNamespace:
  config = dict(method=method, method_options=_option_text(options), learning_rate=1e-3,
                weight_decay=5e-6, ec2t_mode="chain", gamma=0.35, init_scale=0.3, sustain=1.0,
                ec2t_steps=0, latent_learning_rate=1e-3, centroid_learning_rate=1e-4,
                phase2_epochs=1, phase1_steps=phase1_steps)
  config.update(point.config)
  if "budget_ramp" in point.config:  # the example's --budget_ramp: a fraction of phase 1
    config["budget_ramp_steps"] = int(point.config["budget_ramp"] * phase1_steps)
  return types.SimpleNamespace(**config)


def selection_of(params):
  """The paper's rule (all kernels but the first and last) in forward order."""
  order = ec2t.forward_order(apply_fn, params, jnp.zeros((1, 28, 28, 1)))
  return ec2t.Selection(order=order)


def compress(method: str, point: Point, dense, data, seed: int, phase1_steps: int,
             phase2_steps: int, fast: bool = False):
  """The compressed params of one run (see the module docstring), built by the examples'
  generic builder from the library's registry."""
  selection = selection_of(dense)
  options = dict(point.options)
  if fast and "calibration_data" in ec2t.get_method(method).inputs:
    options.update(calibration_images=64, steps_per_level=5)  # the fast schedule
  setup = methods_lib.build(_config(method, point, phase1_steps, options), selection)
  if setup.post_training is not None:
    inputs = methods_lib.PostTrainingInputs(
        params=dense, apply_fn=apply_fn, train_images=data["train_x"], image_shape=(28, 28, 1),
        mean=(MEAN,), std=(STD,), seed=seed, selection=selection)
    return setup.post_training(inputs), selection
  tx, phase2 = setup.optimizer, 1
  if setup.staged is not None:
    layers = sum(plan is not None for plan in selection.plan(dense))
    tx, phase2 = setup.staged(phase1_steps, layers, phase2_steps=phase2_steps)
  step = make_step(tx, setup.regularizer)
  params, state = train(dense, tx, data, phase1_steps, seed, step=step)
  state = ec2t.set_phase(state, phase2)
  if setup.regularizer is not None:  # phase 2 trains without it (Faraone et al.)
    step = make_step(tx)
  params, _ = train(params, tx, data, phase2_steps, seed + 7919, state=state, step=step)
  return params, selection


def measure(params, selection, data, path: pathlib.Path, test_images: int) -> dict:
  """Accuracy, sparsity, value entropy and exported bytes of one compressed model."""
  named = posttrain.selected_leaves(params, selection)
  measures = posttrain.compression_measures(named)
  exported = ec2t.export.save(path, jax.tree.map(np.asarray, params))
  return {"accuracy": accuracy(params, data["test_x"][:test_images],
                               data["test_y"][:test_images]),
          "sparsity": measures["sparsity"], "bits_per_weight": measures["bits_per_weight"],
          "export_bytes": exported.total_bytes,
          "layer_sparsity": {l["path"]: l["sparsity"] for l in measures["layers"]}}


def _run_name(method, point, seed) -> str:
  return f"{method}__{point.label}__s{seed}".replace(" ", "_").replace("/", "_")


def cached(method, point, seed, workdir) -> list[dict]:
  """The cached result of one run, as a list of zero or one."""
  cache = workdir / "runs" / f"{_run_name(method, point, seed)}.json"
  return [json.loads(cache.read_text())] if cache.exists() else []


def run_point(method, point, seed, dense, data, workdir, budget) -> dict:
  """One (method, point, seed): cached as ``runs/<method>__<label>__s<seed>.json``."""
  name = _run_name(method, point, seed)
  cache = workdir / "runs" / f"{name}.json"
  if cache.exists():
    return json.loads(cache.read_text())
  cache.parent.mkdir(parents=True, exist_ok=True)
  started = time.process_time()
  wall = time.perf_counter()
  params, selection = compress(method, point, dense, data, seed, budget["phase1"],
                               budget["phase2"], fast=budget["fast"])
  result = {"method": method, "label": point.label, "x": point.x, "seed": seed,
            "before": point.before,
            **measure(params, selection, data, workdir / "runs" / f"{name}.ec2t",
                      budget["test_images"]),
            "cpu_seconds": time.process_time() - started,
            "wall_seconds": time.perf_counter() - wall}
  cache.write_text(json.dumps(result, indent=1))
  print(f"{method:8s} {point.label:40s} seed {seed}: acc {result['accuracy']:.4f} "
        f"sparsity {result['sparsity']:.3f} bytes {result['export_bytes']:,} "
        f"({result['wall_seconds']:.0f} s)", flush=True)
  return result


# ------------------------------------------------------------------------- summaries


def aggregate(results: list[dict]) -> list[dict]:
  """Mean and std (over seeds) per (method, label), in input order."""
  groups: dict[tuple, list[dict]] = {}
  for r in results:
    groups.setdefault((r["method"], r["label"]), []).append(r)
  rows = []
  for (method, label), rs in groups.items():
    row = {"method": method, "label": label, "x": rs[0]["x"], "before": rs[0]["before"],
           "seeds": len(rs)}
    for key in ("accuracy", "sparsity", "export_bytes", "bits_per_weight", "cpu_seconds"):
      values = np.asarray([r[key] for r in rs], np.float64)
      row[key], row[key + "_std"] = float(values.mean()), float(values.std())
    rows.append(row)
  return rows


def pareto(rows: list[dict], key: str, larger_is_better: bool) -> set[tuple[str, str]]:
  """(method, label) of the rows no other row beats on both accuracy and ``key``."""
  sign = 1.0 if larger_is_better else -1.0
  front = set()
  for r in rows:
    dominated = any(
        o["accuracy"] >= r["accuracy"] and sign * o[key] >= sign * r[key]
        and (o["accuracy"] > r["accuracy"] or sign * o[key] > sign * r[key]) for o in rows)
    if not dominated:
      front.add((r["method"], r["label"]))
  return front


def protocol(budget: dict, dense_steps: int, seeds: list[int], reduced: bool) -> str:
  """The run's protocol, as the first lines of the markdown."""
  return "\n".join([
      f"Protocol: dense LeNet-5 trained {dense_steps} steps (Adam 3e-3 cosine, batch 128); every "
      f"train-time method {budget['phase1']} + {budget['phase2']} steps (phase 1 + phase 2, "
      "batch 128, L2 5e-6 + Adam 1e-3 constant; the staged INQ, SLQ and MLQ restart it at "
      "each stage with the rate cosine-annealed within the stage, or run the official INQ "
      "solver where the knob says so); post-training methods on the dense model; "
      f"test on {budget['test_images']:,} MNIST test images; seeds {seeds}"
      + (" (the REDUCED subset of each sweep)" if reduced else "") + ".", ""])


def markdown(rows: list[dict], dense_accuracy: float, dense_bytes: int) -> str:
  """The table: one row per (method, knob), mean +- std over seeds, front membership."""
  fronts = [r for r in rows if not r["before"]]
  by_sparsity = pareto(fronts, "sparsity", True)
  by_bytes = pareto(fronts, "export_bytes", False)
  lines = [f"Dense LeNet-5: {100 * dense_accuracy:.2f}% test accuracy, "
           f"{dense_bytes:,} exported bytes.", "",
           "| method | knob | seeds | test acc (%) | sparsity (%) | export (bytes) | "
           "bits/weight | front (sparsity / bytes) | CPU s/run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    key = (r["method"], r["label"])
    mark = "before" if r["before"] else " / ".join(
        ("yes" if key in front else "-") for front in (by_sparsity, by_bytes))
    lines.append(
        f"| {r['method']} | {r['label']} | {r['seeds']} | "
        f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} | "
        f"{100 * r['sparsity']:.1f} +- {100 * r['sparsity_std']:.1f} | "
        f"{r['export_bytes']:,.0f} +- {r['export_bytes_std']:,.0f} | "
        f"{r['bits_per_weight']:.2f} | {mark} | {r['cpu_seconds']:.0f} |")
  return "\n".join(lines)


PANELS = (("sparsity", 100.0, True, "sparsity of the compressed layers (%)"),
          ("export_bytes", 1e-3, False, "exported model (kB, ec2t.export)"))


def _series(row: dict) -> str:
  """The legend entry of a row: its method, EC2T's size-budget runs apart from its gammas."""
  budget = row["method"] == "ec2t" and row["label"].startswith(("bits_per_weight", "bytes"))
  return "ec2t (size budget)" if budget else row["method"]


def _draw_methods(ax, rows, key, scale) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colours = plt.get_cmap("tab20").colors
  colours = colours[::2] + colours[1::2]  # the 10 strong colours first, then their light twins
  markers = "os^vDP*Xph<>"
  ec2t_style = {"ec2t": {"color": "black", "linewidth": 1.6},
                "ec2t (size budget)": {"color": "black", "marker": "*", "markersize": 12,
                                       "linestyle": "none"}}
  for i, series in enumerate(dict.fromkeys(_series(r) for r in rows)):
    rs = sorted((r for r in rows if _series(r) == series), key=lambda r: r[key])
    style = {"marker": markers[i % len(markers)], "color": colours[i % len(colours)],
             "linewidth": 1, **ec2t_style.get(series, {})}
    ax.errorbar([scale * r[key] for r in rs], [100 * r["accuracy"] for r in rs],
                xerr=[scale * r[key + "_std"] for r in rs],
                yerr=[100 * r["accuracy_std"] for r in rs], capsize=2, label=series, **style)


def _draw_front(ax, rows, key, scale, larger_is_better) -> None:
  front = pareto(rows, key, larger_is_better)
  points = sorted((r for r in rows if (r["method"], r["label"]) in front), key=lambda r: r[key])
  ax.plot([scale * r[key] for r in points], [100 * r["accuracy"] for r in points], "k--",
          linewidth=0.8, label="Pareto front")


def figure(rows: list[dict], dense_accuracy: float, path: pathlib.Path) -> None:
  """Two panels: accuracy vs sparsity and accuracy vs exported bytes (mean +- std)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  rows = [r for r in rows if not r["before"]]
  low = min(100 * r["accuracy"] for r in rows)
  for ax, (key, scale, larger_is_better, label) in zip(axes, PANELS):
    _draw_methods(ax, rows, key, scale)
    _draw_front(ax, rows, key, scale, larger_is_better)
    ax.axhline(100 * dense_accuracy, color="gray", linestyle=":", label="dense")
    ax.set_ylim(max(low - 0.5, 100 * dense_accuracy - 6), 100 * dense_accuracy + 0.3)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8, loc="lower right")
  fig.suptitle("MNIST LeNet-5, every method at the same budget (mean +- std over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> None:
  del argv
  workdir = pathlib.Path(FLAGS.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  quick = FLAGS.quick
  seeds = [0] if quick else [int(s) for s in FLAGS.seeds]
  budget = {"phase1": 20 if quick else FLAGS.phase1_steps,
            "phase2": 10 if quick else FLAGS.phase2_steps,
            "test_images": 1000 if quick else 10000, "fast": quick}
  dense_steps = 100 if quick else FLAGS.dense_steps
  methods = FLAGS.methods or registered_methods()
  unknown = sorted(set(methods) - set(registered_methods()))
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; registered: {registered_methods()}")
  started, wall = time.process_time(), time.perf_counter()
  data = load_mnist(FLAGS.data_dir)
  dense = dense_model(workdir, data, dense_steps)
  dense_accuracy = accuracy(dense, data["test_x"][:budget["test_images"]],
                            data["test_y"][:budget["test_images"]])
  dense_bytes = ec2t.export.save(workdir / "dense.ec2t",
                                 jax.tree.map(np.asarray, dense)).total_bytes
  print(f"dense: accuracy {dense_accuracy:.4f}, {dense_bytes:,} bytes", flush=True)
  results = []
  for method, point, seed in schedule(methods, seeds, quick, FLAGS.before, FLAGS.reduced):
    if FLAGS.report_only:
      results.extend(cached(method, point, seed, workdir))
      continue
    try:
      results.append(run_point(method, point, seed, dense, data, workdir, budget))
    except Exception as error:  # pylint: disable=broad-except
      print(f"{method} {point.label} seed {seed} FAILED: {error!r}", flush=True)
  rows = aggregate(results)
  table = protocol(budget, dense_steps, seeds, FLAGS.reduced) + markdown(
      rows, dense_accuracy, dense_bytes)
  cpu, elapsed = time.process_time() - started, time.perf_counter() - wall
  footer = (f"\n\nThis invocation: {cpu:.0f} s process CPU, {elapsed:.0f} s wall "
            f"(runs read back from the cache cost nothing). Per-run CPU in the last column.")
  (workdir / "compare.md").write_text(table + footer + "\n")
  (workdir / "compare.json").write_text(json.dumps(
      {"dense_accuracy": dense_accuracy, "dense_bytes": dense_bytes, "budget": budget,
       "dense_steps": dense_steps, "rows": rows, "runs": results}, indent=1))
  figure(rows, dense_accuracy, workdir / "compare.png")
  if FLAGS.results_md:
    pathlib.Path(FLAGS.results_md).write_text(table + footer + "\n")
  if FLAGS.png:
    figure(rows, dense_accuracy, pathlib.Path(FLAGS.png))
  print(table + footer)


if __name__ == "__main__":
  app.run(main)
