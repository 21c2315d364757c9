"""Exceptions for errors a user can cause; the CLI prints their message on one line and exits 2."""


class VLPretrainError(Exception):
    """Base of every error caused by user input (configs, data, checkpoints)."""


class ConfigError(VLPretrainError):
    """A run config names an unknown key, has a wrong type, misses a value or points at a missing file."""


class DataError(VLPretrainError):
    """Training or evaluation data is missing, malformed or too broken to go on."""


class CheckpointError(VLPretrainError):
    """A checkpoint is missing, incomplete, does not match the model or this world size, or cannot be written."""


class LaunchError(VLPretrainError):
    """The launcher's environment does not say which process this is (rank, world size, rendezvous address)."""


class RunFolderLocked(VLPretrainError):
    """Another run holds the run folder's lock: two runs must not write into one folder."""


class TrainingError(VLPretrainError):
    """Training cannot continue (for example, too many non-finite losses in a row)."""


def without_worker_traceback(error: VLPretrainError) -> VLPretrainError:
    """The same error with its own one-line message, when a DataLoader worker re-raised it wrapped in the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(error)
    if "Original Traceback" not in text:
        return error
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return type(error)(last.removeprefix(prefix).removeprefix(f"{type(error).__name__}: "))
