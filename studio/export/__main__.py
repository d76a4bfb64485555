"""`python -m studio.export`: see `studio.export.run`."""

from studio.export.run import main

raise SystemExit(main())
