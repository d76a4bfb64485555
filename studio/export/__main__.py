"""`python -m studio.export RUN_DIR`: see `studio.export.cli`."""

from studio.export.cli import main

raise SystemExit(main())
