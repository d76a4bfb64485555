"""`python -m studio.models`: see `studio.models.loader`."""

from studio import compat
from studio.models.loader import main

compat.console_safe()  # a cp1252 console must not crash on a Vietnamese run name
raise SystemExit(main())
