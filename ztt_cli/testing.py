"""Tiny random models for the tests and benchmarks: offline, seeded, built in a moment.

``family_config`` writes the config of one of the five families ztt was first built for at any
depth and width; ``tiny_model`` builds a seeded random model from that or any other config (the
census in bench/families.py shrinks each causal-LM family's own)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

FAMILIES = ("llama", "gpt2", "opt", "qwen2", "mistral")
CONFIG_CLASSES = {"llama": LlamaConfig, "gpt2": GPT2Config, "opt": OPTConfig, "qwen2": Qwen2Config,
                  "mistral": MistralConfig}


def family_config(family: str, layers: int, width: int, vocab_size: int, special_ids: tuple[int, int, int],
                  **changes):
    """``family``'s config with ``layers`` layers of hidden size ``width`` (feed-forward twice as wide,
    4 heads, 2 key/value heads where the family has them, 256 positions). ``special_ids``: the pad,
    bos and eos token ids; ``changes``: any other field, set or replaced."""
    if family not in CONFIG_CLASSES:
        raise ValueError(family)
    if family == "gpt2":
        shape = dict(n_embd=width, n_layer=layers, n_head=4, n_positions=256)
    elif family == "opt":
        shape = dict(hidden_size=width, num_hidden_layers=layers, ffn_dim=2 * width, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=width)
    else:
        shape = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)
    pad, bos, eos = special_ids
    tokens = dict(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return CONFIG_CLASSES[family](**{**shape, **tokens, **changes})


def tiny_model(config, seed: int | None = 0, spread: float | None = None, **from_config):
    """A random ``*ForCausalLM`` for ``config`` in eval mode, its weights drawn after
    ``torch.manual_seed(seed)`` (``None``: from the random stream as it stands). ``spread``: every
    matrix redrawn from N(0, spread²), so that layers differ clearly and logits are far from uniform."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **from_config)
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, spread)
    return model.eval()
