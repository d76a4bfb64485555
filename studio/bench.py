"""`python -m studio.bench <command>`: the benchmarks, kept under their old command name.

The code is in `studio.tools` (`studio.tools.bench` lists the commands).
"""

from studio.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
