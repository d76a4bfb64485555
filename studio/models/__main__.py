"""`python -m studio.models`: see `studio.models.cli`."""

from studio import compat
from studio.models.cli import main

compat.console_safe()  # a cp1252 console must not crash on a Vietnamese run name
raise SystemExit(main())
