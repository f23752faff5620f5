"""Errors a user can cause. The CLI prints one line plus a hint and exits 2.

The model's own errors live here, beside the model code that a remote-code export ships;
``ztt_cli.errors`` adds the ones of the stages around it."""


class ZTTError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UnsupportedArchitectureError(ZTTError):
    """The source model's family has no row in the architecture table."""


class LayoutError(ZTTError):
    """head / block / cycles / tail do not fit the source model."""
