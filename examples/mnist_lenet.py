r"""EC2T on MNIST with LeNet-5 or LeNet-300-100: pretrain, ternarize, evaluate, report.

The README's main job. ``--method={ec2t,twn,ttq,sttn,faraone,inq,slq,mlq,mcq,prune}``
picks the quantization method (``examples/common/methods.py``; ``mcq`` and ``prune``
run post-training, without the two training phases). With the default flags it
pretrains LeNet-5 in full precision (10 epochs, Adam 3e-3 cosine, random shifts
of up to 2 pixels), runs EC2T phase 1 (assignment trained, 10 epochs) and
phase 2 (assignment frozen, 5 epochs) in the chain form (Adam 1e-3 with a
cosine over both phases, then ``ec2t.ternarize_transform(gamma=0.35,
sustain=1.0)``), evaluates both models on the MNIST test set and prints the
per-layer EC2T summary and a one-screen report (accuracy, sparsity,
bits/weight, size vs float32). Measured: 99.24% -> 99.19% at 90.8% sparsity;
``--ec2t_mode=reference`` runs the paper's three Adams instead (see
benchmarks/RESULTS_mnist.md).

Data come from ``tfds.load("mnist")``: downloaded on a machine with internet,
or read offline from a prepared tfds folder::

  TFDS_DATA_DIR=../shared/data/tfds python examples/mnist_lenet.py
  python examples/mnist_lenet.py --model=lenet300100 --gamma=0.3 --workdir=runs/l300
  python examples/mnist_lenet.py --resume          # continue an interrupted run
  python examples/mnist_lenet.py --method=ttq --method_options=sparsity=0.6 --workdir=runs/ttq
  python examples/mnist_lenet.py --method=twn --init_from=runs/mnist_lenet5/checkpoints/fp
  python examples/mnist_lenet.py --method=mcq --method_options=samples_per_weight=2 --init_from=runs/mnist_lenet5/checkpoints/fp
  python examples/plot_curves.py --workdir=runs/mnist_lenet5   # training curves to PNG

The training split is ``train[:55000]``; ``train[55000:]`` picks the best epoch
and ``test`` is only used for the final report.
"""

from __future__ import annotations

from absl import app
from absl import flags

from common import flags as flags_lib
from common.script import script_main

MODELS = ("lenet5", "lenet300100")
DEFAULTS = {
    "workdir": "runs/mnist_lenet5",
    "dataset_default": "mnist",
    "datasets": ("mnist",),
    "train_split": "train[:55000]",
    "val_split": "train[55000:]",
    "test_split": "test",
    "batch_size": 128,
    "augment": True,  # random shifts of up to 2 pixels
    "fp_epochs": 10,
    "fp_learning_rate": 3e-3,
    "ec2t_mode": "chain",
    "learning_rate": 1e-3,
    "phase1_epochs": 10,
    "phase2_epochs": 5,
    "gamma": 0.35,
    "sustain": 1.0,
    "init_scale": 0.3,
}


def define_flags(fv: flags.FlagValues) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_enum("model", "lenet5", list(MODELS), "Network.", flag_values=fv)
  flags_lib.define_common_flags(fv, **DEFAULTS)


def run(fv: flags.FlagValues) -> dict:
  """Runs the job described by parsed flags ``fv``; returns the results dict."""
  import optax  # pylint: disable=g-import-not-at-top
  from common import pipeline  # pylint: disable=g-import-not-at-top  (after distributed init)
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top

  def fp_optimizer(total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(fv.fp_learning_rate, total_steps))

  config = pipeline.PipelineConfig(
      model_name=fv.model, model=models.get_model(fv.model, num_classes=10),
      fp_optimizer=fp_optimizer, **flags_lib.pipeline_kwargs(fv))
  return pipeline.run(config)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(script_main(run))
