"""`python -m studio.train`: see `studio.train.run`."""

from studio.train.run import main

raise SystemExit(main())
