"""Peak resident memory and wall time of `ztt convert` and `ztt finetune` on sources of real-model size
(issue: streaming conversion), each command in its own process, measured side by side in one run.

Sources are random-weight llama models built by bench/synthetic.py under --synthetic (git-ignored runs/),
plus the built-in SmolLM2-135M for healing. For every source and conversion path:
  * plain drop    `ztt convert SRC --drop N --no-fit` (N = a third of the layers, block influence)
  * fitted drop   `ztt convert SRC --drop N --fit-tokens T` (the default fit on T calibration tokens)
  * grown ZTT     `ztt convert SRC --init grow --head h --block k --cycles 2 --tail h` (h = L/6, k = L-N-2h)
  * load source   the source loaded as convert loads it, nothing else
  * ZTT, lower    `ztt convert SRC --init lower` on the derived layout (a fixed init; not run by default)
  * grown, fitted the grown ZTT with `--fit --relax-rank 8 --fit-steps 4` (its added cycle fitted; not by default)
  * ZTT, auto     `ztt convert SRC --init auto` on the derived layout (each strategy scored; not by default)
and `ztt finetune` for a few steps with each `--trainable` choice on a converted ZTT (SmolLM2's 10/5×2/10 as
the demo converts it, and one synthetic source). Each row is set against the goal the issue sets for
streaming conversion: peak ≤ 3 × largest layer + embeddings + 0.7 GB, from the checkpoint's tensor sizes.
Peak RSS counts the source's memory-mapped weights (file-backed pages) once touched; the anonymous and
file-backed parts are sampled too.

    OMP_NUM_THREADS=1 python bench/memory.py     # the depth sweep at hidden 1024 (8 to 48 layers), then healing
    OMP_NUM_THREADS=1 python bench/memory.py --merge --sources llama-2.4gb qwen3-1.15gb --heal    # rows added
    OMP_NUM_THREADS=1 python bench/memory.py --merge --cases plain grown --heal \
        --path in-memory= --tree in-memory=3d0dc73 --path streaming= --tree streaming=9231aaa

Conversion paths: `--path LABEL=ARGS` (repeatable) runs every conversion once per path with ARGS added, the
paths alternating; `--tree LABEL=REV` runs that path's ztt from git revision REV, exported read-only with
`git archive` (or from a copy of the package: `--tree LABEL=DIR`). The default, `head=` from HEAD, measures
the path that `ztt convert` picks by itself (no option forces in-memory or streaming conversion; if one
appears, give it as the ARGS of a path: the run records the options that look like one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
import typing
from pathlib import Path

import synthetic
import torch

from ztt_cli.stages import FinetuneOptions

GB = 1e9
GOAL_SLACK = 0.7 * GB  # the goal's allowance for the interpreter, torch and the calibration activations
TIME = "/usr/bin/time"  # GNU time
SAMPLE_S = 0.05  # how often a run's anonymous and file-backed RSS are read (their peaks are sampled, not exact)
CASES = ["load", "plain", "fitted", "grown", "lower", "grown-fitted", "auto"]
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a source's model.layers.N., a ZTT's layers.N.
ZTT = str(Path(sys.executable).parent / "ztt")
TRAINABLE = typing.get_args(FinetuneOptions.model_fields["trainable"].annotation)
SMOLLM2 = "smollm2-135m"
LOAD = ("import sys, torch; sys.path.pop(0); from pathlib import Path; from ztt_cli.io import sources; "
        "sources.load_model(Path(sys.argv[1]), torch.float32)")  # the cwd off sys.path: a --tree wins


def measure(cmd: list[str], log: Path, tree: Path | None = None) -> dict:
    """Run ``cmd`` in its own process under GNU time: exit status, wall time and its peak RSS, the larger of
    time's maximum resident set (%M, the process and the children it waited for) and the VmHWM read from
    /proc every SAMPLE_S. Under time, the process is forked from a small one: forked from this one, it
    would inherit this interpreter's high-water mark. ``tree``: a copy of the package to import ztt_cli from."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "120"}
    if tree is not None:  # the `ztt` script puts its own folder first on sys.path, not the cwd: the tree wins
        env["PYTHONPATH"] = str(tree)
    sampled, timed = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}, log.with_name(log.name + ".time")
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", str(timed), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
        while proc.poll() is None:
            for key, n in rss_parts(proc.pid).items():
                sampled[key] = max(sampled[key], n)
            time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    kernel = int(timed.read_text().split()[-1]) * 1024  # KiB; a failed command's line comes last
    result = {"cmd": shlex.join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2),
              "peak_rss_bytes": max(kernel, sampled["VmHWM"]), "peak_rss_time_bytes": kernel,
              "peak_hwm_bytes_sampled": sampled["VmHWM"], "peak_anon_bytes_sampled": sampled["RssAnon"],
              "peak_file_bytes_sampled": sampled["RssFile"]}
    if proc.returncode != 0:
        result["error"] = log.read_text()[-1500:]
        print(f"  failed ({proc.returncode}): {result['error'][-400:]}", flush=True)
    return result


def rss_parts(pid: int) -> dict[str, int]:
    """Resident memory now of ``pid``'s child (the command run under time): its high-water mark, anonymous
    (its own allocations) and file-backed (mapped files: the safetensors weights a lazy load maps, clean
    pages the kernel may drop), in bytes."""
    try:
        child = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0]
        lines = Path(f"/proc/{child}/status").read_text().splitlines()
    except (OSError, IndexError):
        return {}
    keys = ("VmHWM", "RssAnon", "RssFile")
    return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines) if k in keys}


def log_of(out: Path) -> Path:
    return out.parent / f"{out.name}.log"


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Every tensor's size in bytes, read from the safetensors headers only."""
    sizes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def checkpoint_stats(folder: Path) -> dict:
    """The checkpoint's size, its largest layer, what lies outside the layers (embeddings, head, final
    norm) and the goal: 3 × largest layer + embeddings + 0.7 GB."""
    sizes = tensor_bytes(folder)
    layers: dict[int, int] = {}
    for name, n in sizes.items():
        if m := LAYER.search(name):
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + n
    total = sum(sizes.values())
    outside = total - sum(layers.values())
    largest = max(layers.values(), default=0)
    return {"layers": len(layers), "checkpoint_bytes": total, "largest_layer_bytes": largest,
            "embeddings_bytes": outside, "goal_bytes": int(3 * largest + outside + GOAL_SLACK),
            "shards": len(list(folder.glob("*.safetensors")))}


def grown_layout(n_layers: int, drop: int) -> tuple[int, int, int]:
    """head = tail = L/6 and a two-cycle block of the rest of the L - N layers a drop of N keeps."""
    edge = max(1, n_layers // 6)
    return edge, n_layers - drop - 2 * edge, edge


def convert_cases(src: Path, n_layers: int, args) -> dict[str, list[str]]:
    drop = max(1, round(n_layers * args.drop_fraction))
    head, block, tail = grown_layout(n_layers, drop)
    cases = {
        "plain": (f"plain drop {drop}", ["--drop", str(drop), "--no-fit"]),
        "fitted": (f"fitted drop {drop}", ["--drop", str(drop), "--fit-tokens", str(args.fit_tokens)]),
        "grown": (f"grown {head}/{block}x2/{tail}", ["--init", "grow", "--head", str(head), "--block", str(block),
                                                     "--cycles", "2", "--tail", str(tail)]),
        "lower": ("ZTT, init lower", ["--init", "lower"]),  # a fixed init on the derived layout (L/3 each side)
        # the grown model fitted: the drop's maps (rank 8 where one lands on a block layer) and its added cycle
        # by gradient through the block (4 Adam steps: the peak is a step's, and 64 take an hour here)
        "grown-fitted": (f"grown {head}/{block}x2/{tail}, fitted",
                         ["--init", "grow", "--head", str(head), "--block", str(block), "--cycles", "2", "--tail",
                          str(tail), "--fit", "--relax-rank", "8", "--fit-tokens", str(args.fit_tokens),
                          "--fit-steps", "4"]),
        "auto": ("ZTT, init auto", ["--init", "auto"]),  # each strategy scored on the derived layout
    }
    commands = {label: [ZTT, "convert", str(src), *extra, "--overwrite"] for key, (label, extra) in cases.items()
                if key in args.cases}
    if "load" in args.cases:  # what loading the source alone holds, as convert loads it
        commands["load source"] = [sys.executable, "-c", LOAD, str(src)]
    return commands


def tree_of(args, path: str) -> Path | None:
    return Path(args.trees[path]["tree"]) if path in args.trees else None


def parse_pairs(specs: list[str]) -> dict[str, str]:
    return dict(spec.partition("=")[::2] for spec in specs)


def code_tree(where: str, work: Path) -> dict:
    """The copy of the package a path runs: a folder as it is, or a git revision exported once with
    `git archive` (read-only: the checkout is not touched) into WORK/trees/SHA."""
    if Path(where).is_dir():
        tree, commit = Path(where).resolve(), None
    else:
        commit = subprocess.run(["git", "rev-parse", where], capture_output=True, text=True, check=True).stdout.strip()
        tree = (work / "trees" / commit[:12]).resolve()
        if not (tree / "ztt_cli").is_dir():
            tree.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "archive", commit, "ztt_cli"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    found = subprocess.run([sys.executable, "-c", "import ztt_cli; print(ztt_cli.__file__)"], cwd="/",
                           env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True).stdout
    if not found.startswith(str(tree)):
        sys.exit(f"ztt_cli is not imported from {tree} (got {found.strip()})")
    return {"tree": str(tree), "commit": commit}


def path_options(tree: Path | None) -> list[str]:
    """The fields of ConvertOptions in ``tree`` (None: this checkout) that look like a choice of conversion
    path (none at the commit first measured)."""
    code = "from ztt_cli.stages import ConvertOptions as O; print(' '.join(O.model_fields))"
    env = {**os.environ, **({"PYTHONPATH": str(tree)} if tree else {})}
    fields = subprocess.run([sys.executable, "-c", code], cwd=tree or ".", env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    return [name for name in fields if re.search(r"stream|memory|lazy", name)]


def source_folder(name: str, args) -> Path:
    if name == SMOLLM2:
        from ztt_cli.io import sources

        return sources.find_source(SMOLLM2).folder
    if name in synthetic.PRESETS:
        return synthetic.build(args.synthetic / name, synthetic.PRESETS[name], seed=args.seed)
    return Path(name)  # any local Hugging Face folder


def with_ratios(row: dict, stats: dict) -> dict:
    peak = row["peak_rss_bytes"]
    row.update(peak_over_checkpoint=round(peak / stats["checkpoint_bytes"], 3),
               peak_over_goal=round(peak / stats["goal_bytes"], 3))
    return row


def run_converts(report: dict, args) -> None:
    """Every conversion case of every source, once per path, the paths alternating."""
    for name in args.sources:
        src = source_folder(name, args)
        stats = report["sources"][name] = checkpoint_stats(src)
        print(f"{name}: {stats['layers']} layers, {stats['checkpoint_bytes'] / GB:.2f} GB, goal "
              f"{stats['goal_bytes'] / GB:.2f} GB", flush=True)
        for case, cmd in convert_cases(src, stats["layers"], args).items():
            for path, extra in args.paths.items():
                out = args.work / "out" / re.sub(r"[^\w.]+", "-", f"{Path(name).name}-{case}-{path}")
                row = {"source": name, "case": case, "path": path, "layers": stats["layers"], "run": args.run}
                full = cmd if cmd[0] == sys.executable else [*cmd, *extra, "--out", str(out)]
                row.update(measure(full, log_of(out), tree_of(args, path)))
                report["convert"].append(with_ratios(row, stats))
                shutil.rmtree(out, ignore_errors=True)  # a few GB each: keep only the numbers
                print(f"  {case:22} {path:10} peak {row['peak_rss_bytes'] / GB:.2f} GB "
                      f"({row['peak_over_goal']:.2f}x goal) in {row['wall_s']:.0f} s", flush=True)
                save(report, args.out)


def ztt_for_healing(name: str, src: Path, args) -> Path:
    """The checkpoint healed: SmolLM2 as the demo converts it (10/5x2/10, init lower), any other source
    with the derived layout, init lower."""
    out = args.work / "heal" / f"{Path(name).name}-ztt"
    layout = ["--head", "10", "--block", "5", "--cycles", "2", "--tail", "10"] if name == SMOLLM2 else []
    if not (out / "config.json").is_file():
        row = measure([ZTT, "convert", str(src) if name != SMOLLM2 else SMOLLM2, "--out", str(out), *layout,
                       "--init", "lower", "--overwrite"], log_of(out), args.heal_tree)
        if row["rc"] != 0:
            sys.exit(f"cannot convert {name} for healing")
    return out


def run_heals(report: dict, args) -> None:
    """A few finetune steps per --trainable choice, the teacher (the source) in memory as by default."""
    for name in args.heal:
        ckpt = ztt_for_healing(name, source_folder(name, args), args)
        stats = report["heal_checkpoints"][name] = checkpoint_stats(ckpt)
        for trainable in args.trainable:
            out = args.work / "heal" / f"{Path(name).name}-{trainable.replace('+', '-')}"
            cmd = [ZTT, "finetune", str(ckpt), "--data", "shakespeare", "--out", str(out), "--steps",
                   str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", "1", "--trainable", trainable,
                   "--eval-every", "1000", "--save-every", "1000", "--val-batches", "1", "--overwrite"]
            row = {"source": name, "trainable": trainable, "run": args.run, **measure(cmd, log_of(out), args.heal_tree)}
            row["peak_over_checkpoint"] = round(row["peak_rss_bytes"] / stats["checkpoint_bytes"], 3)
            report["finetune"].append(row)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  heal {name} --trainable {trainable:10} peak {row['peak_rss_bytes'] / GB:.2f} GB in "
                  f"{row['wall_s']:.0f} s", flush=True)
            save(report, args.out)


def floor(args) -> dict:
    """What the interpreter with torch, transformers and both stages imported holds before any weights."""
    code = "import sys; sys.path.pop(0); import torch, transformers, ztt_cli.stages.convert, ztt_cli.stages.finetune"
    return measure([sys.executable, "-c", code], args.work / "floor.log", args.heal_tree)


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"), "python":
            platform.python_version(), "torch": torch.__version__, "commit": commit, "tracked_changes": bool(dirty),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def parts(row: dict) -> str:
    """The sampled peaks of anonymous and file-backed RSS (– for rows measured before they were sampled)."""
    if "peak_anon_bytes_sampled" not in row:
        return "–"
    return f"{row['peak_anon_bytes_sampled'] / GB:.2f} / {row['peak_file_bytes_sampled'] / GB:.2f} GB"


def table(report: dict) -> str:
    """The results as a markdown table: conversions against the goal, then healing."""
    lines = ["| source | layers | checkpoint | largest layer | outside layers | conversion | path | peak RSS | "
             "anon / file | peak / checkpoint | goal | peak / goal | wall |", "|" + "---|" * 13]
    for row in report["convert"]:
        s = report["sources"][row["source"]]
        lines.append(f"| {row['source']} | {row['layers']} | {s['checkpoint_bytes'] / GB:.2f} GB | "
                     f"{s['largest_layer_bytes'] / 1e6:.0f} MB | {s['embeddings_bytes'] / 1e6:.0f} MB | "
                     f"{row['case']} | {row['path']} | {row['peak_rss_bytes'] / GB:.2f} GB | {parts(row)} | "
                     f"{row['peak_over_checkpoint']:.2f}x | {s['goal_bytes'] / GB:.2f} GB | "
                     f"{row['peak_over_goal']:.2f}x | {row['wall_s']:.0f} s |")
    if report["finetune"]:
        lines += ["", "| healed | checkpoint | --trainable | peak RSS | anon / file | peak / checkpoint | wall |",
                  "|" + "---|" * 7]
        for row in report["finetune"]:
            size = report["heal_checkpoints"][row["source"]]["checkpoint_bytes"]
            lines.append(f"| {row['source']} | {size / GB:.2f} GB | {row['trainable']} | "
                         f"{row['peak_rss_bytes'] / GB:.2f} GB | {parts(row)} | {row['peak_over_checkpoint']:.2f}x | "
                         f"{row['wall_s']:.0f} s |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="*", default=["llama-8x1024", "llama-16x1024", "llama-1.25gb",
                                                     "llama-32x1024", "llama-48x1024"],
                    help=f"presets of bench/synthetic.py ({', '.join(synthetic.PRESETS)}) or local folders")
    ap.add_argument("--cases", nargs="*", default=CASES[:4], choices=CASES)
    ap.add_argument("--drop-fraction", type=float, default=1 / 3, help="layers dropped (24 layers: 8)")
    ap.add_argument("--fit-tokens", type=int, default=4096, help="calibration tokens of the fitted drop "
                    "(ztt's default is 32768: 8x the time on a 2-core CPU)")
    ap.add_argument("--path", dest="paths", action="append", metavar="LABEL=ARGS",
                    help="a conversion path: LABEL and the convert arguments that choose it (default: head=)")
    ap.add_argument("--tree", dest="trees", action="append", metavar="LABEL=REV|DIR",
                    help="path LABEL runs ztt from git revision REV (exported) or a package copy DIR; a path "
                    "without one runs this checkout as it stands (default: head=HEAD)")
    ap.add_argument("--heal", nargs="*", default=[SMOLLM2, "llama-8x1024"], help="sources healed per --trainable")
    ap.add_argument("--trainable", nargs="*", default=list(TRAINABLE), choices=list(TRAINABLE))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic sources")
    ap.add_argument("--synthetic", type=Path, default=Path("runs/synthetic"), help="where the sources are built")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    ap.add_argument("--merge", action="store_true", help="add this run's rows to --out's instead of replacing it")
    args = ap.parse_args()
    if not args.paths:
        args.paths, args.trees = ["head="], args.trees or ["head=HEAD"]
    args.paths = {label: shlex.split(extra) for label, extra in parse_pairs(args.paths).items()}
    args.trees = {label: code_tree(where, args.work) for label, where in parse_pairs(args.trees or []).items()}
    args.heal_tree = tree_of(args, next(iter(args.paths)))  # healing and the floor run the first path's code
    return args


def new_run(args) -> dict:
    paths = {label: {"args": shlex.join(extra), **args.trees.get(label, {"tree": "this checkout as it stands"})}
             for label, extra in args.paths.items()}
    for label, path in paths.items():
        path["path_options_in_convert"] = path_options(Path(path["tree"]) if label in args.trees else None)
    found = [name for path in paths.values() for name in path["path_options_in_convert"]]
    note = ("one conversion path measured: ztt convert there has no option choosing in-memory or streaming"
            if not found and len(args.paths) == 1 else "")
    return {"meta": machine(), "config": {k: str(v) for k, v in vars(args).items() if k not in ("paths", "trees")},
            "paths": paths, "note": note, "floor": floor(args)}


def main() -> None:
    args, start = parse_args(), time.perf_counter()
    (args.work / "out").mkdir(parents=True, exist_ok=True)
    (args.work / "heal").mkdir(parents=True, exist_ok=True)
    run = new_run(args)
    if args.merge and args.out.is_file():  # a later run's rows added to the file's, tagged with its number
        report = json.loads(args.out.read_text())
        report.setdefault("merged_runs", []).append(run)
        args.run = len(report["merged_runs"])
    else:
        report = {**run, "goal": "peak <= 3 x largest layer + outside-layer tensors (embeddings, head, norm) + 0.7 GB",
                  "sources": {}, "convert": [], "heal_checkpoints": {}, "finetune": []}
        args.run = 0
    print(f"floor (python + torch + ztt imported): {run['floor']['peak_rss_bytes'] / GB:.2f} GB", flush=True)
    run_converts(report, args)
    run_heals(report, args)
    run["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    save(report, args.out)
    print(table(report))


if __name__ == "__main__":
    main()
