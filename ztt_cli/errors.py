"""Errors a user can cause. The CLI prints one line plus a hint and exits 2."""

from .model.errors import LayoutError, UnsupportedArchitectureError, ZTTError

__all__ = [
    "ZTTError", "LayoutError", "UnsupportedArchitectureError", "SourceError", "OfflineError",
    "OutputExistsError", "CheckpointError",
]


class SourceError(ZTTError):
    """The source model cannot be found, fetched or read."""


class OfflineError(SourceError):
    """The model hub (or the package registry) cannot be reached."""


class OutputExistsError(ZTTError):
    """The output directory exists and --overwrite was not given."""


class CheckpointError(ZTTError):
    """A checkpoint is missing, corrupt or not a ZTT model."""
