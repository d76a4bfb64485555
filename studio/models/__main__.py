"""`python -m studio.models`: see `studio.models.loader`."""

from studio.models.loader import main

raise SystemExit(main())
