"""`ztt finetune` on tiny models: learning, exact resume, faults, torchrun, the exit terms."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ztt_cli.cli import app
from ztt_cli.errors import ZTTError
from ztt_cli.io.data import prepare
from ztt_cli.io.sources import load_tokenizer
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import (
    TrainingStopped,
    finetune,
    partial_dir,
    pipeline_options,
    summary_line,
)
from ztt_cli.training.losses import HealingObjective
from ztt_cli.training.quality import exit_signal_correlation

from .fixtures import corpus, save_source

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Converted tiny GPT-2 and Llama checkpoints (layout 2/1×2/2) and training text, shared by the module."""
    root = tmp_path_factory.mktemp("finetune")
    os.environ["ZTT_CACHE"] = str(root / "cache")
    for family in ("gpt2", "llama"):
        src = save_source(family, root / f"src-{family}")
        convert(ConvertOptions(source=str(src), out=root / f"ztt-{family}", init="lower"))
    (root / "train.txt").write_text("\n\n".join(corpus(40, seed=i) for i in range(10)))
    (root / "repeat.txt").write_text("\n\n".join(["The storm is come upon the island and the king doth sleep."] * 200))
    return root


def opts(workdir, out, family="gpt2", **kw):
    base = dict(checkpoint=workdir / f"ztt-{family}", data=str(workdir / "train.txt"), out=out, seq_len=32,
                batch_size=4, steps=12, log_every=1, eval_every=1000, save_every=4, seed=0)
    return FinetuneOptions(**{**base, **kw})


def log_of(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_run(a, b):
    """Two runs that differ only in how the arithmetic is arranged (ranks, recomputation).

    Losses agree closely; weights agree up to Adam turning float-level gradient noise on
    near-zero entries into learning-rate-sized steps."""
    la = [r["loss"] for r in log_of(a) if r["event"] == "step"]
    lb = [r["loss"] for r in log_of(b) if r["event"] == "step"]
    assert la == pytest.approx(lb, rel=1e-4)
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert (wa[k] - wb[k]).abs().mean() < 2e-4, k


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_falls_on_repetitive_text(workdir, tmp_path, family):
    out = tmp_path / "out"
    finetune(opts(workdir, out, family, data=str(workdir / "repeat.txt"), steps=40, lr=2e-3, val_fraction=0,
                  no_teacher=True))
    losses = [r["ce"] for r in log_of(out) if r["event"] == "step"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    prov = json.loads((out / "ztt.json").read_text())
    assert [s["stage"] for s in prov["stages"]] == ["convert", "finetune"]
    assert prov["stages"][1]["metrics"]["steps"] == 40
    assert not partial_dir(out).exists()
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).config.cycles, int)


def test_resume_after_a_clean_stop_equals_an_uninterrupted_run(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "a"))
    stopped = finetune(opts(workdir, tmp_path / "b", stop_at_step=5))
    assert stopped.stopped_early and stopped.steps == 5 and not (tmp_path / "b").exists()
    finetune(opts(workdir, tmp_path / "b", resume=True))
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    steps = [r["step"] for r in log_of(tmp_path / "b") if r["event"] == "step"]
    assert steps == list(range(1, 13))


def _first_release_format(run_dir: Path) -> None:
    """Rewrite a saved trainer.json as the first release wrote it: no format, no parameter names."""
    meta_path = run_dir / "checkpoint" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    for key in ("format", "groups", "ztt"):
        del meta[key]
    meta_path.write_text(json.dumps(meta))


def test_a_checkpoint_without_a_format_resumes_to_the_same_result(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "a"))
    finetune(opts(workdir, tmp_path / "b", stop_at_step=5))
    meta = json.loads((partial_dir(tmp_path / "b") / "checkpoint" / "trainer.json").read_text())
    assert meta["format"] == 2 and [g["name"] for g in meta["groups"]] == ["weights", "pool"]
    assert [len(g["params"]) for g in meta["groups"]] == [len(g["params"]) for g in meta["param_groups"]]
    _first_release_format(partial_dir(tmp_path / "b"))
    finetune(opts(workdir, tmp_path / "b", resume=True))
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def _cli_args(workdir, out, *extra):
    """The command line of ``opts(workdir, out)``."""
    return ["finetune", str(workdir / "ztt-gpt2"), "--data", str(workdir / "train.txt"), "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--steps", "12", "--log-every", "1", "--eval-every", "1000",
            "--save-every", "4", *extra]


def test_an_interrupted_run_of_the_first_release_resumes_through_the_command_line(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "out", stop_at_step=5))
    _first_release_format(partial_dir(tmp_path / "out"))
    result = runner.invoke(app, _cli_args(workdir, tmp_path / "out", "--resume"), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file() and not partial_dir(tmp_path / "out").exists()
    assert [r["step"] for r in log_of(tmp_path / "out") if r["event"] == "step"] == list(range(1, 13))


@pytest.mark.parametrize("change", ["one parameter fewer", "renamed parameter", "renamed group"])
def test_a_different_parameter_grouping_refuses_to_resume(workdir, tmp_path, change):
    finetune(opts(workdir, tmp_path / "out", stop_at_step=4))
    meta_path = partial_dir(tmp_path / "out") / "checkpoint" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    weights = meta["groups"][0]
    if change == "one parameter fewer":
        weights["params"] = weights["params"][1:]
    elif change == "renamed parameter":
        weights["params"][3] = "layers.9.renamed.weight"
    else:
        weights["name"] = "block"
    meta_path.write_text(json.dumps(meta))
    saved = meta_path.read_bytes()
    result = runner.invoke(app, _cli_args(workdir, tmp_path / "out", "--resume"), env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer state" in lines[0] and "does not match" in lines[0], result.stderr
    assert "hint:" in lines[0] and "--overwrite" in lines[0]
    assert meta_path.read_bytes() == saved and not (tmp_path / "out").exists()


def test_progress_events_follow_the_log(workdir, tmp_path):
    events = []
    result = finetune(opts(workdir, tmp_path / "out", steps=4, eval_every=2, save_every=3), progress=events.append)
    kinds = [e.kind for e in events]
    begin = kinds.index("start")
    assert begin > 0 and set(kinds[:begin]) == {"status"} and kinds.count("start") == 1
    start = events[begin]
    assert (start.step, start.total) == (0, 4)
    assert set(start.metrics) == {"train_blocks", "val_blocks", "world", "train_tokens"} and start.metrics["world"] == 1
    # the log's order, kinds renamed, and the same numbers as its lines
    log = log_of(tmp_path / "out")
    assert kinds[begin + 1 :] == [{"val": "validation"}.get(r["event"], r["event"]) for r in log]
    for event, record in zip(events[begin + 1 :], log):
        assert event.step == record["step"]
        numbers = {k: v for k, v in record.items() if k not in ("event", "step", "total")}
        assert dict(event.metrics) == numbers
        assert event.total == (4 if event.kind == "step" else None)
    assert [e.step for e in events if e.kind == "validation"] == [2, 4]
    assert [e.step for e in events if e.kind == "checkpoint"] == [3]
    assert "tokens" in events[begin + 1].metrics and "grad_norm" in events[begin + 1].metrics
    summary = result.summary()
    assert summary == {"steps": 4, "tokens": 4 * 4 * 32, "val_loss": result.metrics["val_loss"],
                       "val_ppl": result.metrics["val_ppl"]}
    assert summary_line(summary) == f"4 steps, 512 tokens, validation perplexity {summary['val_ppl']:.2f}"
    assert summary_line({"steps": 3, "tokens": 1234567}) == "3 steps, 1,234,567 tokens"


def test_pipeline_options_resume_an_unfinished_run_with_the_same_options(workdir, tmp_path):
    fresh = pipeline_options(opts(workdir, tmp_path / "out"))
    assert (fresh.resume, fresh.overwrite) == (False, True)
    finetune(opts(workdir, tmp_path / "out", stop_at_step=2))
    again = pipeline_options(opts(workdir, tmp_path / "out"))
    assert (again.resume, again.overwrite) == (True, False)
    changed = pipeline_options(opts(workdir, tmp_path / "out", lr=1e-3))
    assert (changed.resume, changed.overwrite) == (False, True)


def _cli(*args):
    return [sys.executable, "-m", "ztt_cli", *map(str, args)]


def _wait_for_checkpoint(run_dir: Path, proc, at_least: int, timeout=120):
    meta = run_dir / "checkpoint" / "trainer.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if meta.is_file():
            try:
                if json.loads(meta.read_text())["step"] >= at_least:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def _subprocess_args(workdir, out, steps):
    return ["finetune", workdir / "ztt-gpt2", "--data", workdir / "train.txt", "--out", out, "--seq-len", 64,
            "--batch-size", 8, "--steps", steps, "--log-every", 1, "--eval-every", 1000, "--save-every", 3]


def test_resume_after_kill_9_equals_an_uninterrupted_run(workdir, tmp_path):
    args = _subprocess_args(workdir, tmp_path / "b", 300)
    env = {**os.environ, "ZTT_CACHE": os.environ["ZTT_CACHE"]}
    proc = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(partial_dir(tmp_path / "b"), proc, at_least=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()
    done = subprocess.run(_cli(*args, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    finetune(FinetuneOptions(checkpoint=workdir / "ztt-gpt2", data=str(workdir / "train.txt"), out=tmp_path / "a",
                             seq_len=64, batch_size=8, steps=300, log_every=1, eval_every=1000, save_every=3))
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)


def test_ctrl_c_saves_and_resume_completes(workdir, tmp_path):
    args = _subprocess_args(workdir, tmp_path / "b", 300)
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(partial_dir(tmp_path / "b"), proc, at_least=3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    saved = json.loads((partial_dir(tmp_path / "b") / "checkpoint" / "trainer.json").read_text())["step"]
    assert saved >= 3
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "config.json").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = HealingObjective.forward

    def poisoned(self, ids, teacher_logits=None, teacher_states=None):
        loss, metrics = original(self, ids, teacher_logits, teacher_states)
        calls["n"] += 1
        if calls["n"] > 6:
            loss = loss * float("nan")
            metrics["loss"] = loss.detach()
        return loss, metrics

    monkeypatch.setattr(HealingObjective, "forward", poisoned)
    with pytest.raises(TrainingStopped, match="NaN or infinite at step 7"):
        finetune(opts(workdir, tmp_path / "out", save_every=2))
    run = partial_dir(tmp_path / "out")
    assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == 6
    assert not (tmp_path / "out").exists()
    good = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())


def test_torchrun_two_ranks_match_one_process(workdir, tmp_path):
    # every term averages over tokens here (the rank form of the exit objective is a correlation
    # within each rank's micro-batch, so it is not split exactly across ranks)
    common = ["--data", workdir / "train.txt", "--seq-len", 32, "--steps", 6, "--log-every", 1, "--eval-every", 1000,
              "--save-every", 100, "--exit-objective", "bce"]
    single = subprocess.run(
        _cli("finetune", workdir / "ztt-gpt2", "--out", tmp_path / "one", "--batch-size", 4, *common),
        capture_output=True, text=True,
    )
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "ztt_cli", "finetune",
         str(workdir / "ztt-gpt2"), "--out", str(tmp_path / "two"), "--batch-size", "2", *map(str, common)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert len([r for r in log_of(tmp_path / "two") if r["event"] == "step"]) == 6
    assert_same_run(tmp_path / "one", tmp_path / "two")


def _exit_ce(folder, workdir):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = prepare(str(workdir / "train.txt"), load_tokenizer(folder), 32, 0.05, 0).val
    with torch.no_grad():
        logits = model(input_ids=blocks, exit_after=1).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             blocks[:, 1:].reshape(-1)).item()


def test_exit_aware_term_lowers_the_loss_at_early_exits(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "without", steps=30, exit_aware_weight=0.0, lr=1e-3))
    finetune(opts(workdir, tmp_path / "with", steps=30, exit_aware_weight=1.0, lr=1e-3))
    assert _exit_ce(tmp_path / "with", workdir) < _exit_ce(tmp_path / "without", workdir) - 0.01


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exit_objective_makes_zero_attention_rank_tokens_by_their_exit_cost(workdir, tmp_path, family):
    gains = []
    for seed in (0, 1):
        corr = {}
        for weight in (0.0, 1.0):
            out = tmp_path / f"{family}-{seed}-{weight}"
            finetune(opts(workdir, out, family, steps=60, seq_len=64, seed=seed, exit_objective_weight=weight,
                          save_every=1000, log_every=100))
            model = AutoModelForCausalLM.from_pretrained(out)
            blocks = prepare(str(workdir / "train.txt"), load_tokenizer(out), 64, 0.05, seed).val[:16]
            corr[weight] = exit_signal_correlation(model, blocks)[1]
            before = AutoModelForCausalLM.from_pretrained(workdir / f"ztt-{family}")
            assert not torch.allclose(model.pool.key, before.pool.key), "the pool must move"
        gains.append(corr[1.0] - corr[0.0])
    assert min(gains) > 0.1, gains


def test_grad_checkpointing_gives_the_same_gradients(workdir):
    """Non-reentrant checkpointing recomputes the shared block (and its zero-token sink) in backward."""
    ids = prepare(str(workdir / "train.txt"), load_tokenizer(workdir / "ztt-llama"), 32).train[:4]
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(workdir / "ztt-llama").train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        options = FinetuneOptions(checkpoint=workdir / "ztt-llama", data="unused", out=workdir / "unused",
                                  exit_aware_weight=0.5, exit_objective_weight=1.0)
        loss, _ = HealingObjective.from_options(model, options, distill=False)(ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "pool.key" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_trainable_pool_only_moves_the_pool(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "p", steps=3, trainable="pool"))
    before, after = weights(workdir / "ztt-gpt2"), weights(tmp_path / "p")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"pool.key", "pool.bias"}


def _bad(workdir, tmp_path):
    ckpt, data = str(workdir / "ztt-gpt2"), str(workdir / "train.txt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"body": "hello there"}\n')
    (tmp_path / "a-file").write_text("x")
    base = ["--steps", "2", "--seq-len", "32"]
    return {
        "missing data path": ([ckpt, "--data", str(tmp_path / "nope.txt"), *base], "no such data"),
        "empty data": ([ckpt, "--data", str(tmp_path / "empty.txt"), *base], "contains no text"),
        "no text field": ([ckpt, "--data", str(tmp_path / "rows.jsonl"), *base], "no field 'text'"),
        "seq-len above context": ([ckpt, "--data", data, "--steps", "2", "--seq-len", "512"],
                                  "above the model's context"),
        "not a ztt checkpoint": ([str(workdir / "src-gpt2"), "--data", data, *base], "not a ZTT checkpoint"),
        "unwritable output": ([ckpt, "--data", data, *base, "--out", str(tmp_path / "a-file" / "out")], "cannot write"),
        "nothing to resume": ([ckpt, "--data", data, *base, "--resume"], "nothing to resume"),
        "no budget": ([ckpt, "--data", data, "--seq-len", "32"], "no training budget"),
        "hub dataset offline": ([ckpt, "--data", "someorg/some-dataset", *base], "cannot load the dataset"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing data path", "empty data", "no text field", "seq-len above context", "not a ztt checkpoint",
     "unwritable output", "nothing to resume", "no budget", "hub dataset offline"],
)
def test_bad_input_exits_2_with_one_line(workdir, tmp_path, case):
    args, words = _bad(workdir, tmp_path)[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    before = sorted(p.name for p in (workdir / "ztt-gpt2").iterdir())
    result = runner.invoke(app, ["finetune", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "hint:" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    assert sorted(p.name for p in (workdir / "ztt-gpt2").iterdir()) == before


def test_an_unfinished_run_is_never_overwritten_silently(workdir, tmp_path):
    finetune(opts(workdir, tmp_path / "out", stop_at_step=2))
    result = runner.invoke(app, ["finetune", str(workdir / "ztt-gpt2"), "--data", str(workdir / "train.txt"),
                                 "--out", str(tmp_path / "out"), "--steps", "12", "--seq-len", "32"])
    assert result.exit_code == 2 and "unfinished run" in result.stderr and "--resume" in result.stderr
    assert (partial_dir(tmp_path / "out") / "checkpoint" / "trainer.json").is_file()


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # llama: rotary embeddings leave q, k in float32
def test_bf16_autocast_run(workdir, tmp_path, family):
    finetune(opts(workdir, tmp_path / "bf16", family=family, steps=2, precision="bf16"))
    log = log_of(tmp_path / "bf16")
    losses = [r["loss"] for r in log if r["event"] == "step"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    val = [r for r in log if r["event"] == "val"]  # the no-grad path (the fused inference shortcut on CPU)
    assert len(val) == 1 and math.isfinite(val[0]["val_ppl"])


def test_trainable_new_moves_only_what_a_conversion_added_and_the_norms(workdir, tmp_path):
    """--trainable new: the pool, the gates, the deltas and the 1-D weights train; every matrix of the
    source (shared, unshared, embeddings) stays as it was, and the optimizer holds nothing for it."""
    from ztt_cli.stages.finetune import _optimizer_groups

    ckpt = tmp_path / "grown"
    convert(ConvertOptions(source=str(workdir / "src-llama"), out=ckpt, init="grow", head=1, block=2, tail=1,
                           relax_rank=4, select="contiguous"))
    run = opts(workdir, tmp_path / "new", family="llama", checkpoint=ckpt, steps=3, trainable="new")
    finetune(run)
    before, after = weights(ckpt), weights(tmp_path / "new")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("relax.") for k in moved) and "pool.key" in moved
    assert all(k.startswith(("relax.", "pool.", "gates.")) or before[k].dim() == 1 for k in moved), moved
    assert any(before[k].dim() == 1 and not k.startswith(("relax.", "pool.", "gates.")) for k in moved)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    groups, grouping = _optimizer_groups(model, run)
    named = dict(model.named_parameters())
    held = [name for g in grouping for name in g["params"]]
    assert all(name.startswith(("relax.", "pool.", "gates.")) or named[name].dim() == 1 for name in held)
    assert sum(named[n].numel() for n in held) < 0.5 * sum(p.numel() for p in model.parameters())


def test_trainable_new_on_a_model_with_nothing_added_is_refused(workdir, tmp_path):
    ckpt = tmp_path / "drop"
    convert(ConvertOptions(source=str(workdir / "src-llama"), out=ckpt, drop=2, fit=False))
    result = runner.invoke(app, ["finetune", str(ckpt), "--data", str(workdir / "train.txt"), "--steps", "2",
                                 "--seq-len", "32", "--trainable", "new", "--out", str(tmp_path / "out")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trainable new" in lines[0] and "hint:" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_trainable_seam_trains_the_layers_next_to_the_removed_span_and_the_lm_head(workdir, tmp_path):
    """--trainable seam on a drop: the kept layers on either side of the removed span, the LM head and
    the final norm train; every other layer stays as it was, and the optimizer holds nothing for it."""
    from ztt_cli.stages.finetune import _optimizer_groups, seam_layers

    ckpt = tmp_path / "drop"
    convert(ConvertOptions(source=str(workdir / "src-llama"), out=ckpt, drop=2, select="contiguous", fit=False))
    provenance = json.loads((ckpt / "ztt.json").read_text())
    dropped = provenance["stages"][0]["metrics"]["dropped_layers"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    kept = [i for i in range(len(model.layers) + len(dropped)) if i not in dropped]
    seam = seam_layers(model, provenance)
    assert seam == [k for k, i in enumerate(kept) if i + 1 == min(dropped) or i - 1 == max(dropped)]
    assert 0 < len(seam) < len(model.layers)
    finetune(opts(workdir, tmp_path / "seam", family="llama", checkpoint=ckpt, steps=3, trainable="seam"))
    before, after = weights(ckpt), weights(tmp_path / "seam")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    in_layer = {k: int(k.split("layers.")[1].split(".")[0]) for k in before if "layers." in k}
    assert {in_layer[k] for k in moved if k in in_layer} == set(seam)
    assert any(k not in in_layer for k in moved)  # the LM head (here tied to the embeddings) or the final norm
    _, grouping = _optimizer_groups(model, opts(workdir, tmp_path / "x", trainable="seam"), provenance)
    held = [name for g in grouping for name in g["params"]]
    assert {int(n.split("layers.")[1].split(".")[0]) for n in held if "layers." in n} == set(seam)


def test_trainable_seam_around_the_shared_block_and_refused_where_nothing_changed(workdir):
    from ztt_cli.stages.finetune import _trainable, seam_layers

    model = AutoModelForCausalLM.from_pretrained(workdir / "ztt-gpt2")  # 2/1×2/2: nothing removed, one block
    lay = model.config.layout
    assert seam_layers(model, {"stages": [{"metrics": {}}]}) == [lay.head - 1, lay.head + lay.block]
    plain = tiny_ztt_plain(workdir)
    with pytest.raises(ZTTError, match="keeps every source layer, once") as e:
        _trainable(plain, "seam", {"stages": [{"metrics": {}}]})
    assert "--trainable all" in e.value.hint


def tiny_ztt_plain(workdir):
    """A no-share conversion: every source layer its own, once, no pool."""
    out = workdir / "plain"
    if not out.exists():
        convert(ConvertOptions(source=str(workdir / "src-gpt2"), out=out, head=0, block=6, cycles=1, tail=0,
                               pool=False))
    return AutoModelForCausalLM.from_pretrained(out)


def test_top_k_distillation_at_the_whole_vocabulary_is_full_distillation():
    from ztt_cli.training.losses import SparseLogits, task_loss

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 9, 50, generator=g), torch.randn(2, 9, 50, generator=g)
    ids = torch.randint(50, (2, 9), generator=g)
    top = teacher.topk(50, dim=-1)
    full = task_loss(logits, ids, teacher, 0.4, 2.0)
    sparse = task_loss(logits, ids, SparseLogits(top.values, top.indices), 0.4, 2.0)
    torch.testing.assert_close(sparse[0], full[0])
    few = teacher.topk(5, dim=-1)
    kd = task_loss(logits, ids, SparseLogits(few.values, few.indices), 1.0, 1.0)[2]
    assert 0 < kd < task_loss(logits, ids, teacher, 1.0, 1.0)[2] * 10


def test_teacher_top_k_heals_from_cached_logits_without_the_teacher(workdir, tmp_path, monkeypatch):
    """--teacher-top-k: the teacher's top-k logits are computed once, cached, and read again by the next
    run (the teacher is not run then); the teacher is not kept while healing."""
    from ztt_cli.stages import finetune as stage

    runs = []
    original = stage.top_k_logits

    def counted(teacher, *args, **kwargs):
        forwards = []
        handle = teacher.register_forward_hook(lambda *a: forwards.append(1))
        try:
            found = original(teacher, *args, **kwargs)
        finally:
            handle.remove()
        runs.append(len(forwards))
        return found

    monkeypatch.setattr(stage, "top_k_logits", counted)
    run = stage.HealingRun(opts(workdir, tmp_path / "a", steps=3, teacher_top_k=8))
    with run:
        run.setup()
        assert run.teacher is None and run.teacher_top is not None and run.teacher_top.shape[2] == 8
        while not run.done:
            run.step()
            run.validate_and_save()
    run.finish()
    assert math.isfinite([r for r in log_of(tmp_path / "a") if r["event"] == "step"][-1]["kd"])
    finetune(opts(workdir, tmp_path / "b", steps=3, teacher_top_k=8))
    assert runs[0] > 0 and runs[1] == 0  # the second run read the cache
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=0)


def test_teacher_top_k_caches_only_the_blocks_the_run_draws(workdir, tmp_path):
    """A short run caches the logits of the blocks its steps draw, no more, and each micro-batch reads
    its own blocks' rows: the teacher's top-k on those blocks."""
    from ztt_cli.io.data import batch_indices
    from ztt_cli.stages.finetune import HealingRun

    with HealingRun(opts(workdir, tmp_path / "few", steps=2, teacher_top_k=4)) as run:
        run.setup()
        o, n = run.opts, run.data.train.shape[0]
        drawn = {i for step in range(2) for micro in range(o.grad_accum)
                 for i in batch_indices(step, micro, n, o.batch_size, o.grad_accum, 0, 1, o.seed)}
        assert run.teacher_top.shape[0] == len(drawn) < n
        idx = batch_indices(1, 0, n, o.batch_size, o.grad_accum, 0, 1, o.seed)
        teacher = run._source_model()[0]
        with torch.no_grad():
            top = teacher(input_ids=run.data.train[idx]).logits.float().topk(4, dim=-1)
        rows = run.teacher_top.rows(idx, "cpu")
        torch.testing.assert_close(rows.values.float(), top.values.half().float())
        assert torch.equal(rows.indices.long(), top.indices)


@pytest.mark.parametrize("extra,message", [
    ({"no_teacher": True}, "distils nothing"),
    ({"hidden_weight": 1.0}, "keeps only its logits"),
    ({"teacher_top_k": 10_000}, "above the vocabulary"),
])
def test_teacher_top_k_refusals(workdir, tmp_path, extra, message):
    with pytest.raises(ZTTError, match=message):
        finetune(opts(workdir, tmp_path / "x", steps=1, **{"teacher_top_k": 8, **extra}))
    assert not (tmp_path / "x").exists()


def test_a_teacher_in_bf16(workdir, tmp_path):
    from ztt_cli.stages.finetune import HealingRun

    with HealingRun(opts(workdir, tmp_path / "bf", steps=1, teacher_dtype="bf16")) as run:
        run.setup()
        assert next(run.teacher.parameters()).dtype == torch.bfloat16
