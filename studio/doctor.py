"""`python -m studio.doctor [--selftest]`: checks this machine for training.

The checks are `studio.hardware.doctor`; the self-test is the tool `studio.tools.selftest`.
"""

from studio import compat
from studio.hardware.doctor import main
from studio.tools.selftest import main as selftest

if __name__ == "__main__":
    compat.console_safe()  # a cp1252 console must not crash on a Vietnamese name
    raise SystemExit(main(selftest=selftest))
