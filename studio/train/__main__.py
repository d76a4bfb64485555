"""`python -m studio.train RUN.yaml [--resume RUN_DIR]`: see `studio.train.cli`."""

from studio import compat
from studio.train.cli import main

compat.console_safe()  # a cp1252 console must not crash on a Vietnamese run name
raise SystemExit(main())
