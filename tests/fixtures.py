"""Tiny random models of every supported family, and a tokenizer trained here: offline and fast."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ztt_cli.testing import FAMILIES, family_config, tiny_model  # noqa: F401  (FAMILIES: what the tests run on)

N_LAYERS = 6

_WORDS = (
    "the king queen storm island spirit magic ship sea wind father daughter sleep dream music isle master "
    "servant noble brave sweet strange wonder shall will hath doth thou thee thy good ill fair foul night day"
).split()


def corpus(n_sentences: int = 400, seed: int = 0) -> str:
    """Deterministic pseudo-English: enough structure for a tokenizer and for perplexities to differ."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_sentences):
        n = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (n,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx).capitalize() + ".")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus().splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


# what each family's test model adds to its tiny config
QUIRKS = {
    "llama": dict(tie_word_embeddings=True),
    # a sliding window smaller than the test sequences
    "mistral": dict(num_key_value_heads=1, sliding_window=8, head_dim=8),
    # mixed full / sliding layers: per-index attributes must follow the unrolled index
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, tie_word_embeddings=False),
    # with GPT-2's per-layer 1/(i+1) attention scaling switched on
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True),
    "opt": dict(dropout=0.0, attention_dropout=0.0),
}


def source_model(family: str, seed: int = 0, n_layers: int = N_LAYERS):
    """A tiny source model (hidden size 32) for this module's tokenizer, its weights spread so that
    layers differ clearly and logits are not near-uniform."""
    config = family_config(family, n_layers, width=32, vocab_size=len(tokenizer()), special_ids=(1, 2, 3),
                           **QUIRKS[family])
    return tiny_model(config, seed, spread=0.15)


def save_source(family: str, folder: Path, seed: int = 0) -> Path:
    """A local Hugging Face folder (config, safetensors, tokenizer) for a tiny source model."""
    model = source_model(family, seed)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def token_ids(batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(tokenizer()), (batch, length), generator=g)


def ztt_model(family: str, layout: tuple[int, int, int, int], pool: bool = True, attn: str = "sdpa", seed: int = 0,
              **cfg):
    """A ZTT built around a tiny source model. layout = (head, block, cycles, tail)."""
    import copy

    from ztt_cli.model.modeling import ZTTConfig, ZTTForCausalLM

    src = source_model(family, seed)
    head, block, cycles, tail = layout
    config = ZTTConfig(text_config=src.config.to_dict(), head=head, block=block, cycles=cycles, tail=tail, pool=pool,
                       **cfg)
    config._attn_implementation = attn
    return ZTTForCausalLM(config, source=copy.deepcopy(src)).eval(), src


def grown_model(family: str, layout: tuple[int, int, int, int], dropped=(), added_gate: float = 0.0,
                pool: bool = True, attn: str = "sdpa", seed: int = 0, **cfg):
    """A grown ZTT (what ``--init grow`` builds) over a tiny source less the ``dropped`` layers,
    its added cycles' gates at ``added_gate``."""
    import copy

    from ztt_cli.model.architecture import family_for, remap_layers
    from ztt_cli.model.layout import Layout
    from ztt_cli.model.modeling import ZTTConfig, ZTTForCausalLM
    from ztt_cli.surgery.drop import keep_layers

    src = source_model(family, seed)
    kept = copy.deepcopy(src)
    keep_layers(kept, family_for(kept), list(dropped))
    lay = Layout(*layout)
    text = remap_layers(kept.config, [slot.attribute for slot in lay.slots(grown=True)])
    config = ZTTConfig(text_config=text.to_dict(), head=lay.head, block=lay.block, cycles=lay.cycles, tail=lay.tail,
                       pool=pool, grown=True, **cfg)
    config._attn_implementation = attn
    model = ZTTForCausalLM(config, source=kept).eval()
    with torch.no_grad():
        model.gates.weight[1:] = added_gate
    return model, src


def unrolled_reference(ztt):
    """The family's own model at full unrolled depth, with each position's weights copied from the
    layer the ZTT shares there: what plain weight sharing computes."""
    ref = AutoModelForCausalLM.from_config(ztt.config.text_config).eval()
    state = {k: v for k, v in ztt.inner.state_dict().items()}
    layers_path = ztt.family.layers
    for slot in ztt.config.layout.slots():
        for k, v in ztt.layers[slot.unique].state_dict().items():
            state[f"{layers_path}.{slot.index}.{k}"] = v
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "lm_head" in k or "bias" in k for k in missing), missing
    return ref


def cli(*args):
    """Run the ``ztt`` command line in-process (arguments may be paths or numbers)."""
    from typer.testing import CliRunner

    from ztt_cli.cli import app

    return CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "200"})


def greedy_with_cache(model, prompt, steps: int, threshold: float | None = None):
    """Greedy decoding through the KV cache, one token at a time: the ids, the exit cycle of every token
    fed through the cache (None without early exit) and the logits of each step."""
    import torch

    out = model(prompt, use_cache=True, exit_threshold=threshold)
    ids, cycles, logits = prompt, [out.exit_cycles], [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        out = model(nxt, cache=out.cache, use_cache=True, exit_threshold=threshold)
        cycles.append(out.exit_cycles)
        logits.append(out.logits[:, -1])
    return ids, torch.cat(cycles, dim=1) if cycles[0] is not None else None, torch.stack(logits, dim=1)
