"""``python -m ztt_cli`` (also what ``torchrun -m ztt_cli`` runs)."""

from .cli import app

app()
