"""What healing is made of, below the stage that runs it (``stages/finetune.py``): the loss and
its terms, quality measures, the resumable state of a run, and the processes under torchrun."""
