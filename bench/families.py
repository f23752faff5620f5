"""Which transformers families ztt converts: every model type of transformers' causal-LM mapping,
built as a tiny random model from its own config shrunk generically, then three checks.

1. **parity**: a no-share conversion (every layer its own, no pool) gives the source's logits;
2. **cache**: a cycled conversion with a zero-token pool generates the same greedy tokens with
   and without a KV cache;
3. **round trip**: the cycled conversion saved and loaded gives the same logits.

A family that passes is also asked whether ``convert --drop --fit`` can fold a drop's map into it
(``fit``: ``folds``, or the refusal's first line): not part of the outcome.

Each model type ends in one of four outcomes: ``pass`` (all three), ``left out`` (encoder-decoder
or not an attention-only decoder: out of scope), ``not built`` (no tiny model could be made from
its config under the parameter cap), ``convention`` (ztt refused it or a check failed: why).

``python bench/families.py [--only TYPE ...] [--out bench/results/families.json] [--readme docs/convert.md]``
writes the outcomes and the counts table; ``tests/test_families.py`` checks every recorded
outcome still holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import ztt_cli  # noqa: E402,F401  registers the ztt model type
from ztt_cli.model.architecture import NOT_ATTENTION_ONLY, family_for, per_layer_lists  # noqa: E402
from ztt_cli.model.errors import ZTTError  # noqa: E402
from ztt_cli.model.modeling import ZTTConfig, ZTTForCausalLM  # noqa: E402
from ztt_cli.testing import tiny_model  # noqa: E402

PARAMETER_CAP = 4_000_000
LAYERS = 4
VOCAB = 128
RESULTS = ROOT / "bench" / "results" / "families.json"
BLOCK = ("<!-- families:begin -->", "<!-- families:end -->")
# generic sizes: every attribute a config has among these is set, whatever the family calls it
SIZES = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "max_position_embeddings": 256, "ffn_dim": 128,
    "word_embed_proj_dim": 64, "n_inner": 128, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "first_k_dense_replace": 0, "kv_lora_rank": 16, "q_lora_rank": 32,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 16, "sliding_window": 64,
    "rotary_dim": 8, "num_global_key_value_heads": 2, "global_head_dim": 16,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8,
    "altup_num_inputs": 2, "num_kv_shared_layers": 0, "topk_group": 1, "n_group": 1, "attention_chunk_size": 64,
}


# a hybrid (layers with and without attention) alternates: layer without attention, attention layer, ...
HYBRID_SIZES = {"attn_layer_period": 2, "attn_layer_offset": 1, "attn_layer_indices": list(range(1, LAYERS, 2))}


def _attention_kind(kind) -> bool:
    return isinstance(kind, str) and "attention" in kind and "linear" not in kind


def _alternating(kinds) -> list[str] | None:
    """A hybrid's per-layer list of layer kinds, cut to alternate its first kind without attention and
    its first attention kind (so that a two-layer block cycles over both); None for any other list."""
    kinds = list(kinds)
    if not all(isinstance(k, str) for k in kinds):
        return None
    other = next((k for k in kinds if not _attention_kind(k)), None)
    attention = next((k for k in kinds if _attention_kind(k)), None)
    return None if other is None or attention is None else [other, attention] * (LAYERS // 2)


def model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def shrunk_config(model_type: str):
    """The family's default config, shrunk: hidden sizes, heads, layers, experts, vocabulary; per-layer
    lists cut to the new depth (a list of layer indices filtered to it)."""
    config = AutoConfig.for_model(model_type)
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        raise ValueError("a composite config (text and other modalities)")
    before = config.num_hidden_layers
    lists = per_layer_lists(config)
    for name, value in SIZES.items():
        if hasattr(config, name) and getattr(config, name) is not None:
            setattr(config, name, value)
    for name in lists:
        setattr(config, name, _alternating(getattr(config, name)) or list(getattr(config, name))[:LAYERS])
    for name, value in HYBRID_SIZES.items():  # hybrids that place attention by rule, not by list
        if hasattr(config, name):
            setattr(config, name, value)
    if getattr(config, "qk_rope_head_dim", None) and hasattr(config, "head_dim"):  # multi-head latent attention
        config.head_dim = config.qk_rope_head_dim
    for name, value in list(vars(config).items()):  # lists of layer indices (e.g. which layers are sparse)
        if isinstance(value, list) and name not in lists and value and all(isinstance(v, int) for v in value) \
                and max(value) >= LAYERS and max(value) < before and "token" not in name:
            setattr(config, name, [v for v in value if v < LAYERS])
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, token, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, token, VOCAB - 1)
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return config


def build(model_type: str):
    config = shrunk_config(model_type)
    if getattr(config, "is_encoder_decoder", False):
        return None, "left out", "an encoder-decoder model"
    model = tiny_model(config, seed=0)
    probe = torch.ones(1, 4, dtype=torch.long)
    try:  # the family's default attention; eager where SDPA cannot do what it asks (softcapping …)
        model(probe)
    except ValueError:  # (its weights drawn on from the same random stream, not reseeded)
        model = tiny_model(config, seed=None, attn_implementation="eager")
        model(probe)  # a tiny model that cannot run a forward pass was not built
    n = sum(p.numel() for p in model.parameters())
    if n > PARAMETER_CAP:
        raise ValueError(f"{n / 1e6:.1f} M parameters after shrinking, above the {PARAMETER_CAP / 1e6:.0f} M cap")
    return model, None, None


def _ztt(source, layout: dict, pool: bool) -> ZTTForCausalLM:
    cfg = ZTTConfig(text_config=source.config.to_dict(), pool=pool, **layout)
    own = source.config._attn_implementation
    cfg._attn_implementation = own if own in ("eager", "sdpa") else "sdpa"
    model = ZTTForCausalLM(cfg, source=copy.deepcopy(source)).eval()
    if model.pool is not None:  # a visible zero token: the checks see it act
        with torch.no_grad():
            model.pool.key.normal_(0.0, 1.0)
            model.pool.bias.fill_(0.0)
    return model


@torch.no_grad()
def checks(source) -> None:
    """The three checks; raises AssertionError naming the one that fails."""
    ids = torch.randint(3, VOCAB - 1, (2, 12), generator=torch.Generator().manual_seed(0))
    depth = source.config.num_hidden_layers
    plain = _ztt(source, dict(head=0, block=depth, cycles=1, tail=0), pool=False)
    ref = source(ids).logits
    assert torch.allclose(plain(ids).logits, ref, atol=1e-5, rtol=1e-4), (
        "parity: no-share logits differ from the source")
    family = family_for(source)
    if all(family.attends(layer) for layer in family.layer_list(source)):
        layout = dict(head=1, block=(depth - 2) // 2, cycles=2, tail=1)
    else:  # a hybrid (alternating, see shrunk_config): a block of one layer without attention and one with
        layout = dict(head=0, block=2, cycles=2, tail=(depth - 4))
    cycled = _ztt(source, layout, pool=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = cycled.generate(ids[:1], use_cache=True, **kwargs)
    without = cycled.generate(ids[:1], use_cache=False, **kwargs)
    assert torch.equal(with_cache, without), "cache: cached and uncached greedy generation differ"
    with tempfile.TemporaryDirectory() as tmp:
        cycled.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
    assert torch.allclose(loaded(ids).logits, cycled(ids).logits, atol=1e-6), "round trip: logits differ after loading"


def fit_check(source) -> str:
    """Whether a drop's least-squares map folds into this family (``convert --fit``): 'folds' when
    the fold check passes and the fit lowers the error at the gap, else why not."""
    from ztt_cli.surgery.drop import keep_layers
    from ztt_cli.surgery.fit import apply_drop_fit, fit_drop

    model = copy.deepcopy(source)
    family = family_for(model)
    windows = torch.randint(3, VOCAB - 1, (8, 16), generator=torch.Generator().manual_seed(1))
    try:
        fit = fit_drop(model, family, [2], windows, 1e-3, "random ids")
        keep_layers(model, family, [2])
        apply_drop_fit(model, family, fit, [i for i in range(LAYERS) if i != 2])
    except ZTTError as e:
        return e.message
    (gap,) = fit.report.gaps
    return "folds" if gap.error_after <= gap.error_before else "the fit raised the error at the gap"


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def census_one(model_type: str) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            source, outcome, why = build(model_type)
        except Exception as e:  # whatever a family's config or constructor refuses
            return {"outcome": "not built", "why": first_line(e)}
        if source is None:
            return {"outcome": outcome, "why": why}
        try:
            checks(source)
        except ZTTError as e:
            why = e.message
            scope = NOT_ATTENTION_ONLY in why
            return {"outcome": "left out" if scope else "convention", "why": why}
        except AssertionError as e:
            return {"outcome": "convention", "why": str(e)}
        except Exception as e:
            return {"outcome": "convention", "why": first_line(e)}
        try:
            fit = fit_check(source)
        except Exception as e:
            fit = first_line(e)
    return {"outcome": "pass", "why": "", "fit": fit, "seconds": round(time.perf_counter() - start, 2)}


OUTCOMES = ("pass", "not built", "convention", "left out")


def render(results: dict) -> str:
    counts = {o: sum(r["outcome"] == o for r in results["families"].values()) for o in OUTCOMES}
    folds = sum(r.get("fit") == "folds" for r in results["families"].values())
    meta = results["meta"]
    lines = [
        BLOCK[0], "",
        f"Every model type of transformers {meta['transformers']}'s causal-LM mapping ({len(results['families'])}), "
        f"built as a tiny random model ({LAYERS} layers, hidden 64, vocabulary {VOCAB}, ≤ {PARAMETER_CAP / 1e6:.0f} M "
        "parameters) and checked with `python bench/families.py` "
        f"({meta['date']}):", "",
        "| outcome | families | |", "|---|---|---|",
        f"| pass: no-share parity, cycled cached = uncached generation, save/load | **{counts['pass']}** | "
        + ", ".join(f"`{t}`" for t, r in sorted(results["families"].items()) if r["outcome"] == "pass") + " |",
        f"| of which `convert --drop --fit` folds a drop's map | **{folds}** | refused: "
        + (", ".join(f"`{t}`" for t, r in sorted(results["families"].items()) if r.get("fit", "folds") != "folds")
           or "none") + " (why below) |",
        f"| could not be built as a tiny model | {counts['not built']} | see below |",
        f"| a convention failed | {counts['convention']} | see below |",
        f"| left out: encoder-decoder, or not an attention-only decoder | {counts['left out']} | see below |",
        "", "<details><summary>Why, per family</summary>", "", "| family | outcome | why |", "|---|---|---|",
    ]
    lines += [f"| `{t}` | {r['outcome']} | {r['why'].replace('|', '/')} |"
              for t, r in sorted(results["families"].items())
              if r["outcome"] != "pass"]
    lines += [f"| `{t}` | pass; `--fit` refused | {r['fit'].replace('|', '/')} |"
              for t, r in sorted(results["families"].items())
              if r["outcome"] == "pass" and r.get("fit", "folds") != "folds"]
    lines += ["", "</details>", "", BLOCK[1]]
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    text = path.read_text()
    start, end = text.index(BLOCK[0]), text.index(BLOCK[1]) + len(BLOCK[1])
    path.write_text(text[:start] + block + text[end:])


def main(argv=None) -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="these model types only (no file written)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, help="a docs page with the families block to fill")
    parser.add_argument("--render", type=Path, help="rebuild the block from a results file, measuring nothing")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        torch.set_num_threads(1)
        families = {}
        for model_type in args.only or model_types():
            families[model_type] = census_one(model_type)
            got = families[model_type]
            print(f"{model_type:32s} {got['outcome']:10s} {got['why']} {got.get('fit', '')}", flush=True)
        if args.only:
            return
        results = {"meta": {"transformers": transformers.__version__, "torch": torch.__version__,
                            "date": time.strftime("%Y-%m-%d")}, "families": families}
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    if args.readme:
        write_block(args.readme, render(results))


if __name__ == "__main__":
    main()
