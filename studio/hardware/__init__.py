"""Stage 2, the hardware: detection (`detect`), GPU presets (`presets`), the VRAM estimate
(`vram`), its calibration on a real GPU (`calibrate`) and the environment check (`doctor`)."""
