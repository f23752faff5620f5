"""Quality measures on fixed token windows: perplexity (convert --init auto, the benchmarks, tests) and
how well an exit signal ranks tokens by the cost of exiting (calibrate)."""

from __future__ import annotations

import math

import torch

from ..heap import release_freed_memory
from .losses import exit_target, next_token_loss

LOSS_CHUNK = 128  # positions whose loss is computed at once: a copy of the logits is this long, not the window's


def token_losses(logits: torch.Tensor, ids: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """``next_token_loss(logits, ids, "none")``, [B, T-1], computed ``chunk`` positions at a time: the
    float32 copy and the log-softmax are a chunk's, not the window's (vocabulary × window each)."""
    length = ids.shape[1]
    return torch.cat([next_token_loss(logits[:, s : s + chunk + 1], ids[:, s : s + chunk + 1], reduction="none")
                      for s in range(0, length - 1, chunk)], dim=1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean over windows of the mean next-token loss)."""
    model.eval()
    losses = []
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(model.device)
        losses.extend(token_losses(model(input_ids=batch, use_cache=False).logits, batch).mean(1).tolist())
        release_freed_memory()  # a window's logits: the largest block a fit's perplexity frees
    return math.exp(sum(losses) / len(losses))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ties broken by order)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


@torch.no_grad()
def signals_and_targets(model, windows: torch.Tensor, batch_size: int = 4):
    """Per cycle c < C, for every token: the model's exit signal (its exit policy's, from a
    full-depth replay) and exp(-KL(exit after c || full depth)), the cost of exiting there.

    Returns ({c: signals}, {c: targets}, the full-depth greedy tokens, shaped like ``windows``)."""
    model.eval()
    signals: dict[int, list] = {}
    targets: dict[int, list] = {}
    greedy = []
    for ids in windows.to(model.device).split(batch_size):
        full = model(input_ids=ids, exit_map=torch.full(ids.shape, model.config.cycles), use_cache=False)
        greedy.append(full.logits.argmax(-1))
        for c in range(1, model.config.cycles):
            exited = model(input_ids=ids, exit_after=c)
            signals.setdefault(c, []).append(full.exit_signals[:, c - 1].flatten().cpu())
            targets.setdefault(c, []).append(exit_target(exited.logits, full.logits).flatten().cpu())
    signals_by_cycle = {c: torch.cat(v) for c, v in signals.items()}
    return signals_by_cycle, {c: torch.cat(v) for c, v in targets.items()}, torch.cat(greedy)


def exit_signal_correlation(model, windows: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per cycle c < C: Spearman correlation between the exit signal and the cost of exiting,
    the ranking the exit objective trains."""
    signals, targets, _ = signals_and_targets(model, windows, batch_size)
    return {c: spearman(signals[c], targets[c]) for c in signals}
