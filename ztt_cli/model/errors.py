"""Errors a user can cause. The CLI prints one line plus a hint and exits 2.

The model's own errors live here, beside the model code that a remote-code export ships;
``ztt_cli.errors`` adds the ones of the stages around it.

The model code knows no command line. An error about an option names it as a placeholder,
``{name}`` for each name in ``fields`` (the option's field name: ``{block}``, ``{full_depth}``),
and whoever reports the error spells it (:meth:`ZTTError.spelled`): the command line as a flag,
a recipe as its key. ``message`` and ``hint`` spell each field as its bare name."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class ZTTError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2
    # how the reporter spells the fields (set by whoever knows, e.g. a recipe run); None: its own way
    spelling: Callable[[str], str] | None = None

    def __init__(self, message: str, hint: str | None = None, fields: Sequence[str] = ()):
        self.template, self.hint_template, self.fields = message, hint, tuple(fields)
        self.message, self.hint = self.spelled(str)
        super().__init__(self.message)

    def spelled(self, spell: Callable[[str], str]) -> tuple[str, str | None]:
        """The message and the hint with each field's placeholder replaced by ``spell(field)``."""

        def fill(text: str) -> str:
            for name in self.fields:
                text = text.replace("{" + name + "}", spell(name))
            return text

        return fill(self.template), None if self.hint_template is None else fill(self.hint_template)


class UnsupportedArchitectureError(ZTTError):
    """The source model's family has no row in the architecture table."""


class LayoutError(ZTTError):
    """head / block / cycles / tail do not fit the source model."""
