"""Stage 2, the hardware: detection (`detect`), GPU presets (`presets`), the VRAM estimate
(`vram`) and the environment check (`doctor`). Its calibration on a real GPU is a tool,
`studio.tools.calibrate` (`calibrate/` keeps the command `python -m studio.hardware.calibrate`)."""
