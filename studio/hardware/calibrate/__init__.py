"""`python -m studio.hardware.calibrate`: the command's old name, kept working.

The calibration itself is a measurement tool, `studio.tools.calibrate`; this package holds
only the `__main__` that runs it (a package rather than a module, so that the code's move
stays a plain rename in git).
"""
