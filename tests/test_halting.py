"""Learned halting (PonderNet): the halting distribution, its geometric prior, the healing term, the
inference rule (the ``halting`` signal at a cut-off fitted to the prior's mean) and a checkpoint that
records the rule it learned."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from ztt_cli.errors import ZTTError
from ztt_cli.io.checkpoint import load_checkpoint
from ztt_cli.model.signals import HALT, ExitPolicy, halting_rates
from ztt_cli.stages import CalibrateOptions, ConvertOptions, FinetuneOptions
from ztt_cli.stages.calibrate import calibrate
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.training.losses import (
    Halting,
    HealingObjective,
    geometric_prior,
    halting_cutoff,
    halting_distribution,
    halting_kl,
    prior_rate,
)

from .fixtures import corpus, greedy_with_cache, save_source, token_ids, ztt_model

LAYOUT = (1, 1, 3, 2)  # three cycles: halting after cycle 1, 2 or 3


def options(**kw) -> FinetuneOptions:
    return FinetuneOptions(checkpoint=Path("ckpt"), data="text", out=Path("out"), **kw)


@pytest.fixture(scope="module")
def model():
    return ztt_model("gpt2", LAYOUT)[0]


def test_the_halting_distribution_sums_to_one_and_is_ponder_nets():
    halts = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))  # four cycles
    p = halting_distribution(halts)
    assert p.shape == (5, 7, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 7))
    l1, l2, l3 = halts.unbind(-1)
    by_hand = torch.stack([l1, (1 - l1) * l2, (1 - l1) * (1 - l2) * l3, (1 - l1) * (1 - l2) * (1 - l3)], -1)
    torch.testing.assert_close(p, by_hand)


@pytest.mark.parametrize("cycles,mean", [(2, 1.4), (3, 1.5), (3, 2.5), (4, 1.2)])
def test_the_prior_has_the_mean_asked_for_and_the_kl_is_zero_only_there(cycles, mean):
    prior = geometric_prior(prior_rate(mean, cycles), cycles)
    torch.testing.assert_close(prior.sum(), torch.tensor(1.0))
    assert (prior * torch.arange(1, cycles + 1)).sum().item() == pytest.approx(mean, abs=1e-5)
    assert halting_kl(prior, prior).item() == pytest.approx(0.0, abs=1e-6)
    other = halting_distribution(torch.full((cycles - 1,), 0.9))
    assert halting_kl(other, prior).item() > 0.01
    if cycles == 2:  # E = 2 - r: the rate is 2 - mean
        assert prior_rate(mean, cycles) == pytest.approx(2 - mean)


@pytest.mark.parametrize("mean", [1.1, 1.25, 1.5, 2.2, 2.9])
def test_the_cutoff_runs_the_tokens_the_mean_depth_asked_for(mean):
    """The rule exits after the first cycle whose cumulative halting probability reaches the cut-off;
    fitted on 4,000 tokens, it runs them the mean depth asked for, to within one token's share of a
    cycle, whether the tokens' probabilities are spread out or all alike (where 0.5 would run one cycle)."""
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(4000, 2, generator=g).cumsum(-1) / 2  # nondecreasing over the cycles
    alike = torch.stack([0.75 + 0.01 * torch.randn(4000, generator=g), 0.9 + 0.05 * torch.rand(4000, generator=g)], -1)
    for cumulative in (spread, alike):
        cut = halting_cutoff(cumulative, mean)
        depth = 1 + (cumulative < cut).sum(-1).double().mean()
        assert 0 <= cut <= 1 and abs(depth - mean) <= 1e-3, (cut, depth)
    assert (1 + (alike < HALT).sum(-1).double().mean()) == 1  # the median rule on alike tokens: one cycle


def test_the_halting_term_is_the_formula():
    """Σ_c p_c·L_c + β·KL(p ‖ prior), per next-token position, with p from λ_c = σ(logit p0_c + b_c)
    after cycles 1..C-1 and L_c the task loss when exiting after c (L_C at full depth); the offsets b
    are set before training so that the median token halts at the prior's rate; the term replaces
    the exit objective, and the gradients reach the zero token."""
    model = ztt_model("gpt2", LAYOUT)[0]
    ids = token_ids(batch=2, length=16)
    teacher = torch.randn(2, 16, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(1))
    opts = options(kd_weight=0.3, exit_aware_weight=0.0, halting_weight=0.5, halting_cycles=1.6, halting_beta=0.2)
    objective = HealingObjective.from_options(model, opts)
    assert [type(t) for t in objective.terms] == [Halting]  # the exit objective (weight 1 by default) stands aside
    assert "the halting objective replaces the exit objective: --exit-objective-weight is not used" in objective.notes()
    objective.setup(ids)
    offsets = torch.tensor(model.config.halting_offsets)
    with torch.no_grad():
        p0 = model(input_ids=ids).zero_attention[:, :2].mean(2).transpose(1, 2)  # [B, T, 2]
    halting_share = (torch.sigmoid(torch.logit(p0.double()) + offsets) >= 0.5).double().flatten(0, 1).mean(0)
    torch.testing.assert_close(halting_share, torch.full((2,), prior_rate(1.6, 3), dtype=torch.float64), atol=0.04,
                               rtol=0)  # the prior's share of tokens at λ ≥ 0.5 after each cycle (30 tokens)
    assert objective.exit_policy() == ExitPolicy("halting", HALT)  # nothing trained on yet: the median rule
    loss, metrics = objective(ids, teacher)

    def task(logits):  # per position
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        p_t = F.softmax(teacher[:, :-1], -1)
        kd = (p_t * (p_t.log() - F.log_softmax(logits[:, :-1], -1))).sum(-1)
        return 0.7 * ce.view(2, -1) + 0.3 * kd

    full = model(input_ids=ids)
    losses = torch.stack([task(model(input_ids=ids, exit_after=c).logits) for c in (1, 2)] + [task(full.logits)], -1)
    lam = torch.sigmoid(torch.logit(full.zero_attention[:, :2].mean(2).transpose(1, 2)[:, :-1]) + offsets)
    p = torch.stack([lam[..., 0], (1 - lam[..., 0]) * lam[..., 1], (1 - lam[..., 0]) * (1 - lam[..., 1])], -1)
    prior = geometric_prior(prior_rate(1.6, 3), 3)
    marginal = p.flatten(0, 1).mean(0)
    kl = (marginal * (marginal.log() - prior.log())).sum()
    halting = (p * losses).sum(-1).mean() + 0.2 * kl
    ce = F.cross_entropy(full.logits[:, :-1].reshape(-1, full.logits.shape[-1]), ids[:, 1:].reshape(-1))
    p_t = F.softmax(teacher[:, :-1], -1)
    expected = 0.7 * ce + 0.3 * (p_t * (p_t.log() - F.log_softmax(full.logits[:, :-1], -1))).sum(-1).mean()
    torch.testing.assert_close(loss, expected + 0.5 * halting, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["halting"], halting.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["halting_cycles"], (p * torch.tensor([1.0, 2.0, 3.0])).sum(-1).mean().detach())
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert model.pool.key.grad is not None and model.pool.key.grad.abs().sum() > 0
    cumulative = torch.stack([lam[..., 0], 1 - (1 - lam[..., 0]) * (1 - lam[..., 1])], -1).flatten(0, 1)
    assert objective.exit_policy() == ExitPolicy("halting", halting_cutoff(cumulative.detach(), 1.6))


def test_with_the_exit_aware_term_each_outputs_task_loss_is_computed_once(monkeypatch):
    """The halting term reads the task loss per token and the exit-aware term its average: the
    average comes from the per-token losses, so each output (the exits after cycles 1 and 2, and
    full depth) computes its task loss once, and the objective is still the sum of its terms."""
    import ztt_cli.training.losses as losses

    model = ztt_model("gpt2", LAYOUT)[0]
    ids = token_ids(batch=2, length=16)
    teacher = torch.randn(2, 16, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(1))
    objective = HealingObjective.from_options(model, options(kd_weight=0.3, exit_aware_weight=0.25, halting_weight=0.5,
                                                             halting_cycles=1.6))
    objective.setup(ids)
    calls = []
    real = losses.task_loss

    def counted(*args, **kwargs):
        calls.append(args[-1] if len(args) > 5 else kwargs.get("reduction", "mean"))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "task_loss", counted)
    loss, metrics = objective(ids, teacher)
    assert calls == ["none"] * 3
    task = losses.TaskLoss(0.3)
    monkeypatch.setattr(losses, "task_loss", real)
    with torch.no_grad():
        full = task(model(input_ids=ids).logits, ids, teacher)[0]
        exits = [task(model(input_ids=ids, exit_after=c).logits, ids, teacher) for c in (1, 2)]
    expected = full + 0.25 * (exits[0][0] + exits[1][0]) / 2 + 0.5 * metrics["halting"]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["exit1_ce"], exits[0][1], rtol=1e-5, atol=1e-6)


def test_the_prior_mean_can_be_a_compute_speedup(model):
    # 1/1×3/2: depth 6; 1.2× compute runs 5 layers = 1 + 2 + 1·m, so m = 2 cycles
    term = HealingObjective.from_options(model, options(halting_weight=1.0, halting_speedup=1.2)).terms[-1]
    assert isinstance(term, Halting) and term.mean_cycles == pytest.approx(2.0)


@pytest.mark.parametrize("asked,message", [
    ({"halting_cycles": 3.0}, "asks for 3 cycles per token on average"),
    ({"halting_cycles": 1.0}, "greater than 1"),
    ({"halting_speedup": 2.0}, "asks for 0 cycles per token"),
    ({}, "needs the prior's mean depth"),
    ({"halting_cycles": 1.5, "halting_speedup": 1.2}, "exclude each other"),
])
def test_a_prior_the_layout_cannot_have_is_refused(model, asked, message):
    with pytest.raises((ZTTError, ValidationError), match=message):
        HealingObjective.from_options(model, options(halting_weight=1.0, **asked))


def test_a_one_cycle_model_or_one_without_pool_has_nothing_to_halt_by():
    for layout, pool in (((1, 1, 1, 1), True), (LAYOUT, False)):
        with pytest.raises(ZTTError, match="learns when to halt") as e:
            HealingObjective.from_options(ztt_model("gpt2", layout, pool=pool)[0],
                                          options(halting_weight=1.0, halting_cycles=1.5))
        assert "leave out --halting-weight" in e.value.hint


@torch.no_grad()
def test_the_halting_signal_is_the_cumulative_halting_probability():
    model, _ = ztt_model("llama", (0, 2, 3, 0))
    model.config.halting_offsets = [2.0, -1.0]
    ids = token_ids(batch=2, length=10)
    full = model(ids)
    lam = torch.sigmoid(torch.logit(full.zero_attention[:, :2].mean(2)) + torch.tensor([2.0, -1.0])[:, None])
    seen = {}
    import ztt_cli.model.exits as exits_mod

    original = exits_mod.TokenExits.end_of_cycle

    def spy(self, cycle, hidden):
        original(self, cycle, hidden)
        seen.update(self.signals)

    exits_mod.TokenExits.end_of_cycle = spy
    try:
        model(ids, exit_map=torch.full(ids.shape, 3), exit_policy=ExitPolicy("halting", HALT))
    finally:
        exits_mod.TokenExits.end_of_cycle = original
    torch.testing.assert_close(seen[1], lam[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen[2], 1 - (1 - lam[:, 0]) * (1 - lam[:, 1]), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_cached_decoding_with_the_learned_rule_equals_the_uncached_replay():
    model, _ = ztt_model("llama", (0, 2, 3, 0))
    with torch.no_grad():  # open the zero token so that the rule halts some tokens after 1, 2 and 3 cycles
        model.pool.bias.fill_(1.0)
        model.pool.key.add_(2 * torch.randn(model.pool.key.shape, generator=torch.Generator().manual_seed(5)))
    model.config.halting_offsets = [0.0, 0.0]
    model.config.exit_signal = "halting"
    prompt = token_ids(batch=1, length=6, seed=3)
    ids, cycles, cached_logits = greedy_with_cache(model, prompt, 14, HALT)
    assert set(cycles.flatten().tolist()) == {1, 2, 3}, "want every depth"
    replay = model(ids[:, :-1], exit_map=cycles[:, :-1])
    generated = replay.logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(generated, cached_logits[:, :-1], atol=1e-5, rtol=0)
    assert torch.equal(generated.argmax(-1), ids[:, prompt.shape[1] :])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("halting")
    os.environ["ZTT_CACHE"] = str(root / "cache")
    src = save_source("llama", root / "src")
    convert(ConvertOptions(source=str(src), out=root / "ztt", head=1, block=1, cycles=3, tail=2, init="lower"))
    (root / "train.txt").write_text("\n\n".join(corpus(40, seed=i) for i in range(10)))
    return root


def _mean_cycles(model, ids) -> float:
    """The mean depth of the halting distribution the model's zero attention gives."""
    with torch.no_grad():
        p0 = model(input_ids=ids).zero_attention[:, :-1].mean(2).transpose(1, 2)
    p = halting_distribution(halting_rates(p0, model.config.halting_offsets))
    return float((p * torch.arange(1, 4)).sum(-1).mean())


@pytest.fixture(scope="module")
def healed(workdir):
    """The tiny 1/1×3/2 model healed with the halting objective towards 1.5 cycles per token."""
    result = finetune(FinetuneOptions(checkpoint=workdir / "ztt", data=str(workdir / "train.txt"), out=workdir / "h",
                                      seq_len=32, batch_size=4, steps=40, log_every=1, eval_every=1000, seed=0,
                                      halting_weight=1.0, halting_cycles=1.5))
    return workdir / "h", result


def test_healing_learns_the_prior_depth_and_the_checkpoint_exits_by_the_rule(workdir, healed):
    folder, result = healed
    ids = token_ids(batch=4, length=32, seed=7)
    before = _mean_cycles(load_checkpoint(workdir / "ztt"), ids)
    config = json.loads((folder / "config.json").read_text())
    assert config["exit_signal"] == "halting" and config["exit_threshold"] == result.metrics["halting_cutoff"]
    assert len(config["halting_offsets"]) == 2
    model = load_checkpoint(folder)
    assert model.exit_policy == ExitPolicy("halting", config["exit_threshold"])
    after = _mean_cycles(model, ids)
    assert before > 2.5 and abs(after - 1.5) < 0.2, (before, after)
    assert "halting_cycles" in result.metrics and math.isfinite(result.metrics["halting"])
    with torch.no_grad():
        out = model(input_ids=ids)  # the saved rule is in force: tokens exit, about as deep as the prior asks
    assert out.exit_cycles is not None and abs(out.exit_cycles.float().mean() - 1.5) < 0.3, out.exit_cycles
    card = (folder / "README.md").read_text()
    assert "a halting rule learned towards 1.5 cycles per token on average, exiting where its cumulative" in card


def test_calibrating_a_learned_rule_starts_from_it(healed, tmp_path):
    folder, _ = healed
    report = calibrate(CalibrateOptions(checkpoint=folder, data=str(folder.parent / "train.txt"), target_speedup=1.05,
                                        speedup_metric="compute", windows=2, seq_len=32, reps=1, confirm_reps=2,
                                        decode_tokens=4, prompts=1, out=tmp_path / "c"))
    learned = json.loads((folder / "config.json").read_text())["exit_threshold"]
    assert report.signal == "halting" and learned in [c.threshold for c in report.candidates]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["exit_signal"] == "halting"
