"""``python -m ec2t_jax.export``: see :mod:`ec2t_jax._src.cli.export_cli`."""

from ec2t_jax._src.cli.export_cli import main

raise SystemExit(main())
