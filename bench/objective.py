"""What the halting objective costs a healing step, against today's exit objective, side by side.

One ZTT of SmolLM2-135M (4/11×2/4, init lower), one batch of Shakespeare and the source's logits
for it; the same healing step (the objective's forward and backward, then AdamW) timed under each
objective in turn, alternating so that both see the same machine load:
  * today's: distillation + the exit-aware term + the exit objective (rank), the defaults;
  * halting: distillation + the exit-aware term + the halting objective towards 1.5 cycles.
Prints the median step time of each and their ratio (the goal: halting ≤ 1.2× today's).

    python bench/objective.py --steps 8 --seq-len 256 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import ztt_cli  # noqa: F401
from ztt_cli.io import sources
from ztt_cli.io.checkpoint import load_checkpoint
from ztt_cli.io.data import prepare
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert
from ztt_cli.training.losses import HealingObjective

OBJECTIVES = {
    "exit objective (today's)": {},
    "halting, 1.5 cycles": {"halting_weight": 1.0, "halting_cycles": 1.5},
}


def healing_step(objective: HealingObjective, optimizer, ids: torch.Tensor, teacher: torch.Tensor) -> float:
    start = time.perf_counter()
    loss, _ = objective(ids, teacher)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def setups(folder: Path, ids: torch.Tensor) -> dict[str, tuple]:
    """Per objective: its own copy of the model (so neither's steps change the other's), the
    objective and an AdamW over the model's parameters."""
    built = {}
    for name, extra in OBJECTIVES.items():
        model = load_checkpoint(folder).train()
        opts = FinetuneOptions(checkpoint=folder, data="shakespeare", out=folder.parent / "unused", **extra)
        objective = HealingObjective.from_options(model, opts)
        objective.setup(ids)
        built[name] = (objective, torch.optim.AdamW(model.parameters(), lr=1e-5))
    return built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per objective (after one untimed)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-objective"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/objective.json"))
    args = ap.parse_args()
    folder = args.work / "ztt"
    if not (folder / "config.json").is_file():
        convert(ConvertOptions(source="smollm2-135m", out=folder, head=4, block=11, cycles=2, tail=4, init="lower",
                               overwrite=True))
    tokenizer = sources.load_tokenizer(folder)
    ids = prepare("shakespeare", tokenizer, args.seq_len).train[: args.batch_size]
    teacher_model = sources.load_model(sources.find_source("smollm2-135m").folder, torch.float32)
    with torch.no_grad():
        teacher = teacher_model(input_ids=ids).logits
    del teacher_model
    built = setups(folder, ids)
    times: dict[str, list[float]] = {name: [] for name in built}
    for step in range(args.steps + 1):
        for name, (objective, optimizer) in built.items():
            took = healing_step(objective, optimizer, ids, teacher)
            if step:  # the first step of each warms up
                times[name].append(took)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base, halting = medians.values()
    for name, m in medians.items():
        print(f"{name:28s} {m:7.3f} s per step ({args.batch_size}×{args.seq_len} tokens)")
    print(f"halting / today's: {halting / base:.3f}× (goal ≤ 1.2×)")
    args.out.write_text(json.dumps({
        "config": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "step_s": times, "median_s": medians,
        "ratio": halting / base}, indent=2) + "\n")


if __name__ == "__main__":
    main()
