"""Shared machinery of the EC2T examples (kept next to the scripts: read it, copy it, change it).

Modules, one job each:

* ``cli``        -- ``UserError`` and the wrapper that prints it as one line, no traceback;
* ``script``     -- ``script_main``: the absl ``main`` of both scripts (flags, ``jax.distributed``);
* ``flags``      -- the absl flags both scripts share;
* ``data``       -- tfds splits cut into shards, one block of shards per process,
  deterministic random-access batches (exact resume, topology-independent order);
* ``augment``    -- on-device normalisation and flip + pad-4 crop;
* ``parallel``   -- ``jax.distributed`` start-up, the ``(data, fsdp)`` mesh, shardings,
  global batches from per-process parts;
* ``checkpoint`` -- orbax checkpoints (latest + best) of the whole train state;
* ``metrics``    -- JSON lines + TensorBoard (tensorboardX);
* ``kill_points`` -- a test hook: kill the process at a named write (``--resume`` tests);
* ``training``   -- train state, sharded train/eval steps, the epoch loop of a phase;
* ``progress``   -- a tqdm bar on a terminal only; in logs nothing or a line per 10%;
* ``language``   -- tiny Shakespeare, step-keyed batches, the step loop of the GPT example;
* ``pipeline``   -- the whole job: FP -> EC2T phase 1 -> phase 2 -> report;
* ``report``     -- sizes and the one-screen final report;
* ``methods``    -- the ``--method`` registry;
* ``posttrain``  -- calibration images, MCQ / pruning calls, compression measures, grid checks.

The scripts import it as ``common`` (the script's folder is on ``sys.path`` when
you run ``python examples/mnist_lenet.py``).
"""
