"""The healing objective, composed from options, against the loss written out by hand."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ztt_cli.stages import FinetuneOptions
from ztt_cli.training.losses import TERMS, ExitAware, ExitObjective, HealingObjective

from .fixtures import token_ids, ztt_model

LAYOUT = (1, 1, 3, 2)  # three cycles: exits after cycles 1 and 2


def options(**kw) -> FinetuneOptions:
    return FinetuneOptions(checkpoint=Path("ckpt"), data="text", out=Path("out"), **kw)


@pytest.fixture(scope="module")
def model():
    return ztt_model("gpt2", LAYOUT)[0]


def by_hand(model, ids, teacher, w, temperature, exit_aware, exit_weight, form):
    """(1-w)·CE + w·T²·KL at full depth, + exit_aware · mean over exits of the same at the exit,
    + exit_weight · mean over exits of the exit objective against exp(-KL(exit || full))."""

    def task(logits):
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        p_teacher = F.softmax(teacher[:, :-1] / temperature, -1)
        kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits[:, :-1] / temperature, -1))).sum(-1).mean()
        return (1 - w) * ce + w * temperature**2 * kl, ce

    def objective(p0, target):
        p0 = p0.clamp(1e-6, 1 - 1e-6)
        if form == "bce":
            return -(target * p0.log() + (1 - target) * (1 - p0).log()).mean()
        pair = torch.stack([torch.logit(p0).flatten(), torch.logit(target.clamp(1e-6, 1 - 1e-6)).flatten()])
        return 1 - torch.corrcoef(pair)[0, 1]

    full = model(input_ids=ids)
    exits = [model(input_ids=ids, exit_after=c) for c in range(1, model.config.cycles)]
    loss, ce = task(full.logits)
    exit_terms, objectives = [], []
    for c, exited in enumerate(exits, start=1):
        exit_terms.append(task(exited.logits)[0])
        log_exit, log_full = exited.logits.detach().log_softmax(-1), full.logits.detach().log_softmax(-1)
        target = torch.exp(-(log_exit.exp() * (log_exit - log_full)).sum(-1).clamp(min=0))
        objectives.append(objective(full.zero_attention[:, c - 1].mean(1), target))
    loss = loss + exit_aware * torch.stack(exit_terms).mean() + exit_weight * torch.stack(objectives).mean()
    return loss, ce, torch.stack(objectives).mean()


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["rank", "bce"])
@pytest.mark.parametrize("exit_aware", [0.0, 0.25])
def test_the_composed_objective_is_the_formula(model, form, exit_aware):
    ids = token_ids(batch=3, length=24)
    teacher = torch.randn(3, 24, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(1))
    opts = options(kd_weight=0.3, kd_temperature=2.0, exit_aware_weight=exit_aware, exit_objective_weight=0.7,
                   exit_objective=form)
    objective = HealingObjective.from_options(model, opts)
    loss, metrics = objective(ids, teacher)
    expected, ce, exit_objective = by_hand(model, ids, teacher, 0.3, 2.0, exit_aware, 0.7, form)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert list(metrics) == ["ce", "kd", "exit1_ce", "exit2_ce", "exit_objective", "loss"]
    torch.testing.assert_close(metrics["ce"], ce.detach())
    torch.testing.assert_close(metrics["exit_objective"], exit_objective.detach(), rtol=1e-5, atol=1e-6)
    # the same gradients: exits carry them only for the exit-aware term (the exit target is detached)
    composed, hand = grads(model, loss), grads(model, expected)
    assert composed.keys() == hand.keys() and "pool.key" in composed
    for name in composed:
        torch.testing.assert_close(composed[name], hand[name], rtol=1e-4, atol=1e-7, msg=name)


def test_without_a_teacher_the_task_loss_is_cross_entropy(model):
    ids = token_ids(batch=2, length=16)
    objective = HealingObjective.from_options(model, options(exit_aware_weight=0, exit_objective_weight=0),
                                              distill=False)
    loss, metrics = objective(ids)
    assert list(metrics) == ["ce", "loss"]
    logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_a_term_with_weight_0_is_not_computed(model, monkeypatch):
    forwards = []
    original = type(model).forward

    def counted(self, *args, **kwargs):
        forwards.append(kwargs.get("exit_after"))
        return original(self, *args, **kwargs)

    def never(self, batch):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(type(model), "forward", counted)
    monkeypatch.setattr(ExitObjective, "value", never)
    ids = token_ids(batch=2, length=16)
    only_exit_aware = HealingObjective.from_options(model, options(exit_aware_weight=0.5, exit_objective_weight=0))
    assert [type(t) for t in only_exit_aware.terms] == [ExitAware]
    _, metrics = only_exit_aware(ids)
    assert "exit_objective" not in metrics and forwards == [None, 1, 2]  # each exit computed once

    forwards.clear()
    monkeypatch.setattr(ExitAware, "value", never)
    plain = HealingObjective.from_options(model, options(exit_aware_weight=0, exit_objective_weight=0))
    _, metrics = plain(ids)
    assert plain.terms == [] and forwards == [None] and list(metrics) == ["ce", "loss"]


def test_every_term_names_an_option_that_holds_its_weight():
    # the order they are added
    assert [t.__name__ for t in TERMS] == ["ExitAware", "ExitObjective", "HiddenState", "Halting"]
    for term in TERMS:
        field = FinetuneOptions.model_fields[term.weight_option]
        assert isinstance(field.default, float) and field.default >= 0, term.weight_option


def test_the_exit_objective_on_the_default_signal_is_the_zero_attention_loss_bit_for_bit(model):
    """The default signal, zero-attention: the mean p0 over the block's layers against the exit target,
    computed as it always was (the full pass given nothing more), to the bit."""
    from ztt_cli.training.losses import exit_objective, exit_target, task_loss

    ids = token_ids(batch=3, length=24)
    assert model.exit_policy.signal == "zero-attention"
    objective = HealingObjective.from_options(model,
                                              options(kd_weight=0, exit_aware_weight=0, exit_objective_weight=0.7))
    loss, metrics = objective(ids)
    full = model(input_ids=ids)
    terms = [exit_objective(full.zero_attention[:, c - 1].mean(1),
                            exit_target(model(input_ids=ids, exit_after=c).logits, full.logits), "rank")
             for c in (1, 2)]
    expected = task_loss(full.logits, ids, None, 0.0, 1.0)[0] + 0.7 * torch.stack(terms).mean()
    assert torch.equal(loss, expected) and torch.equal(metrics["exit_objective"], torch.stack(terms).mean().detach())
    assert objective.notes() == []


def test_the_exit_objective_trains_a_differentiable_signal_the_model_exits_by(model):
    """With the saturation signal the objective ranks tokens by saturation (from a full-depth replay),
    and its gradient reaches the shared block through it."""
    from ztt_cli.model.signals import ExitPolicy
    from ztt_cli.training.losses import exit_objective, exit_target

    ids = token_ids(batch=2, length=16)
    objective = HealingObjective.from_options(model, options(kd_weight=0, exit_aware_weight=0, exit_objective_weight=1))
    with model.exiting(ExitPolicy("saturation")):
        assert objective.notes() == []
        _, metrics = objective(ids)
        full = model(input_ids=ids, exit_map=torch.full(ids.shape, 3), use_cache=False)
        expected = torch.stack([exit_objective(full.exit_signals[:, c - 1],
                                               exit_target(model(input_ids=ids, exit_after=c).logits, full.logits))
                                for c in (1, 2)]).mean()
        torch.testing.assert_close(metrics["exit_objective"], expected.detach(), rtol=1e-5, atol=1e-6)
        model.zero_grad(set_to_none=True)
        objective.terms[0].value(_batch(model, ids, full)).backward()
    block = model.layers[1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters() if p.dim() > 1)
    model.zero_grad(set_to_none=True)


def _batch(model, ids, full):
    from ztt_cli.training.losses import Batch, TaskLoss

    return Batch(model, ids, None, TaskLoss(), full)


def test_the_exit_objective_says_when_it_trains_p0_only(model):
    """A signal that is not differentiable cannot be trained: the objective trains the zero attention
    (p0) instead, as for the default signal, and says so in one line."""
    from ztt_cli.model import signals

    @signals.signal("not-differentiable")
    def fixed(exits, cycle):
        return exits.cycle_output[cycle].new_full(exits.cycle_output[cycle].shape[:2], 0.5)

    ids = token_ids(batch=2, length=16)
    objective = HealingObjective.from_options(model, options(kd_weight=0, exit_aware_weight=0, exit_objective_weight=1))
    default, _ = objective(ids)
    try:
        with model.exiting(signals.ExitPolicy("not-differentiable")):
            assert objective.notes() == ["the exit objective trains the zero attention (p0) only: the model's exit "
                                         "signal, not-differentiable, is not differentiable"]
            trained_p0, _ = objective(ids)
    finally:
        del signals.SIGNALS["not-differentiable"]
    assert torch.equal(trained_p0, default)


@pytest.mark.parametrize("length", [2, 3, 5, 6, 7, 64])
def test_token_losses_in_chunks_are_the_windows_losses_bit_for_bit(length):
    """Perplexity computes the next-token loss a few positions at a time (a copy of the logits is then
    a chunk's, not the window's); every position's loss is what the whole window's computation gives."""
    from ztt_cli.training.losses import next_token_loss
    from ztt_cli.training.quality import token_losses

    logits, ids = torch.randn(2, length, 50) * 4, token_ids(batch=2, length=length) % 50
    whole = next_token_loss(logits, ids, reduction="none")
    for chunk in (1, 2, 5, 128):
        torch.testing.assert_close(token_losses(logits, ids, chunk=chunk), whole, rtol=0, atol=0)
