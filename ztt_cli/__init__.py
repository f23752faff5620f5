"""ztt: turn a pretrained language model into a Zero-Token Transformer.

``import ztt_cli`` registers the model type ``ztt`` with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads a ztt checkpoint. The registration
needs torch; to keep the command line quick to start, it happens once transformers is
imported (at once if it already is). ``ZTTConfig`` and ``ZTTForCausalLM`` are imported on
first use."""

from __future__ import annotations

import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["ZTTConfig", "ZTTForCausalLM", "__version__"]
MODEL_CODE = f"{__name__}.model."


def __getattr__(name: str):
    if name in ("ZTTConfig", "ZTTForCausalLM"):
        from .model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterWhenReady:
    """A meta-path finder that changes no import: it watches transformers and the model code
    being imported, and registers the model after the first of those imports that leaves
    transformers loaded and no model file half-imported; then it steps aside."""

    def __init__(self):
        self._finding: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if not (fullname == "transformers" or fullname.startswith(MODEL_CODE)) or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the real finders
        finally:
            self._finding.discard(fullname)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            self.register_if_ready(finished=fullname)

        spec.loader.exec_module = exec_then_register
        return spec

    def register_if_ready(self, finished: str = "") -> None:
        if self not in sys.meta_path or "transformers" not in sys.modules:
            return
        half_imported = [name for name, module in list(sys.modules.items()) if name.startswith(MODEL_CODE)
                         and name != finished and getattr(getattr(module, "__spec__", None), "_initializing", False)]
        if half_imported:  # our own model code is importing transformers: register when it is done
            return
        sys.meta_path.remove(self)
        from .model.modeling import register

        register()


if not any(isinstance(f, _RegisterWhenReady) for f in sys.meta_path):
    _registrar = _RegisterWhenReady()
    sys.meta_path.insert(0, _registrar)
    _registrar.register_if_ready()
