"""``python -m ec2t_jax.compress``: see :mod:`ec2t_jax._src.cli.compress_cli`."""

from ec2t_jax._src.cli.compress_cli import main

raise SystemExit(main())
