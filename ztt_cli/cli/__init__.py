"""The ``ztt`` command line: commands generated from the options models, rendered with rich.

Light on purpose: importing it imports neither torch nor transformers; each command imports
its stage when it runs."""

from .app import app, entry

__all__ = ["app", "entry"]
