"""The pipeline's stages (convert, finetune, calibrate, eval, export) and ``generate``."""
