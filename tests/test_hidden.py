"""The hidden-state term of healing (--hidden-weight): positions that stand for source layers against
those layers' outputs in the teacher."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from ztt_cli.errors import ZTTError
from ztt_cli.model.architecture import family_for
from ztt_cli.model.layout import Layout
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.training.losses import HealingObjective, hidden_distance, hidden_pairs, layer_outputs

from .fixtures import corpus, save_source, source_model, token_ids


def _provenance(layers: int, dropped=()) -> dict:
    return {"source": {"layers": layers}, "stages": [{"metrics": {"dropped_layers": list(dropped)}}]}


def test_the_pairs_follow_what_each_position_stands_for():
    drop = SimpleNamespace(layout=Layout(1, 2, 1, 1), grown=False)
    assert hidden_pairs(drop, _provenance(6, [2, 4])) == [(0, 0), (1, 1), (2, 3), (3, 5)]
    shared = SimpleNamespace(layout=Layout(1, 2, 2, 1), grown=False)
    assert hidden_pairs(shared, _provenance(6)) == [(i, i) for i in range(6)]
    # grown 1/2×2/1 over the 4 layers a drop of 2 and 3 keeps (0 1 4 5): the tail (source 5) is entered after
    # position 4; the source enters layer 5 after its layer 4
    grown = SimpleNamespace(layout=Layout(1, 2, 2, 1), grown=True)
    assert hidden_pairs(grown, _provenance(6, [2, 3])) == [(4, 4)]
    # a dropped layer just below the tail: the tail (source 5) is entered after source layer 4 still
    assert hidden_pairs(grown, _provenance(6, [3, 4])) == [(4, 4)]
    assert hidden_pairs(SimpleNamespace(layout=Layout(1, 2, 2, 0), grown=True), _provenance(6, [1])) == [(4, 5)]


def test_the_distances():
    t = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    s = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    assert float(hidden_distance(s, t, "mse")) == pytest.approx((0 + 2 / 1) / 2)  # per token, normalised
    assert float(hidden_distance(s, t, "cosine")) == pytest.approx((0 + 1) / 2)
    assert float(hidden_distance(2 * t, t, "cosine")) == pytest.approx(0, abs=1e-6)


def _objective(model, provenance, **kw):
    opts = FinetuneOptions(checkpoint=Path("c"), data="x", out=Path("o"), kd_weight=0, exit_aware_weight=0,
                           exit_objective_weight=0, hidden_weight=1.0, **kw)
    return HealingObjective.from_options(model, opts, provenance=provenance)


def _teacher_states(teacher, layers, ids):
    with torch.no_grad(), layer_outputs(family_for(teacher).layer_list(teacher), layers) as states:
        teacher(input_ids=ids)
    return dict(states)


@pytest.mark.parametrize("form", ["mse", "cosine"])
def test_the_term_is_zero_where_the_student_is_the_source_and_is_the_formula_on_a_drop(tmp_path, form):
    src = save_source("llama", tmp_path / "src")
    teacher, ids = source_model("llama"), token_ids()
    convert(ConvertOptions(source=str(src), out=tmp_path / "same", head=1, tail=1, block=4, cycles=1, init="lower",
                           pool=False))
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    objective = _objective(same, json.loads((tmp_path / "same" / "ztt.json").read_text()), hidden_loss=form)
    states = _teacher_states(teacher, objective.teacher_layers(), ids)
    loss, metrics = objective(ids, None, states)
    assert objective.teacher_layers() == list(range(6)) and float(metrics["hidden"]) == pytest.approx(0, abs=1e-5)

    convert(ConvertOptions(source=str(src), out=tmp_path / "drop", drop=2, select="contiguous", tail=1,
                           fit=False))
    drop = AutoModelForCausalLM.from_pretrained(tmp_path / "drop").eval()
    objective = _objective(drop, json.loads((tmp_path / "drop" / "ztt.json").read_text()), hidden_loss=form)
    assert objective.teacher_layers() == [0, 1, 2, 5]  # layers 3 and 4 dropped
    states = _teacher_states(teacher, objective.teacher_layers(), ids)
    loss, metrics = objective(ids, None, states)
    # by hand: the kept layers' outputs against the same source layers; the first three equal the source's
    with torch.no_grad(), layer_outputs(drop.family.layer_list(drop.inner), [0, 1, 2, 3]) as student:
        drop(input_ids=ids)
    by_hand = torch.stack([hidden_distance(student[p], states[s], form) for p, s in [(0, 0), (1, 1), (2, 2), (3, 5)]])
    assert float(by_hand[:3].abs().max()) < 1e-5 and float(by_hand[3]) > 0.01
    ce = metrics["ce"]
    assert float(loss.detach()) == pytest.approx(float(ce + by_hand.mean()), rel=1e-5)
    loss.backward()
    assert drop.layers[3].mlp.down_proj.weight.grad.abs().sum() > 0  # the term trains the layer after the gap


def test_healing_with_the_term_logs_it_lowers_it_and_needs_a_teacher(tmp_path, cache_dir):
    src = save_source("llama", tmp_path / "src")
    convert(ConvertOptions(source=str(src), out=tmp_path / "drop", drop=2, select="contiguous", tail=1,
                           fit=False))
    (tmp_path / "train.txt").write_text("\n\n".join(corpus(40, seed=i) for i in range(10)))
    base = dict(checkpoint=tmp_path / "drop", data=str(tmp_path / "train.txt"), seq_len=32, batch_size=2, steps=8,
                lr=1e-3, log_every=1, eval_every=1000, kd_weight=0, exit_aware_weight=0, exit_objective_weight=0)
    finetune(FinetuneOptions(out=tmp_path / "with", hidden_weight=5.0, **base))
    finetune(FinetuneOptions(out=tmp_path / "without", **base))
    steps = [json.loads(line) for line in (tmp_path / "with" / "train_log.jsonl").read_text().splitlines()]
    assert all(s["hidden"] > 0 for s in steps if s["event"] == "step")
    provenance = json.loads((tmp_path / "drop" / "ztt.json").read_text())
    ids, teacher = token_ids(batch=4, length=32), source_model("llama")
    distance = {}
    for name in ("with", "without"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        objective = _objective(model, provenance)
        with torch.no_grad():
            distance[name] = float(objective(ids, None, _teacher_states(teacher, objective.teacher_layers(), ids))[1]
                                   ["hidden"])
    assert distance["with"] < distance["without"]
    with pytest.raises(ZTTError, match="no-teacher"):
        finetune(FinetuneOptions(out=tmp_path / "x", no_teacher=True, hidden_weight=1.0, **base))
    assert not (tmp_path / "x").exists()
