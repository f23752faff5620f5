"""Zero-token attention against plain SDPA, measured side by side in one run.

Shapes of SmolLM2-135M (9 query heads, 3 KV heads, head dim 64), causal, fp32 on CPU.
Forward: inference (no gradients). Forward+backward: p0 enters the loss, so the
differentiable path runs. Repetitions are interleaved and the median is reported.

    python bench/attention.py [--reps 5] [--out bench/results/attention.json]
    python bench/attention.py --backends [--device cuda]   # which SDPA kernels the zero token can use

``--backends`` runs the zero token's training path (padded to head_dim + groups channels) and
its inference path under ``sdpa_kernel([backend])`` for each backend, and says which run: on a
GPU, whether the padded widths keep the flash kernel out (bf16, batch 1, 64 new queries over a
512-key cache and a 512-token prefill).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ztt_cli.model.attention import zero_token_attention_sdpa

H, H_KV, D = 9, 3, 64


def inputs(batch, seq, grad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, H, seq, D, generator=g, requires_grad=grad)
    k = torch.randn(batch, H_KV, seq, D, generator=g, requires_grad=grad)
    v = torch.randn(batch, H_KV, seq, D, generator=g, requires_grad=grad)
    z = (0.02 * torch.randn(H_KV, D, generator=g)).requires_grad_(grad)
    b = torch.full((H,), -6.0, requires_grad=grad)
    return q, k, v, z, b


def plain_forward(q, k, v, z, b):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def ztt_forward(q, k, v, z, b):
    with torch.no_grad():
        return zero_token_attention_sdpa(q, k, v, None, D**-0.5, z, b)


def plain_backward(q, k, v, z, b):
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()


def ztt_backward(q, k, v, z, b):
    out, p0 = zero_token_attention_sdpa(q, k, v, None, D**-0.5, z, b)
    (out.sum() + p0.sum()).backward()


def measure(pair, batch, seq, reps):
    grad = pair[0] is plain_backward
    args = inputs(batch, seq, grad)
    times = {fn.__name__: [] for fn in pair}
    for fn in pair:  # warm-up
        fn(*args)
    for _ in range(reps):
        for fn in pair:  # interleaved, so drifts in machine load hit both
            t = time.perf_counter()
            fn(*args)
            times[fn.__name__].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def backends(device: str) -> list[dict]:
    """For each SDPA backend: does each zero-token path run when only that backend is allowed?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        for label, q_len, kv_len, grad in (("prefill, training", 512, 512, True),
                                           ("prefill, inference", 512, 512, False),
                                           ("decode, inference", 1, 512, False)):
            q, k, v, z, b = (t.detach().to(device, dtype).requires_grad_(grad) for t in inputs(1, kv_len, False))
            q = q[:, :, -q_len:].detach().requires_grad_(grad)
            try:
                with sdpa_kernel([backend]), torch.set_grad_enabled(grad):
                    out, p0 = zero_token_attention_sdpa(q, k, v, None, D**-0.5, z, b)
                    if grad:
                        (out.float().sum() + p0.float().sum()).backward()
                result = "runs"
            except RuntimeError as e:
                result = "refused: " + str(e).splitlines()[0][:100]
            rows.append({"backend": name, "path": label, "result": result})
            print(f"{name:>20} {label:>20}  {result}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", action="store_true", help="only probe which SDPA backends the zero token can use")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention.json")
    args = ap.parse_args()
    if args.backends:
        probe = backends(args.device)
        out = args.out.with_name(f"attention-backends-{args.device.replace(':', '')}.json")
        out.write_text(json.dumps({"torch": torch.__version__, "device": args.device, "rows": probe}, indent=2) + "\n")
        return
    rows = []
    print(f"{'batch':>5} {'seq':>5} {'pass':>16} {'plain ms':>9} {'ztt ms':>9} {'ratio':>6}")
    for batch in (1, 8):
        for seq in (128, 512, 2048):
            for label, pair in (("forward", (plain_forward, ztt_forward)),
                                ("forward+backward", (plain_backward, ztt_backward))):
                t = measure(pair, batch, seq, args.reps)
                plain, ztt = t[pair[0].__name__], t[pair[1].__name__]
                rows.append({"batch": batch, "seq": seq, "pass": label, "plain_s": plain, "ztt_s": ztt,
                             "ratio": ztt / plain})
                print(f"{batch:>5} {seq:>5} {label:>16} {plain * 1e3:9.2f} {ztt * 1e3:9.2f} {ztt / plain:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
