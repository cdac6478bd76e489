"""Command-line flags shared by the examples (absl), defined on a chosen ``FlagValues``.

Defining them through :func:`define_common_flags` (instead of at import time)
lets tests parse flags into a private ``flags.FlagValues()`` for each script.

Example:
  >>> from absl import flags
  >>> from common.flags import define_common_flags
  >>> fv = flags.FlagValues()
  >>> define_common_flags(fv, workdir="runs/demo", dataset_default="mnist",
  ...                     datasets=("mnist",))
  >>> fv(["prog", "--gamma=0.3"]) and fv.gamma
  0.3
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import flags


def define_common_flags(fv: flags.FlagValues, *, workdir: str, dataset_default: str,
                        datasets: Sequence[str], **defaults: Any) -> None:
  """Defines the flags every example has; ``defaults`` override their default values.

  Args:
    fv: Where to define them (``flags.FLAGS`` in a script).
    workdir: Default output folder.
    dataset_default: Default ``--dataset``.
    datasets: Allowed ``--dataset`` values.
    **defaults: Other default values by flag name (e.g. ``fp_epochs=10``).
  """
  d = {"train_split": "train", "val_split": "test", "test_split": "test", "batch_size": 128,
       "eval_batch_size": 1000, "fp_epochs": 10, "fp_learning_rate": 1e-3, "phase1_epochs": 20,
       "phase2_epochs": 15, "gamma": 0.2, "init_scale": 0.3, "augment": False,
       "ec2t_mode": "reference", "learning_rate": 1e-4, "sustain": 0.05, **defaults}

  # Run and data.
  flags.DEFINE_string("workdir", workdir, "Output folder: checkpoints/, metrics.jsonl, "
                      "tensorboard/, report.json.", flag_values=fv)
  flags.DEFINE_enum("dataset", dataset_default, list(datasets), "tfds dataset.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data folder; default $TFDS_DATA_DIR, else tfds' "
                      "default (~/tensorflow_datasets). Offline here: ../shared/data/tfds.",
                      flag_values=fv)
  flags.DEFINE_bool("download", True, "Let tfds download a dataset that is not prepared.",
                    flag_values=fv)
  flags.DEFINE_integer("mock_data", 0, "If > 0, use tfds.testing.mock_data with this many random "
                       "examples per shard instead of real data (smoke tests, CI).", flag_values=fv)
  flags.DEFINE_string("train_split", d["train_split"], "tfds split to train on.", flag_values=fv)
  flags.DEFINE_string("val_split", d["val_split"], "Split that picks the best epoch.",
                      flag_values=fv)
  flags.DEFINE_string("test_split", d["test_split"], "Split of the final report.", flag_values=fv)
  flags.DEFINE_integer("batch_size", d["batch_size"], "Global training batch size.",
                       flag_values=fv)
  flags.DEFINE_integer("eval_batch_size", d["eval_batch_size"], "Global evaluation batch size.",
                       flag_values=fv)
  flags.DEFINE_bool("augment", d["augment"], "Random shifts (pad + crop: 4 pixels for CIFAR, "
                    "2 for MNIST) and, for CIFAR, horizontal flips.", flag_values=fv)
  flags.DEFINE_integer("steps_per_epoch", 0, "Cap on steps per epoch (0: the whole split).",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and augmentation.",
                       flag_values=fv)
  flags.DEFINE_integer("data_shards", 0, "Cut each split into this many parts (0: one per "
                       "process); each process reads only its parts. Keep it fixed to get "
                       "identical batches on any number of hosts.", flag_values=fv)
  define_parallel_flags(fv)
  # Full precision.
  flags.DEFINE_integer("fp_epochs", d["fp_epochs"], "Full-precision pretraining epochs (ignored "
                       "with --init_from).", flag_values=fv)
  flags.DEFINE_float("fp_learning_rate", d["fp_learning_rate"], "Peak learning rate of "
                     "pretraining.", flag_values=fv)
  flags.DEFINE_string("init_from", None, "Pretrained full-precision weights instead of "
                      "pretraining: a PyTorch state dict (.npz, or .pt/.pth with torch "
                      "installed) or a checkpoint folder of these examples.", flag_values=fv)
  # EC2T.
  flags.DEFINE_enum("ec2t_mode", d["ec2t_mode"], ["reference", "chain"], "reference: "
                    "ec2t.reference_optimizer (the paper's three Adams); chain: "
                    "optax.chain(adam with a cosine decay of --learning_rate over both EC2T "
                    "phases, ec2t.ternarize_transform).", flag_values=fv)
  flags.DEFINE_string("method", "ec2t", "Quantization method: ec2t, twn, ttq, sttn, bitnet, faraone; "
                      "staged inq, slq, mlq; post-training mcq, prune "
                      "(examples/common/methods.py).", flag_values=fv)
  flags.DEFINE_string("method_options", "", "The method's own knobs as key=value,key=value "
                      "(the library's knob names, e.g. threshold=filter for twn, sparsity=0.6 for ttq, bits=5,portions=0.5/1 "
                      "for inq, samples_per_weight=2 for mcq, sparsity=0.8,calibration=fractal for prune).",
                      flag_values=fv)
  flags.DEFINE_float("gamma", d["gamma"], "EC2T sparsity knob in [0, 1] (0: nearest centroid; "
                     "not used with a size budget below).",
                     flag_values=fv)
  define_budget_flags(fv)
  flags.DEFINE_float("init_scale", d["init_scale"], "Initial centroid scaler s "
                     "(w_p = s |max W|).", flag_values=fv)
  flags.DEFINE_float("learning_rate", d["learning_rate"], "Adam learning rate: of the "
                     "non-ternary params (reference mode), of everything (chain).",
                     flag_values=fv)
  flags.DEFINE_float("sustain", d["sustain"], "Sustain s of EC2T's layer-size decay of lambda, "
                     "(n_l / n_max + s) / (1 + s): 0.05 (paper) keeps small layers dense, "
                     "larger values sparsify them more.", flag_values=fv)
  flags.DEFINE_float("weight_decay", 5e-6, "L2 weight decay of the non-ternary params.",
                     flag_values=fv)
  flags.DEFINE_float("latent_learning_rate", 1e-4, "Adam learning rate of the latent weights.",
                     flag_values=fv)
  flags.DEFINE_float("centroid_learning_rate", 1e-5, "Adam learning rate of the centroids.",
                     flag_values=fv)
  flags.DEFINE_integer("phase1_epochs", d["phase1_epochs"], "Phase 1 epochs of the method "
                       "(0: pretrain only).", flag_values=fv)
  flags.DEFINE_integer("phase2_epochs", d["phase2_epochs"], "Phase 2 epochs (EC2T: assignment "
                       "frozen; faraone: pruned ternary retraining).", flag_values=fv)
  # Run control.
  flags.DEFINE_bool("resume", False, "Continue from the checkpoints in --workdir.",
                    flag_values=fv)
  flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps inside "
                       "epochs (0: at the end of each epoch).", flag_values=fv)
  flags.DEFINE_integer("stop_after_steps", 0, "Stop after N steps of this invocation, with a "
                       "checkpoint (0: run to the end); continue with --resume.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bars.", flag_values=fv)


def define_budget_flags(fv: flags.FlagValues) -> None:
  """EC2T's size budget (``ec2t.Budget``, chain form): ``--bits_per_weight``,
  ``--target_bytes``, ``--target_sparsity`` (at most one non-zero) and ``--budget_ramp``;
  :func:`common.methods.size_budget` reads them."""
  flags.DEFINE_float("bits_per_weight", 0.0, "EC2T chain form: train to this rate of the "
                     "ternarized layers (entropy, bits/weight, <= log2 3) instead of --gamma "
                     "(ec2t.Budget; 0: no budget).", flag_values=fv)
  flags.DEFINE_float("target_bytes", 0.0, "EC2T chain form: train to this size of the exported "
                     "file (ec2t.export, whole params tree) instead of --gamma (0: no budget).",
                     flag_values=fv)
  flags.DEFINE_float("target_sparsity", 0.0, "EC2T chain form: train to this sparsity of the "
                     "ternarized layers instead of --gamma (0: no budget).", flag_values=fv)
  flags.DEFINE_float("budget_ramp", 0.3, "With a budget: the target ramps in over this fraction "
                     "of phase 1's steps; phase 1 keeps its last epoch (not its best).",
                     flag_values=fv)


def define_parallel_flags(fv: flags.FlagValues) -> None:
  """Devices and hosts: ``--fsdp``, ``--num_devices`` and the ``jax.distributed`` flags
  (:func:`common.script.script_main` reads the latter)."""
  flags.DEFINE_integer("fsdp", 1, "Size of the mesh axis that shards params and optimizer "
                       "state (1: pure data parallelism).", flag_values=fv)
  flags.DEFINE_integer("num_devices", 0, "Use only the first N devices (0: all).",
                       flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize: "
                    "auto = when a coordinator is given or a multi-host environment (TPU pod, "
                    "SLURM, MPI) is detected.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual launch).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (manual launch).",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (manual launch).",
                       flag_values=fv)


def pipeline_kwargs(fv: flags.FlagValues) -> dict[str, Any]:
  """The :class:`common.pipeline.PipelineConfig` fields that come straight from flags."""
  names = ("workdir", "dataset", "data_dir", "download", "train_split", "val_split",
           "test_split", "batch_size", "eval_batch_size", "data_shards", "steps_per_epoch",
           "augment", "seed", "fsdp", "num_devices", "fp_epochs", "init_from", "ec2t_mode",
           "method", "method_options",
           "gamma", "bits_per_weight", "target_bytes", "target_sparsity", "budget_ramp",
           "init_scale", "sustain", "learning_rate", "weight_decay",
           "latent_learning_rate",
           "centroid_learning_rate", "phase1_epochs", "phase2_epochs", "resume",
           "checkpoint_every_steps", "stop_after_steps", "progress")
  kwargs = {name: fv[name].value for name in names}
  kwargs["mock_examples"] = fv.mock_data
  return kwargs
