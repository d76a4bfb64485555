"""`python -m studio.doctor`: checks this machine for training (see `studio.hardware.doctor`)."""

from studio.hardware.doctor import main

if __name__ == "__main__":
    raise SystemExit(main())
