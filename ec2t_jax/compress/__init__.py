"""Post-training compression of a checkpoint from the command line.

::

    python -m ec2t_jax.compress mcq CHECKPOINT OUT.ec2t [--samples-per-weight 1.0] [--seed 0]
    python -m ec2t_jax.compress prune CHECKPOINT OUT.ec2t --model lenet5 --sparsity 0.5 \\
        [--calibration fractals|inputs.npy] [--input-shape 28,28,1] [--normalize 0.1307,0.3081]

``CHECKPOINT`` is anything :func:`ec2t_jax.export.load_tree` reads (orbax
checkpoint directory, ``.npz``, packed file); ``OUT`` is written with
:func:`ec2t_jax.export.save` (the method and its settings go into the file's
metadata), so ``python -m ec2t_jax.report OUT`` reads it. Bad input is one
line on stderr and exit status 2. See :mod:`ec2t_jax._src.cli.compress_cli`.
"""

from ec2t_jax._src.cli.compress_cli import main

__all__ = ["main"]
