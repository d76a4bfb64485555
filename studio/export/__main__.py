"""`python -m studio.export RUN_DIR`: see `studio.export.cli`."""

from studio import compat
from studio.export.cli import main

compat.console_safe()  # a cp1252 console must not crash on a Vietnamese run name
raise SystemExit(main())
