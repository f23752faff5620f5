"""Everything that reads or writes files: sources (hub, folder, .gguf, built-in), built-in assets
and texts, training data, checkpoint folders written atomically, provenance and the model card."""
