"""`python -m studio.train RUN.yaml [--resume RUN_DIR]`: see `studio.train.cli`."""

from studio.train.cli import main

raise SystemExit(main())
