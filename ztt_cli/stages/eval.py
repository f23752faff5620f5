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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..device import resolve_device, synchronize
from ..errors import ZTTError
from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import check_writable, load_checkpoint, write_json
from ..io.provenance import Card, CardSection, append_stage, now, versions
from ..model.signals import ExitPolicy
from . import EvalOptions

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
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
                hint="hub tasks download their data; offline, put a local task YAML in a folder and pass "
                     "--include-path",
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
                raise EvalError(f"no such file for task '{name}': '{path}'",
                                hint=f"--tasks {kind}:PATH takes a local file")
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

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)  # rolling asks for a bar

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
class TaskReport:
    """One task's entry in eval.json."""

    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    samples: int
    mean_cycles: float
    compute_speedup: float
    tokens: int
    tokens_per_s: float
    forward_s: float
    wall_s: float
    source: dict | None = None  # the source's metrics and speed, with --compare
    recovery: dict[str, float] | None = None


def _score_tasks(lm, tasks: Tasks, opts: EvalOptions, label: str, progress: Progress,
                 layout=None) -> dict[str, TaskReport]:
    """Each task scored with lm-eval, metered; cycles and compute speedup from ``layout`` (a ZTT model)."""
    import lm_eval

    scores = {}
    for name in tasks.names:
        progress(Event.status(f"{label}: {name}"))
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
            mean_layers = lm.layers / max(lm.tokens, 1)
            scores[task_name if len(res["results"]) > 1 else name] = TaskReport(
                metrics, hib, n, layout.cycles_run(mean_layers) if layout else 1.0,
                layout.depth / mean_layers if layout else 1.0, lm.tokens, lm.tokens / max(lm.seconds, 1e-9),
                lm.seconds, wall,
            )
    return scores


def recovery(ztt: TaskReport, source: TaskReport) -> dict[str, float]:
    """Per metric: ZTT / source where higher is better, source / ZTT where lower is: ≥ 1 is no loss."""
    ratios = {}
    for metric, value in ztt.metrics.items():
        if metric not in source.metrics or metric not in ztt.higher_is_better:
            continue
        ref = source.metrics[metric]
        num, den = (value, ref) if ztt.higher_is_better[metric] else (ref, value)
        ratios[metric] = num / den if den != 0 else (1.0 if num == 0 else math.inf)
    return ratios


@dataclass
class Gate:
    min_recovery: float
    metrics: list[str] | str
    worst: dict | None
    passed: bool


@dataclass
class EvalReport:
    """What eval.json holds."""

    checkpoint: str
    time: str
    lm_eval: str
    versions: dict
    device: str
    exit_threshold: float
    exit_signal: str
    layout: str
    options: dict
    tasks: dict[str, TaskReport] = field(default_factory=dict)
    source: dict | None = None
    gate: Gate | None = None
    written_to: str = ""

    def to_json(self) -> dict:
        report = {k: v for k, v in asdict(self).items() if v is not None and k != "written_to"}
        for entry in report["tasks"].values():
            for key in ("source", "recovery"):
                if entry[key] is None:
                    del entry[key]
        return report

    def summary(self) -> dict:
        tasks = {name: {"metrics": t.metrics, "recovery": t.recovery, "compute_speedup": t.compute_speedup,
                        "tokens_per_s": t.tokens_per_s,
                        "source_tokens_per_s": t.source["tokens_per_s"] if t.source else None}
                 for name, t in self.tasks.items()}
        return {"tasks": tasks, "gate": asdict(self.gate) if self.gate else None}


def summary_line(s: dict) -> str:
    parts = []
    for task, t in s.get("tasks", {}).items():
        recovery = t.get("recovery") or {}
        m = ", ".join(f"{k} {v:.4g}" + (f" (rec. {recovery[k]:.3f})" if k in recovery else "")
                      for k, v in t["metrics"].items())
        parts.append(f"{task}: {m}")
    if gate := s.get("gate"):
        parts.append(f"gate ≥ {gate['min_recovery']}: {'passed' if gate['passed'] else 'FAILED'}")
    return "\n".join(parts)


def card_section(card: Card) -> CardSection:
    """The latest scores, with their recovery against the source and the gate."""
    ev = card.last("eval")
    if not ev:
        return CardSection()
    lines = ["", "## Evaluation (lm-evaluation-harness)", "", "| task | metric | value | recovery vs source |",
             "|---|---|---|---|"]
    recovery = ev.get("recovery") or {}
    for task, metrics in ev.get("metrics", {}).items():
        for metric, value in metrics.items():
            r = recovery.get(task, {}).get(metric)
            lines.append(f"| {task} | {metric} | {value:.4g} | {'' if r is None else f'{r:.3f}'} |")
    if g := ev.get("gate"):
        lines += ["", f"Recovery gate ≥ {g['min_recovery']}: {'passed' if g['passed'] else 'failed'}."]
    return CardSection(body=tuple(lines))


def _check(opts: EvalOptions, progress: Progress) -> tuple[Tasks, object]:
    """Everything that can be refused before scoring: tasks, output, gated metrics, the source."""
    names = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    if not names:
        raise EvalError("no tasks given", hint="--tasks ztt_shakespeare_ppl,ztt_docutils_cloze")
    progress(Event.status("checking the tasks"))
    tasks = resolve_tasks(names, opts.include_path)
    if opts.output is not None:
        check_writable(opts.output)
    if opts.gate_metrics:  # fail before scoring if the gate names a metric no task reports
        known = {m for name in names for task in tasks.load(name) for m in task._metric_fn_list}
        unknown = sorted(opts.gated_metrics - known)
        if unknown:
            raise EvalError(f"--gate-metrics {', '.join(unknown)}: no requested task reports it",
                            hint=f"these tasks report: {', '.join(sorted(known))}")
    # found now to fail fast: a missing path, an offline hub
    source_ref = sources.find_source(opts.compare) if opts.compare else None
    return tasks, source_ref


def _compare(report: EvalReport, lm_class, tasks: Tasks, opts: EvalOptions,
             source_ref, device, progress: Progress) -> None:
    """Score the source on the same tasks: its numbers, each metric's recovery, and the gate."""
    progress(Event.status(f"loading the source {source_ref.ref}"))
    src_model = sources.load_model(source_ref.folder, torch.float32).eval().to(device)
    src_lm = lm_class(pretrained=src_model, tokenizer=sources.load_tokenizer(source_ref.folder),
                      batch_size=opts.batch_size, max_length=opts.max_length)
    report.source = {"ref": source_ref.ref, "params": sum(p.numel() for p in src_model.parameters())}
    worst = None
    for name, s in _score_tasks(src_lm, tasks, opts, "source", progress).items():
        entry = report.tasks[name]
        entry.source = {"metrics": s.metrics, "tokens": s.tokens, "tokens_per_s": s.tokens_per_s,
                        "forward_s": s.forward_s, "wall_s": s.wall_s}
        entry.recovery = recovery(entry, s)
        for metric, r in entry.recovery.items():
            gated = opts.gated_metrics is None or metric in opts.gated_metrics
            if gated and (worst is None or r < worst[2]):
                worst = (name, metric, r)
    if opts.min_recovery is not None:
        report.gate = Gate(opts.min_recovery, sorted(opts.gated_metrics) if opts.gated_metrics else "all",
                           {"task": worst[0], "metric": worst[1], "recovery": worst[2]} if worst else None,
                           worst is None or worst[2] >= opts.min_recovery)


def evaluate(opts: EvalOptions, progress: Progress = silent) -> EvalReport:
    import lm_eval

    device = resolve_device(opts.device)
    model = load_checkpoint(opts.checkpoint).eval().to(device)  # one clear error for a missing or foreign folder
    tasks, source_ref = _check(opts, progress)
    policy = ExitPolicy.for_checkpoint(model.config, opts.threshold, opts.full_depth)
    policy.check(model.pool is not None, remedies=("full_depth",))
    lm_class = _metered_lm_class()
    lm = lm_class(pretrained=model, tokenizer=sources.load_tokenizer(opts.checkpoint),
                  batch_size=opts.batch_size, max_length=opts.max_length)
    lay = model.config.layout
    with model.exiting(policy):  # lm-eval calls the model itself
        scores = _score_tasks(lm, tasks, opts, "ztt", progress, layout=lay)
    report = EvalReport(str(opts.checkpoint), now(), lm_eval.__version__, versions(), str(model.device),
                        policy.threshold, policy.signal, str(lay), opts.model_dump(mode="json"), scores)
    del model, lm
    if source_ref is not None:
        _compare(report, lm_class, tasks, opts, source_ref, device, progress)
    _write(opts, report)
    return report


def _write(opts: EvalOptions, report: EvalReport) -> None:
    out = opts.output or opts.checkpoint / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report.to_json())
    report.written_to = str(out)
    metrics = {name: t.metrics for name, t in report.tasks.items()}
    recoveries = {name: t.recovery for name, t in report.tasks.items() if t.recovery is not None} or None
    append_stage(opts.checkpoint, "eval", report.options, metrics,
                 versions={**report.versions, "lm_eval": report.lm_eval}, recovery=recoveries,
                 gate=asdict(report.gate) if report.gate else None, results=str(out))
