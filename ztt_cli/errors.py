"""Errors a user can cause. The CLI prints one line plus a hint and exits 2.

An error about an option names it as a field (``ZTTError.fields``); the command line spells it
as its flag (:func:`flag`), a recipe run as its key (``recipe.recipe_key``)."""

from .model.errors import LayoutError, UnsupportedArchitectureError, ZTTError

__all__ = [
    "ZTTError", "LayoutError", "UnsupportedArchitectureError", "SourceError", "OfflineError",
    "OutputExistsError", "CheckpointError", "flag",
]


def flag(field: str) -> str:
    """An option's flag on the command line: ``full_depth`` -> ``--full-depth``."""
    return "--" + field.replace("_", "-")


class SourceError(ZTTError):
    """The source model cannot be found, fetched or read."""


class OfflineError(SourceError):
    """The model hub (or the package registry) cannot be reached."""


class OutputExistsError(ZTTError):
    """The output directory exists and --overwrite was not given."""


class CheckpointError(ZTTError):
    """A checkpoint is missing, corrupt or not a ZTT model."""
