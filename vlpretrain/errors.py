"""Exceptions for errors a user can cause; the CLI prints their message on one line and exits 2."""


class VLPretrainError(Exception):
    """Base of every error caused by user input (configs, data, checkpoints)."""


class ConfigError(VLPretrainError):
    """A run config names an unknown key, has a wrong type, misses a value or points at a missing file."""


class DataError(VLPretrainError):
    """Training or evaluation data is missing, malformed or too broken to go on."""


class CheckpointError(VLPretrainError):
    """A checkpoint is missing, incomplete or does not match the model."""


class TrainingError(VLPretrainError):
    """Training cannot continue (for example, too many non-finite losses in a row)."""
