"""Errors a user can cause. The CLI prints one line plus a hint and exits 2."""


class ZTTError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class SourceError(ZTTError):
    """The source model cannot be found, fetched or read."""


class OfflineError(SourceError):
    """The model hub (or the package registry) cannot be reached."""


class UnsupportedArchitectureError(ZTTError):
    """The source model's family has no row in the architecture table."""


class LayoutError(ZTTError):
    """head / block / cycles / tail do not fit the source model."""


class OutputExistsError(ZTTError):
    """The output directory exists and --overwrite was not given."""


class CheckpointError(ZTTError):
    """A checkpoint is missing, corrupt or not a ZTT model."""
