"""The pipeline's stages (convert, finetune, calibrate, eval, export) and ``generate``: one module
each, described as data by the stage registry (``ztt_cli.options``, beside each stage's options)."""

from ..options import GENERATE, STAGES, Command, Stage, stage

__all__ = ["GENERATE", "STAGES", "Command", "Stage", "stage"]
