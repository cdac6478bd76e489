"""``python -m ec2t_jax.compress METHOD CHECKPOINT OUT``: post-training methods without code.

Methods:

* ``mcq``: Monte Carlo Quantization (:func:`ec2t_jax.mcq`) of the selected
  kernels; needs only the weights.
* ``prune``: post-training pruning with layer-wise calibration
  (:func:`ec2t_jax.prune_calibrated`); needs the model (``--model``, one of
  :data:`ec2t_jax.models.MODEL_NAMES`) to run forward passes, and calibration
  inputs: ``fractals`` (data-free, :func:`ec2t_jax.fractal_images` of
  ``--input-shape``, normalised by ``--normalize MEAN,STD``) or an ``.npy`` /
  ``.npz`` file of already normalised inputs.

Leaves are chosen as in training (the paper's rule: all kernels but the first
and the last), or by ``--rule REGEX`` (repeatable; only the matching leaves).

The methods are the registry's one-shot ones (``ec2t.method_registry("one_shot")``);
each runs as ``spec.build(**knobs, **inputs).instant(params)``. Knobs without
a flag of their own are set with ``--knob NAME=VALUE`` (typed like the
knob's default).

Refused, in one line on stderr with exit status 2 (as is any other failure):
an output path that is an input (the checkpoint, the calibration file), a
checkpoint leaf or calibration input holding NaN or infinity (named), a
``--normalize`` that is not two finite numbers with a non-zero STD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ec2t_jax._src.cli import cli_support
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.export import sources
from ec2t_jax._src.export.container import DEFAULT_MAX_BYTES
from ec2t_jax._src.methods._support import registry
from ec2t_jax._src.report import leaf_statistics

PROGRAM = "ec2t_jax.compress"
METHODS = tuple(registry.method_registry("one_shot"))
# The flags of the built-in methods' knobs: knob name -> attribute of ``args``.
_KNOB_FLAGS = {
    "mcq": {"samples_per_weight": "samples_per_weight", "per_neuron": "per_neuron"},
    "prune": {"sparsity": "sparsity", "steps_per_level": "steps_per_level",
              "weight_learning_rate": "weight_lr", "bias_learning_rate": "bias_lr"},
}


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
  parser = cli_support.OneLineParser(
      prog=f"python -m {PROGRAM}",
      description="Compress a trained checkpoint with a post-training method (no training) "
                  "and write the packed .ec2t file.")
  parser.add_argument("method", choices=METHODS,
                      help="a one-shot method: " + ", ".join(METHODS))
  parser.add_argument("checkpoint", help="orbax checkpoint directory, .npz or packed file")
  parser.add_argument("output", help="packed .ec2t file to write")
  parser.add_argument("--keys", default="params",
                      help="checkpoint entries to read (default params; e.g. params,batch_stats)")
  parser.add_argument("--rule", action="append", default=[], metavar="REGEX",
                      help="compress only leaves whose path matches (repeatable); default: the "
                           "paper's rule (all kernels but the first and the last)")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                      help="a knob of the method without a flag of its own (repeatable)")
  mcq = parser.add_argument_group("mcq")
  mcq.add_argument("--samples-per-weight", type=float, default=1.0,
                   help="MCQ samples per weight K (default 1.0)")
  mcq.add_argument("--per-neuron", action="store_true", help="MCQ: sample each output neuron")
  prune = parser.add_argument_group("prune")
  parser.add_argument("--model", help="model name (ec2t_jax.models.get_model); needed by prune, "
                      "and lets mcq find the first and last layer in forward order")
  parser.add_argument("--num-classes", type=int, default=10)
  prune.add_argument("--sparsity", type=float, default=0.5, help="target sparsity in [0, 1)")
  prune.add_argument("--calibration", default="fractals",
                     help="'fractals' (data-free) or an .npy/.npz file of normalised inputs")
  prune.add_argument("--num-calibration", type=int, default=300,
                     help="calibration inputs (default 300)")
  parser.add_argument("--input-shape", type=_ints, default=(28, 28, 1),
                      help="H,W,C of one input (default 28,28,1)")
  prune.add_argument("--normalize", type=_floats, default=(0.0, 1.0), metavar="MEAN,STD",
                     help="fractal pixels in [0,1] become (x - MEAN) / STD (default 0,1)")
  prune.add_argument("--steps-per-level", type=int, default=None,
                     help="Adam steps per layer and sparsity level over the calibration "
                          "batches in turn (a fast schedule); default: OpenVINO POT's, 30 "
                          "tuning iterations x 40 steps on batches of 50 inputs")
  prune.add_argument("--weight-lr", type=float, default=1e-5)
  prune.add_argument("--bias-lr", type=float, default=1e-4)
  parser.add_argument("--max-bytes", type=cli_support.byte_size, default=DEFAULT_MAX_BYTES,
                      help="largest input accepted (default 4G)")
  parser.add_argument("--quiet", action="store_true", help="print nothing on success")
  return parser


def _selection(rules: Sequence[str]):
  if not rules:
    return None
  return selection_lib.Selection(tuple(selection_lib.Rule(r) for r in rules), default="none")


def _calibration_inputs(args, jax):
  if args.num_calibration < 1:
    raise ValueError(f"--num-calibration must be positive, got {args.num_calibration}")
  if args.calibration == "fractals":
    from ec2t_jax._src.methods._support.fractals import fractal_images  # pylint: disable=g-import-not-at-top
    images = fractal_images(args.num_calibration, args.input_shape,
                            jax.random.key(args.seed))
    return (images - args.normalize[0]) / args.normalize[1]
  path = Path(args.calibration)
  if not path.exists():
    raise ValueError(f"--calibration: {path}: no such file (use 'fractals' or an .npy/.npz)")
  loaded = np.load(path, allow_pickle=False)
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      if len(loaded.files) != 1:
        raise ValueError(f"--calibration: {path} holds {len(loaded.files)} arrays; expected one")
      loaded = loaded[loaded.files[0]]
  return np.asarray(loaded)[:args.num_calibration]


def _typed(text: str, default):
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"not a boolean: {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(default, (int, float)):
    return type(default)(text)
  return text


def _knobs(args, spec: registry.MethodSpec) -> dict:
  """The method's knobs from its flags and ``--knob NAME=VALUE``."""
  knobs = {name: getattr(args, attr) for name, attr in _KNOB_FLAGS.get(spec.name, {}).items()}
  for item in args.knob:
    name, sep, text = item.partition("=")
    if not sep or name not in spec.knobs:
      raise ValueError(f"--knob {item!r}: not NAME=VALUE with a knob of {spec.name} "
                       f"({', '.join(sorted(spec.knobs))})")
    try:
      knobs[name] = _typed(text, spec.knobs[name].default)
    except ValueError:
      raise ValueError(f"--knob {item!r}: {text!r} is not a "
                       f"{type(spec.knobs[name].default).__name__}") from None
  return knobs


def _method_inputs(args, spec: registry.MethodSpec, apply_fn, meta: dict, jax) -> dict:
  """What the one-shot method needs beyond its knobs (``spec.inputs``)."""
  inputs = {}
  if "key" in spec.inputs:
    inputs["key"] = jax.random.key(args.seed)
  if "apply_fn" in spec.inputs:
    inputs["apply_fn"] = apply_fn
  if "calibration_data" in spec.inputs:
    inputs["calibration_data"] = _calibration_inputs(args, jax)
    meta.update(calibration=args.calibration,
                num_calibration=int(len(inputs["calibration_data"])))
  return inputs


def _check_normalize(normalize) -> None:
  if len(normalize) != 2 or not all(np.isfinite(normalize)) or normalize[1] == 0:
    raise ValueError(f"--normalize must be MEAN,STD (finite numbers, STD != 0), "
                     f"got {','.join(map(str, normalize))}")


def _check_finite(what: str, array) -> None:
  """Raises ``ValueError`` naming ``what`` if ``array`` is not numeric or holds NaN / inf."""
  array = np.asarray(array)
  if array.dtype.kind not in "biufc" and array.dtype.name != "bfloat16":
    raise ValueError(f"{what} holds {array.dtype} values, not numbers")
  bad = leaf_statistics.count_nonfinite(array)
  if bad:
    raise ValueError(f"{what} holds {bad:,} non-finite values (NaN or inf) of {array.size:,}; "
                     "refusing to compress")


def _check_finite_tree(tree) -> None:
  for name, array in sources.flat_arrays(tree).items():
    _check_finite(f"checkpoint leaf {name!r}", array)


def _check_arguments(args) -> None:
  """The cheap checks, before anything is read: paths, method options."""
  cli_support.refuse_overwriting(
      [args.output],
      [args.checkpoint, None if args.calibration == "fractals" else args.calibration])
  if args.method == "prune":
    _check_normalize(args.normalize)


def _sparsity(tree) -> float:
  leaves = [np.asarray(x) for x in sources.flat_arrays(tree).values()]
  return float(sum((x == 0).sum() for x in leaves) / max(sum(x.size for x in leaves), 1))


def _check_before_reading(args, spec: registry.MethodSpec) -> None:
  """The cheap checks, before the checkpoint is read."""
  from ec2t_jax._src.methods import mcq  # pylint: disable=g-import-not-at-top
  from ec2t_jax._src.methods.calibrated_pruning import pruning as calibrated_pruning  # pylint: disable=g-import-not-at-top
  if "apply_fn" in spec.inputs and not args.model:
    raise ValueError(f"{spec.name} needs --model (the network to run forward passes of), "
                     "e.g. --model lenet5")
  if args.method == "prune":
    calibrated_pruning.check_sparsity(args.sparsity, "--sparsity")
  elif args.method == "mcq":
    mcq.check_samples(args.samples_per_weight)
  _check_arguments(args)


def _model_apply_fn(args, tree, keys, meta):
  """``apply_fn(params, x)`` of ``--model`` (None without), the other collections bound."""
  if not args.model:
    return None
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model(args.model, args.num_classes)
  extra = {k: v for k, v in tree.items() if k != "params"} if len(keys) > 1 else {}
  meta["model"] = args.model
  return lambda p, x: model.apply({"params": p, **extra}, x)


def _knob_meta(spec: registry.MethodSpec, knobs: dict) -> dict:
  """The knobs the output's metadata records."""
  skipped = ("steps_per_level", "weight_learning_rate", "bias_learning_rate")
  return {name: knobs[name] for name in _KNOB_FLAGS.get(spec.name, spec.knobs)
          if name in knobs and name not in skipped}


def compress(args) -> dict:
  """Runs one method on the checkpoint and writes ``args.output``; returns the metadata."""
  import jax  # pylint: disable=g-import-not-at-top
  from ec2t_jax._src.export import exporting  # pylint: disable=g-import-not-at-top
  from ec2t_jax._src.methods._support import common  # pylint: disable=g-import-not-at-top
  spec = registry.get_method(args.method)
  _check_before_reading(args, spec)
  knobs = spec.options(**_knobs(args, spec))
  keys = tuple(k for k in args.keys.split(",") if k)
  loaded = sources.load_tree(args.checkpoint, keys=keys, max_bytes=args.max_bytes)
  tree = loaded.tree
  _check_finite_tree(tree)
  params = tree["params"] if len(keys) > 1 else tree
  selection = _selection(args.rule)
  meta = {"method": args.method, "source": str(loaded.path), "seed": args.seed}
  apply_fn = _model_apply_fn(args, tree, keys, meta)
  inputs = _method_inputs(args, spec, apply_fn, meta, jax)
  if "calibration_data" in inputs:
    _check_finite(f"calibration inputs ({args.calibration})", inputs["calibration_data"])
  if "calibration_data" not in spec.inputs and apply_fn is not None:  # the paper's first/last rule in the model's forward order
    example = np.zeros((1, *args.input_shape), np.float32)
    selection = common.with_forward_order(selection, apply_fn, params, example)
  params = spec.build(selection=selection, **knobs, **inputs).instant(params)
  meta.update(_knob_meta(spec, knobs))
  params = jax.tree.map(np.asarray, params)
  out_tree = {**tree, "params": params} if len(keys) > 1 else params
  info = exporting.save(args.output, out_tree, metadata=meta)
  meta.update(bytes=info.total_bytes, zeros=_sparsity(params))
  return meta


def _run(args) -> int:
  meta = compress(args)
  if not args.quiet:
    cli_support.echo(
        f"{args.output}: {meta['bytes']:,} bytes, {args.method}, "
        f"{meta['zeros']:.1%} of all weights zero; settings: "
        + json.dumps({k: v for k, v in meta.items() if k not in ("bytes", "zeros")}))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input or any failure)."""
  return cli_support.run(PROGRAM, _parser(), argv, _run)
