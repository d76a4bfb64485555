"""`python -m studio.models`: see `studio.models.cli`."""

from studio.models.cli import main

raise SystemExit(main())
