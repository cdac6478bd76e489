"""``python -m ec2t_jax.report``: see :mod:`ec2t_jax._src.cli.report_cli`."""

from ec2t_jax._src.cli.report_cli import main

raise SystemExit(main())
