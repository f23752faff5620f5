"""`ztt finetune --sharding fsdp`: FSDP2 under torchrun (2 gloo processes on the CPU) trains as one process
and as DDP do, resumes bit for bit, and writes the same checkpoint files as one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ztt_cli.cli import app
from ztt_cli.io.checkpoint import load_checkpoint
from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.training.distributed import Dist
from ztt_cli.training.resume import partial_dir

from . import test_finetune
from .test_finetune import assert_same_run, log_of, opts, runner, weights

workdir = test_finetune.workdir  # the fixture: test_finetune's tiny converted checkpoints and text

# Llama: its LM head is tied to the embeddings (one parameter under two names, in the root's group).
# Two ranks × 1 sequence × 2 micro-batches: the same global batch as one process × 2 sequences × 2.
COMMON = dict(family="llama", seq_len=32, batch_size=1, grad_accum=2, steps=6, eval_every=3, save_every=2,
              exit_objective="bce")
ONE = dict(COMMON, batch_size=2)


def _flags(**kw) -> list[str]:
    kw.pop("family")
    flags = []
    for key, value in kw.items():
        flags += [f"--{key.replace('_', '-')}"] if value is True else [f"--{key.replace('_', '-')}", str(value)]
    return flags


def torchrun(workdir, out, port, sharding="fsdp", entry=("-m", "ztt_cli"), **kw):
    """``ztt finetune`` on the tiny Llama under ``torchrun`` with 2 gloo processes (``entry``: what
    each runs, ``python -m ztt_cli`` or a script that runs it)."""
    kw = {**COMMON, **kw}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port),
               *entry, "finetune", str(workdir / "ztt-llama"), "--data", str(workdir / "train.txt"),
               "--out", str(out), "--sharding", sharding, "--log-every", "1", *_flags(**kw)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory):
    """An FSDP run; the same run stopped at step 3 (its checkpoint kept aside) and resumed under FSDP; and
    one process with the same global batch, stopped at step 3 and resumed likewise."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(workdir, root / "fsdp", 29531)
    torchrun(workdir, root / "resumed", 29532, stop_at_step=3)
    shutil.copytree(partial_dir(root / "resumed"), root / "fsdp-step3")
    torchrun(workdir, root / "resumed", 29533, resume=True)
    finetune(opts(workdir, root / "one", **ONE, stop_at_step=3))
    shutil.copytree(partial_dir(root / "one"), root / "one-step3")
    finetune(opts(workdir, root / "one", **ONE, resume=True))
    return root


def test_two_fsdp_ranks_match_one_process(runs):
    assert [r["step"] for r in log_of(runs / "fsdp") if r["event"] == "step"] == list(range(1, 7))
    assert_same_run(runs / "one", runs / "fsdp")
    prov = json.loads((runs / "fsdp" / "ztt.json").read_text())
    assert prov["stages"][-1]["options"]["sharding"] == "fsdp"


def test_fsdp_resume_is_bit_identical_to_an_uninterrupted_fsdp_run(runs):
    a, b = weights(runs / "fsdp"), weights(runs / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert [r["step"] for r in log_of(runs / "resumed") if r["event"] == "step"] == list(range(1, 7))
    val = [[r["val_loss"] for r in log_of(runs / run) if r["event"] == "val"] for run in ("fsdp", "resumed")]
    assert len(val[0]) == 2 and val[0] == val[1]  # validation under FSDP (at steps 3 and 6), the same after resuming


def test_an_fsdp_checkpoint_is_a_one_process_checkpoint(runs, workdir, tmp_path):
    """The same files, tensors and names as one process writes, whole; the healed model loads in one
    process; and FSDP's resumable checkpoint resumes in one process."""
    for name in ("model.safetensors", "trainer.safetensors"):
        fsdp, one = (load_file(str(runs / run / "checkpoint" / name)) for run in ("fsdp-step3", "one-step3"))
        assert fsdp.keys() == one.keys()
        for k in fsdp:
            assert fsdp[k].shape == one[k].shape, k
            if k.startswith("state.") and k.endswith(".step"):
                assert torch.equal(fsdp[k], one[k]), k
    meta = [json.loads((runs / run / "checkpoint" / "trainer.json").read_text()) for run in ("fsdp-step3", "one-step3")]
    assert meta[0]["groups"] == meta[1]["groups"] and meta[0]["step"] == 3
    assert [len(g["params"]) for g in meta[0]["param_groups"]] == [len(g["params"]) for g in meta[1]["param_groups"]]
    model = load_checkpoint(runs / "fsdp")
    saved = weights(runs / "fsdp")
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items() if k in saved)
    run_dir = shutil.copytree(runs / "fsdp-step3", partial_dir(tmp_path / "out"))
    trainer = run_dir / "checkpoint" / "trainer.json"  # moved: the run's --out with it
    trainer.write_text(json.dumps({**meta[0], "options": {**meta[0]["options"], "out": str(tmp_path / "out")}}))
    # the same options (1 sequence × 2 micro-batches), in one process: a smaller global batch from step 4
    done = finetune(opts(workdir, tmp_path / "out", **COMMON, sharding="fsdp", resume=True))
    assert done.steps == 6 and (tmp_path / "out" / "config.json").is_file()
    assert [r["step"] for r in log_of(tmp_path / "out") if r["event"] == "step"] == list(range(1, 7))


def test_a_partly_frozen_model_trains_under_fsdp_as_under_ddp(workdir, tmp_path):
    """--trainable new: in every layer's group and in the root's, frozen matrices beside trained norms
    (and the trained pool in the root's)."""
    partial = dict(trainable="new", steps=3, eval_every=1000, save_every=100)
    torchrun(workdir, tmp_path / "fsdp", 29534, **partial)
    torchrun(workdir, tmp_path / "ddp", 29535, sharding="ddp", **partial)
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    before, after = weights(workdir / "ztt-llama"), weights(tmp_path / "fsdp")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"pool.key", "pool.bias"} <= moved and all(k.startswith("pool.") or before[k].dim() == 1 for k in moved)
    assert {k.split(".")[1] for k in moved if k.startswith("layers.")} == {"0", "1", "2", "3", "4"}, moved


RECORDING = """
import json, os, runpy
from ztt_cli.stages import finetune

load = finetune.load_checkpoint

def recorded(path, dtype=None, weights=True):
    with open(os.environ["LOADS"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), "weights": weights}) + "\\n")
    return load(path, dtype, weights)

finetune.load_checkpoint = recorded
runpy.run_module("ztt_cli", run_name="__main__")
"""


def test_under_fsdp_only_rank_0_reads_the_weights(workdir, tmp_path, monkeypatch):
    """Rank 1 builds the model empty and receives its shards from rank 0's copy. The objective's setup
    (where the halting rule starts) then runs as a pass of the sharded model, and trains as DDP does."""
    script = tmp_path / "recording.py"
    script.write_text(RECORDING)
    halting = dict(halting_weight=1.0, halting_cycles=1.5, steps=2, eval_every=1000, save_every=100)
    loads = {}
    for sharding, port in (("fsdp", 29536), ("ddp", 29537)):
        monkeypatch.setenv("LOADS", str(tmp_path / f"{sharding}.jsonl"))
        torchrun(workdir, tmp_path / sharding, port, sharding=sharding, entry=(str(script),), **halting)
        lines = (tmp_path / f"{sharding}.jsonl").read_text().splitlines()
        loads[sharding] = sorted(list(json.loads(line).values()) for line in lines)
    assert loads == {"fsdp": [[0, False], [0, True], [1, False]], "ddp": [[0, True], [1, True]]}
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    offsets = [json.loads((tmp_path / run / "config.json").read_text())["halting_offsets"] for run in ("ddp", "fsdp")]
    assert offsets[0] is not None and offsets[0] == pytest.approx(offsets[1], abs=1e-5)


def test_fsdp_on_a_relaxed_checkpoint_is_refused(workdir, tmp_path, monkeypatch):
    ckpt = tmp_path / "relaxed"
    convert(ConvertOptions(source=str(workdir / "src-llama"), out=ckpt, init="grow", head=1, block=2, tail=1,
                           relax_rank=4, select="contiguous"))

    class TwoRanks(Dist):  # what the refusal sees under torchrun, without a process group
        def any(self, flag):
            return flag

    monkeypatch.setattr("ztt_cli.stages.finetune.setup_distributed", lambda: TwoRanks(0, 2))
    result = runner.invoke(app, ["finetune", str(ckpt), "--data", str(workdir / "train.txt"), "--out",
                                 str(tmp_path / "out"), "--steps", "2", "--seq-len", "32", "--sharding", "fsdp"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sharding fsdp" in lines[0] and "hint: choose --sharding ddp" in lines[0], lines
