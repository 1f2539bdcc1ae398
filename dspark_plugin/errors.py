"""One exception family, so the CLI and the engine adapters can show bad input as one clear line."""
from __future__ import annotations


class DSparkError(ValueError):
    """Base class: a user-facing problem (bad file, bad key, bad request)."""


class DSparkConfigError(DSparkError):
    """A drafter config.json is missing a key, has a bad value, or does not match the target."""

    def __init__(self, path: object, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{self.path}: key '{key}': {problem}")


class DSparkCheckpointError(DSparkError):
    """A drafter safetensors file is missing a tensor, has an extra one, or a wrong shape/dtype."""

    def __init__(self, path: object, tensor: str, problem: str):
        self.path, self.tensor, self.problem = str(path), tensor, problem
        super().__init__(f"{self.path}: tensor '{tensor}': {problem}")
