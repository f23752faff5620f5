"""``ztt eval``: score a checkpoint with lm-evaluation-harness, early exit active, and gate it.

The model goes to lm-eval as an object (lm-eval's own Hugging Face wrapper, ``HFLM``, given the
loaded model and tokenizer: it never downloads a stand-in). ``MeteredLM`` adds only a meter
around each forward pass: real tokens, seconds, and for ZTT models the cycles each token ran.
Tasks run one ``simple_evaluate`` call each so that the meter is per task. ``--compare SRC``
scores a source model on the same tasks in the same run; the recovery ratio of every metric
is oriented by lm-eval's ``higher_is_better`` so that ≥ 1 means "as good as the source"."""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import resolve_device, synchronize
from ..errors import ZTTError
from ..io import sources
from ..io.checkpoint import PROVENANCE, load_checkpoint, now, read_provenance, versions, write_json
from ..options import EvalOptions

Progress = Callable[[str], None]
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
NEVER = 2.0  # an exit threshold above 1: full depth
SPEC_TASKS = {"text": "ztt_text_ppl", "mc": "ztt_mc"}  # --tasks text:PATH / mc:PATH


class EvalError(ZTTError):
    """A task cannot be found, read or built."""


# ---------------------------------------------------------------- task data (used by tasks/ztt_tasks.py)


def text_documents(path: str | None, text_field: str = "text") -> list[dict]:
    from ..io.data import load_documents

    if not path:
        raise EvalError("the task ztt_text_ppl needs a text file", hint="use --tasks text:PATH")
    return [{"name": d.name, "text": d.text} for d in load_documents(path, text_field)]


def mc_questions(path: str | None) -> list[dict]:
    """Questions from a JSONL file, one {"question", "choices", "answer"} object per line, checked."""
    if not path:
        raise EvalError("the task ztt_mc needs a JSONL file", hint="use --tasks mc:PATH")
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"no such multiple-choice file: '{path}'", hint="give a JSONL file, one question per line")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not JSON ({e.msg})", hint="one JSON object per line") from None
        ok = (
            isinstance(row, dict) and isinstance(row.get("question"), str)
            and isinstance(row.get("choices"), list) and len(row["choices"]) >= 2
            and all(isinstance(c, str) and c for c in row["choices"])
            and isinstance(row.get("answer"), int) and 0 <= row["answer"] < len(row["choices"])
        )
        if not ok:
            raise EvalError(
                f"{where}: expected {{\"question\": str, \"choices\": [2+ strings], \"answer\": index}}",
                hint="see ztt_cli/tasks/ztt_mc.yaml for the format",
            )
        rows.append({"question": row["question"], "choices": row["choices"], "answer": row["answer"]})
    if not rows:
        raise EvalError(f"'{path}' holds no questions", hint="one JSON object per line")
    return rows


# ---------------------------------------------------------------- tasks


def _quiet() -> None:
    # lm-eval's progress bars: tqdm reads TQDM_DISABLE when imported, so the CLI sets it first;
    # its loggers are quietened here
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_include_path(path: Path) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_dir():
        raise EvalError(f"no such task folder: '{path}'", hint="--include-path takes a folder of lm-eval task YAMLs")
    for yaml_path in sorted(path.rglob("*.yaml")):
        try:
            cfg = load_yaml(yaml_path, resolve_func=False)
        except Exception as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalError(f"malformed task YAML '{yaml_path}': {problem}", hint="fix or remove the file") from None
        if "task" not in cfg and "group" not in cfg:
            raise EvalError(f"task YAML '{yaml_path}' has no 'task:' name", hint="every task file names its task")


@dataclass
class Tasks:
    """The requested tasks, checked up front: ``spec(name)`` gives what ``TaskManager.load`` takes."""

    manager: object
    names: list[str]
    specs: dict[str, object] = field(default_factory=dict)

    def load(self, name: str):
        try:
            loaded = self.manager.load([self.specs[name]])
        except ZTTError:
            raise
        except Exception as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalError(
                f"cannot build the task '{name}' ({type(e).__name__}: {problem[:200]})",
                hint="hub tasks download their data; offline, put a local task YAML in a folder and pass --include-path",
            ) from None
        return list(loaded["tasks"].values())


def resolve_tasks(names: list[str], include_path: Path | None) -> Tasks:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    _quiet()
    if include_path is not None:
        _check_include_path(include_path)
    paths = [TASKS_DIR] + ([include_path] if include_path else [])
    own = TaskManager(include_path=paths, include_defaults=False)
    needs_defaults = any(n not in own.all_tasks and n.split(":")[0] not in SPEC_TASKS for n in names)
    manager = TaskManager(include_path=paths) if needs_defaults else own
    tasks = Tasks(manager, names)
    for name in names:
        kind, _, path = name.partition(":")
        if kind in SPEC_TASKS and path:
            cfg = load_yaml(TASKS_DIR / f"{SPEC_TASKS[kind]}.yaml", resolve_func=True)
            if not Path(path).expanduser().exists():
                raise EvalError(f"no such file for task '{name}': '{path}'", hint=f"--tasks {kind}:PATH takes a local file")
            tasks.specs[name] = {**cfg, "task": name, "dataset_kwargs": {"path": path}}
        elif name in manager.all_tasks:
            tasks.specs[name] = name
        else:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            ours = ", ".join(sorted(t for t in own.all_tasks if t.startswith("ztt_")))
            raise EvalError(
                f"unknown task '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                hint=f"built in: {ours}, text:PATH, mc:PATH; add your own YAMLs with --include-path",
            )
    return tasks


# ---------------------------------------------------------------- model


def _metered_lm_class():
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class MeteredLM(HFLM):
        """lm-eval's HFLM plus a meter: real tokens, forward seconds, layers run per token."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reset_meter()

        # the caller reports progress: lm-eval's own bars stay off
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def reset_meter(self) -> None:
            self.seconds, self.tokens, self.layers = 0.0, 0, 0.0

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            # HFLM right-pads with zeros: a row's real tokens end at its last non-zero id
            idx = torch.arange(inps.shape[1], device=inps.device)
            real = idx[None] <= torch.where(inps != 0, idx, -1).max(1, keepdim=True).values
            synchronize(self.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model(inps)
            synchronize(self.device)
            self.seconds += time.perf_counter() - t0
            self.tokens += int(real.sum())
            cfg = self.model.config
            if getattr(out, "exit_cycles", None) is not None:
                per_token = cfg.layout.layers_run(out.exit_cycles.double())
            else:  # no exits: every token runs the whole (unrolled) depth
                depth = cfg.layout.depth if cfg.model_type == "ztt" else cfg.num_hidden_layers
                per_token = torch.full(inps.shape, float(depth), dtype=torch.float64)
            self.layers += float(per_token.to(real.device)[real].sum())
            return out.logits

    try:
        register_model("ztt")(MeteredLM)
    except (AssertionError, ValueError):  # already registered by an earlier call
        pass
    return MeteredLM


@dataclass
class TaskScore:
    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    tokens: int
    tokens_per_s: float
    forward_s: float
    wall_s: float
    mean_layers: float
    n_samples: int


def _score_tasks(lm, tasks: Tasks, opts: EvalOptions, label: str, progress: Progress) -> dict[str, TaskScore]:
    import lm_eval

    scores = {}
    for name in tasks.names:
        progress(f"{label}: {name}")
        built = tasks.load(name)
        lm.reset_meter()
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm, tasks=built, num_fewshot=opts.num_fewshot, limit=opts.limit_for(name), log_samples=False,
            bootstrap_iters=opts.bootstrap_iters, random_seed=opts.seed, numpy_random_seed=opts.seed,
            torch_random_seed=opts.seed, fewshot_random_seed=opts.seed, task_manager=tasks.manager,
        )
        wall = time.perf_counter() - t0
        for task_name, values in res["results"].items():
            metrics = {
                k.split(",")[0]: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and "_stderr" not in k and k.split(",")[0] not in ("alias", "sample_len")
            }
            hib = {k: bool(v) for k, v in res["higher_is_better"].get(task_name, {}).items() if k in metrics}
            n = res.get("n-samples", {}).get(task_name, {}).get("effective", 0)
            scores[task_name if len(res["results"]) > 1 else name] = TaskScore(
                metrics, hib, lm.tokens, lm.tokens / max(lm.seconds, 1e-9), lm.seconds, wall,
                lm.layers / max(lm.tokens, 1), n,
            )
    return scores


def recovery(ztt: TaskScore, source: TaskScore) -> dict[str, float]:
    """Per metric: ZTT / source where higher is better, source / ZTT where lower is: ≥ 1 is no loss."""
    ratios = {}
    for metric, value in ztt.metrics.items():
        if metric not in source.metrics or metric not in ztt.higher_is_better:
            continue
        ref = source.metrics[metric]
        num, den = (value, ref) if ztt.higher_is_better[metric] else (ref, value)
        ratios[metric] = num / den if den != 0 else (1.0 if num == 0 else math.inf)
    return ratios


def evaluate(opts: EvalOptions, progress: Progress = lambda m: None) -> dict:
    import lm_eval

    device = resolve_device(opts.device)
    model = load_checkpoint(opts.checkpoint).eval().to(device)  # one clear error for a missing or foreign folder
    names = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    if not names:
        raise EvalError("no tasks given", hint="--tasks ztt_shakespeare_ppl,ztt_docutils_cloze")
    progress("checking the tasks")
    tasks = resolve_tasks(names, opts.include_path)
    if opts.output is not None:
        from ..io.checkpoint import check_writable

        check_writable(opts.output)
    if opts.gate_metrics:  # fail before scoring if the gate names a metric no task reports
        known = {m for name in names for task in tasks.load(name) for m in task._metric_fn_list}
        unknown = sorted(opts.gated_metrics - known)
        if unknown:
            raise EvalError(f"--gate-metrics {', '.join(unknown)}: no requested task reports it",
                            hint=f"these tasks report: {', '.join(sorted(known))}")
    source_ref = None
    if opts.compare:
        source_ref = sources.resolve(opts.compare)  # fails fast: missing path, offline hub

    threshold = NEVER if opts.full_depth else (opts.threshold if opts.threshold is not None else model.config.exit_threshold)
    model.config.exit_threshold = threshold
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    MeteredLM = _metered_lm_class()
    lm_args = dict(tokenizer=tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    ztt_scores = _score_tasks(MeteredLM(pretrained=model, **lm_args), tasks, opts, "ztt", progress)
    depth = model.config.layout.depth
    report = {
        "checkpoint": str(opts.checkpoint), "time": now(), "lm_eval": lm_eval.__version__,
        "versions": versions(), "device": str(model.device), "exit_threshold": threshold,
        "exit_signal": model.config.exit_signal, "layout": str(model.config.layout),
        "options": opts.model_dump(mode="json"), "tasks": {},
    }
    for name, s in ztt_scores.items():
        report["tasks"][name] = {
            "metrics": s.metrics, "higher_is_better": s.higher_is_better, "samples": s.n_samples,
            "mean_cycles": model.config.layout.cycles_run(s.mean_layers),
            "compute_speedup": depth / s.mean_layers, "tokens": s.tokens, "tokens_per_s": s.tokens_per_s,
            "forward_s": s.forward_s, "wall_s": s.wall_s,
        }
    del model
    if source_ref is not None:
        progress(f"loading the source {source_ref.ref}")
        src_model = sources.load_model(source_ref.folder, torch.float32).eval().to(device)
        src_tok = sources.load_tokenizer(source_ref.folder)
        src_lm = MeteredLM(pretrained=src_model, **{**lm_args, "tokenizer": src_tok})
        src_scores = _score_tasks(src_lm, tasks, opts, "source", progress)
        report["source"] = {"ref": source_ref.ref, "params": sum(p.numel() for p in src_model.parameters())}
        worst = None
        for name, s in src_scores.items():
            entry = report["tasks"].setdefault(name, {})
            ratios = recovery(ztt_scores[name], s) if name in ztt_scores else {}
            entry["source"] = {"metrics": s.metrics, "tokens": s.tokens, "tokens_per_s": s.tokens_per_s,
                               "forward_s": s.forward_s, "wall_s": s.wall_s}
            entry["recovery"] = ratios
            for metric, r in ratios.items():
                if opts.gated_metrics is not None and metric not in opts.gated_metrics:
                    continue
                if worst is None or r < worst[2]:
                    worst = (name, metric, r)
        if opts.min_recovery is not None:
            report["gate"] = {
                "min_recovery": opts.min_recovery, "metrics": sorted(opts.gated_metrics) if opts.gated_metrics else "all",
                "worst": {"task": worst[0], "metric": worst[1], "recovery": worst[2]} if worst else None,
                "passed": worst is None or worst[2] >= opts.min_recovery,
            }
    _write(opts, report)
    return report


def _write(opts: EvalOptions, report: dict) -> None:
    out = opts.output or opts.checkpoint / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    report["written_to"] = str(out)
    prov = read_provenance(opts.checkpoint)
    prov.setdefault("stages", []).append({
        "stage": "eval", "time": report["time"], "options": report["options"],
        "versions": {**report["versions"], "lm_eval": report["lm_eval"]},
        "metrics": {name: t.get("metrics", {}) for name, t in report["tasks"].items()},
        "recovery": {name: t["recovery"] for name, t in report["tasks"].items() if "recovery" in t} or None,
        "gate": report.get("gate"), "results": str(out),
    })
    write_json(opts.checkpoint / PROVENANCE, prov)
