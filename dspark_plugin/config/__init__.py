"""The drafter's configuration: DeepSpec / speculators / vLLM-native dflash `config.json` forms, dtype names."""
