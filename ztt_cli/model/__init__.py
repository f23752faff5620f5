"""The model: layout, supported families, zero-token attention, early exit, the modeling code.

Needs only torch and transformers. These files import only each other, flat
(``from .sibling import x``): a remote-code export copies them side by side."""
