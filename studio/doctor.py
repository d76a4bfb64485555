"""`python -m studio.doctor`: checks this machine for training (see `studio.hardware.doctor`)."""

from studio import compat
from studio.hardware.doctor import main

if __name__ == "__main__":
    compat.console_safe()  # a cp1252 console must not crash on a Vietnamese name
    raise SystemExit(main())
