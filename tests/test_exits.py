"""Per-token early exit: thresholds, replay of exit maps, state copying, real skipping."""

import pytest
import torch

from ztt_cli.host_reads import HostReads
from ztt_cli.model.modeling import LayerSlot
from ztt_cli.model.signals import ExitPolicy

from .fixtures import greedy_with_cache, token_ids, ztt_model

LAYOUT = (1, 2, 2, 1)
DEEP = (0, 2, 3, 0)  # three cycles: copies come from cycle 1 or 2




def cycle1_signal(model, ids):
    """The cycle-1 exit signal of every token (recorded by a full-depth replay)."""
    captured = {}
    import ztt_cli.model.exits as exits_mod

    original = exits_mod.TokenExits.end_of_cycle

    def spy(self, cycle, hidden):
        original(self, cycle, hidden)
        if cycle in self.signals:
            captured.setdefault(cycle, self.signals[cycle])

    exits_mod.TokenExits.end_of_cycle = spy
    try:
        with torch.no_grad():
            model(ids, exit_map=torch.full(ids.shape, model.config.cycles))
    finally:
        exits_mod.TokenExits.end_of_cycle = original
    return captured[1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_threshold_above_one_is_full_depth_and_zero_exits_after_cycle_one(family):
    model, _ = ztt_model(family, LAYOUT)
    ids = token_ids(length=12)
    full = model(ids)
    above = model(ids, exit_threshold=1.5)
    assert torch.equal(above.logits, full.logits) and above.exit_cycles is None
    replay_full = model(ids, exit_map=torch.full(ids.shape, 2))
    torch.testing.assert_close(replay_full.logits, full.logits, atol=1e-6, rtol=0)
    zero = model(ids, exit_threshold=0.0)
    assert zero.exit_cycles.eq(1).all()
    torch.testing.assert_close(zero.logits, model(ids, exit_after=1).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,layout,signal", [
    ("llama", LAYOUT, "zero-attention"), ("llama", DEEP, "zero-attention"),
    ("gpt2", DEEP, "saturation"), ("opt", LAYOUT, "saturation"), ("qwen2", DEEP, "zero-attention"),
    ("mistral", DEEP, "zero-attention"), ("llama", DEEP, "confidence"), ("gpt2", LAYOUT, "confidence"),
])
@torch.no_grad()
def test_cached_decoding_with_exits_equals_the_uncached_replay(family, layout, signal):
    model, _ = ztt_model(family, layout, pool=signal == "zero-attention")
    model.config.exit_signal = signal
    prompt = token_ids(batch=1, length=6, seed=3)
    threshold = float(cycle1_signal(model, token_ids(batch=1, length=24, seed=3)).median())
    ids, cycles, cached_logits = greedy_with_cache(model, prompt, 14, threshold)
    assert cycles.min() < model.config.cycles and cycles.max() > 1, "want a mix of exits"
    assert cycles.shape == ids.shape  # one exit cycle per token fed through the cache
    replay = model(ids[:, :-1], exit_map=cycles[:, :-1])  # one uncached pass, the same decisions
    generated = replay.logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(generated, cached_logits[:, :-1], atol=1e-5, rtol=0)
    assert torch.equal(generated.argmax(-1), ids[:, prompt.shape[1] :])


@torch.no_grad()
def test_generate_uses_the_configured_threshold_and_batches_like_single_sequences():
    model, _ = ztt_model("llama", DEEP)
    prompts = torch.cat([token_ids(batch=1, length=6, seed=3), token_ids(batch=1, length=6, seed=8)])
    model.config.exit_threshold = float(cycle1_signal(model, token_ids(batch=1, length=24, seed=3)).median())
    model.exit_stats.reset()
    together = model.generate(prompts, max_new_tokens=10, do_sample=False, pad_token_id=1)
    assert 1 < model.exit_stats.mean_cycles < 3 and model.exit_stats.tokens > 0
    for i in range(2):
        alone = model.generate(prompts[i : i + 1], max_new_tokens=10, do_sample=False, pad_token_id=1)
        assert torch.equal(together[i : i + 1], alone)
        manual, _, _ = greedy_with_cache(model, prompts[i : i + 1], 10, model.config.exit_threshold)
        assert torch.equal(alone, manual[:, : alone.shape[1]])


@torch.no_grad()
def test_decoding_really_skips_exited_cycles():
    model, _ = ztt_model("llama", DEEP)
    calls = {"n": 0}
    handles = [layer.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for layer in model.layers]
    prompt = token_ids(batch=1, length=5)
    out = model(prompt, use_cache=True, exit_threshold=0.0)
    calls["n"] = 0
    step = model(prompt[:, -1:], cache=out.cache, use_cache=True, exit_threshold=0.0)
    assert calls["n"] == 2  # cycle 1's two layers; cycles 2 and 3 skipped
    assert len(step.cache.layers) == 6 and all(layer.keys.shape[2] == 6 for layer in step.cache.layers)
    calls["n"] = 0
    model(prompt[:, -1:], cache=step.cache, use_cache=True, exit_threshold=1.5)
    assert calls["n"] == 6
    for h in handles:
        h.remove()


def test_zero_attention_signal_needs_a_pool():
    model, _ = ztt_model("llama", LAYOUT, pool=False)
    with pytest.raises(ValueError, match="needs a zero-token pool"):
        model(token_ids(), exit_threshold=0.5)


@torch.no_grad()
def test_left_padded_batch_generates_what_each_sequence_gets_alone():
    model, _ = ztt_model("llama", DEEP)
    model.config.exit_threshold = float(cycle1_signal(model, token_ids(batch=1, length=24, seed=3)).median())
    short, long = token_ids(batch=1, length=4, seed=5), token_ids(batch=1, length=7, seed=6)
    ids = torch.cat([torch.cat([torch.full((1, 3), 1), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)], 1),
                      torch.ones(1, 7, dtype=torch.long)])
    together = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    for i, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1)
        assert torch.equal(together[i, -8:], alone[0, -8:])


def test_exit_policy_resolution_and_pool_check():
    from types import SimpleNamespace

    from ztt_cli.model.signals import NEVER, ExitPolicy, ExitPolicyError

    config = SimpleNamespace(exit_threshold=0.3, exit_signal="zero-attention")
    assert ExitPolicy.for_checkpoint(config) == ExitPolicy("zero-attention", 0.3)
    assert ExitPolicy.for_checkpoint(config, threshold=0.7) == ExitPolicy("zero-attention", 0.7)
    assert ExitPolicy.for_checkpoint(config, threshold=0.7, full_depth=True).threshold == NEVER
    assert ExitPolicy.for_checkpoint(config, signal="saturation").signal == "saturation"
    assert not ExitPolicy.for_checkpoint(config, full_depth=True).active
    with pytest.raises(ExitPolicyError, match="no zero-token pool"):
        ExitPolicy.for_checkpoint(config).check(has_pool=False)
    ExitPolicy.for_checkpoint(config, full_depth=True).check(has_pool=False)  # never exits: nothing to refuse
    ExitPolicy("saturation", 0.5).check(has_pool=False)


@torch.no_grad()
def test_an_exit_policy_is_passed_to_the_model_not_written_into_its_config():
    """``forward(exit_policy=...)`` (``generate()`` passes it on) and ``with model.exiting(policy):``
    run the model as ``exit_threshold`` does; the config, the checkpoint's saved default, stays."""
    from ztt_cli.model.signals import ExitPolicy

    model, _ = ztt_model("llama", DEEP)
    saved = model.config.to_dict()
    ids, prompt = token_ids(batch=2, length=12), token_ids(batch=1, length=6, seed=3)
    policy = ExitPolicy("zero-attention", float(cycle1_signal(model, token_ids(batch=1, length=24, seed=3)).median()))
    reference = model(ids, exit_threshold=policy.threshold)
    assert reference.exit_cycles.min() < 3  # some tokens exit early
    given = model(ids, exit_policy=policy)
    with model.exiting(policy):
        assert model.exit_policy == policy
        scoped = model(ids)
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1)
    for out in (given, scoped):
        assert torch.equal(out.exit_cycles, reference.exit_cycles) and torch.equal(out.logits, reference.logits)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1, exit_policy=policy),
                       generated)
    assert model.exit_policy == ExitPolicy.for_checkpoint(model.config) and model.config.to_dict() == saved
    assert model(ids).exit_cycles is None  # the checkpoint's own policy again: full depth


def test_a_new_signal_is_one_registered_function():
    """A signal is a function of the forward pass's state; registering it is all it takes."""
    from ztt_cli.model import signals

    @signals.signal("always-exit")
    def always(exits, cycle):
        return exits.cycle_output[cycle].new_ones(exits.cycle_output[cycle].shape[:2])

    try:
        model, _ = ztt_model("llama", DEEP, pool=False)
        model.config.exit_signal = "always-exit"
        out = model(token_ids(), exit_threshold=0.5)
        assert torch.all(out.exit_cycles == 1)
    finally:
        del signals.SIGNALS["always-exit"]


def test_options_offer_the_registered_signals():
    import typing

    from ztt_cli.model.signals import SIGNALS
    from ztt_cli.stages import CalibrateOptions

    choices = typing.get_args(typing.get_args(CalibrateOptions.model_fields["signal"].annotation)[0])
    assert set(choices) == set(SIGNALS) == {"zero-attention", "saturation", "halting", "confidence"}


@pytest.mark.parametrize("cycles", [2, 3, 4])
@torch.no_grad()
def test_a_decoding_step_reads_the_device_at_most_once(cycles):
    """Host reads (each a synchronisation on a GPU) in one cached decoding step, beyond what the
    source model's own step does: none at full depth; with exits on at most one, whatever the
    number of cycles and wherever the tokens exit."""
    model, source = ztt_model("llama", (1, 2, cycles, 1))
    prompt = token_ids(batch=3, length=5)

    def reads(m, **kwargs) -> int:
        out = m(prompt, use_cache=True, **kwargs)
        step = {k: v[:, -1:] for k, v in kwargs.items() if k == "exit_map"}
        with HostReads() as counted:
            m(prompt[:, -1:], cache=out.cache, use_cache=True, **{**kwargs, **step})
        return counted.count

    own = reads(source)
    assert reads(model) == own
    assert reads(model, exit_threshold=2.0) == own
    for threshold in (0.0, 0.5, 1.0):
        assert reads(model, exit_threshold=threshold) <= own + 1
    mixed = torch.tensor([1, 2, cycles])[:, None].expand(3, 5)  # tokens exit after different cycles
    assert reads(model, exit_map=mixed) <= own + 1
    assert model.exit_stats.tokens > 0  # counted without a read per step


@pytest.mark.parametrize("signal,output_zero,computed", [
    ("zero-attention", False, {1, 2}),  # the signal reads cycles 1 and 2 of 3: not the last
    ("saturation", False, set()),  # nothing reads the zero attention
    ("saturation", True, {1, 2, 3}),  # returned to the caller: every cycle
])
@torch.no_grad()
def test_zero_attention_is_computed_only_for_the_cycles_read(signal, output_zero, computed, monkeypatch):
    model, _ = ztt_model("llama", DEEP)
    model.config.exit_signal = signal
    asked = []  # cycles whose attention call is handed a sink for p0 (no sink: p0 is not computed)
    original = LayerSlot._zero_token

    def spy(self, m):
        entry = original(self, m)
        if entry.sink is not None:
            asked.append(self.cycle)
        return entry

    monkeypatch.setattr(LayerSlot, "_zero_token", spy)
    ids = token_ids(batch=1, length=6)
    out = model(ids, exit_threshold=1.0, output_zero_attention=output_zero)
    assert set(asked) == computed
    assert (out.zero_attention is not None) == output_zero
    reference = model(ids, exit_threshold=1.0)  # the exits taken do not depend on what is computed beside them
    assert torch.equal(out.exit_cycles, reference.exit_cycles)
    torch.testing.assert_close(out.logits, reference.logits, atol=0, rtol=0)


@torch.no_grad()
def test_a_signal_can_read_the_logits_through_the_logit_lens():
    """``exits.logits(cycle)``: the cycle's output through the final norm and the LM head, the tail
    skipped; the ``confidence`` signal is its largest probability."""
    model, _ = ztt_model("llama", DEEP, pool=False)
    ids = token_ids(length=10)
    seen = {}
    import ztt_cli.model.exits as exits_mod

    original = exits_mod.TokenExits.end_of_cycle

    def spy(self, cycle, hidden):
        original(self, cycle, hidden)
        if cycle in self.signals:
            seen[cycle] = (self.signals[cycle], self.logits(cycle), hidden)

    exits_mod.TokenExits.end_of_cycle = spy
    try:
        model(ids, exit_map=torch.full(ids.shape, 3), exit_policy=ExitPolicy("confidence", 0.5))
    finally:
        exits_mod.TokenExits.end_of_cycle = original
    signal, logits, hidden = seen[1]
    lens = model.inner.lm_head(model.inner.model.norm(hidden))
    torch.testing.assert_close(logits, lens)
    torch.testing.assert_close(signal, lens.softmax(-1).amax(-1))
