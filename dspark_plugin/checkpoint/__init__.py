"""Files on disk: DeepSpec drafter checkpoints, vLLM's native dflash layout, calibration temperatures."""
