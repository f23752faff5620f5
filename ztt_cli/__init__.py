"""ztt: turn a pretrained language model into a Zero-Token Transformer."""

__version__ = "0.1.0"

from .modeling import ZTTConfig, ZTTForCausalLM, register  # noqa: E402

register()

__all__ = ["ZTTConfig", "ZTTForCausalLM", "__version__"]
