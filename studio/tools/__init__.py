"""Benchmarks and measurements: the layer above the engine's stages, below the UI.

Nothing in the stages imports these; they drive the stages as a user would and print what
they measured.
- `bench`: `python -m studio.bench data|train|uipath|app|chat|firstrun`, one module each
  (`data`, `train`, `uipath`, `app`, `chat`, `firstrun`), sharing `common` (peak memory, CPU
  time, load average, the machine in words, the results file).
- `calibrate`: the VRAM estimate against real steps on a GPU (`python -m
  studio.hardware.calibrate`).
- `selftest`: train, chat, merge and export a small random model on this machine's device
  (`python -m studio.doctor --selftest`).
"""
