"""The model: layout, supported families, zero-token attention, early exit, the modeling code.

Needs only torch and transformers. These files import only each other, flat
(``from .sibling import x``): a remote-code export copies every one of them side by side, so
they speak of the model only (errors name options as fields, see ``errors.py``) and hold
nothing else (test and benchmark helpers live outside this folder)."""
