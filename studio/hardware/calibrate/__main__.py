"""`python -m studio.hardware.calibrate [...]`: see `studio.tools.calibrate`."""

from studio.tools.calibrate import main

raise SystemExit(main())
