"""ztt: turn a pretrained language model into a Zero-Token Transformer.

``import ztt_cli`` registers the model type ``ztt`` with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads a ztt checkpoint. The registration
needs torch; to keep the command line quick to start, it happens when transformers itself
is imported (at once if it already is). ``ZTTConfig`` and ``ZTTForCausalLM`` are imported on
first use."""

from __future__ import annotations

import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["ZTTConfig", "ZTTForCausalLM", "__version__"]


def __getattr__(name: str):
    if name in ("ZTTConfig", "ZTTForCausalLM"):
        from .model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'ztt_cli' has no attribute {name!r}")


def _register() -> None:
    from .model.modeling import register

    register()


class _RegisterAfterTransformers:
    """A meta-path finder that lets transformers import as usual, then registers the model."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
