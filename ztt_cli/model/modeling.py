"""The Zero-Token Transformer: a pretrained model whose middle layers share one block.

``ZTTForCausalLM`` wraps the source family's own ``*ForCausalLM`` (embeddings,
masks, rotary embeddings, final norm, lm_head, KV cache are all the family's code)
and replaces its decoder-layer list with *slots*, one per unrolled position. A slot
refers to a unique layer (not registered, so each weight exists once), points
that layer at its unrolled index (KV-cache slot, per-index attributes) and, for
block positions, hands its attention call the zero-token pool entry of its cycle.

The unique layers live in ``self.layers`` as [head..., block..., tail...]; the
pool in ``self.pool`` (key [C, K, n_kv_heads, head_dim], bias [C, K, n_heads]; K: the block's
attention layers, all of them but in a hybrid model, whose other layers have no zero token).

A *grown* model (``config.grown``) gives every block position a residual gate g
(``self.gates``, [C, K]): ``h <- h + g·(f(h) - h)``. g = 1 reproduces the layer, g = 0
skips it; at conversion cycle 1 is 1 (the kept layers of a block-influence drop, in
order) and every added cycle is 0, so the converted model computes the drop. A
position whose gate is exactly 0 is not run unless the gate is being trained: it
writes nothing to its KV-cache slot, and nothing ever reads that slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from .architecture import KV_INDEX, Family, family_for, per_layer_lists, remap_layers
from .attention import ATTENTION_NAMES, ZeroToken
from .attention import register as register_attention
from .errors import LayoutError
from .exits import TokenExits
from .host_copy import HostCopy
from .layout import Layout
from .relax import PositionDeltas, Relaxation
from .signals import NEVER, SIGNALS, ExitPolicy


class ZTTConfig(PreTrainedConfig):
    """``text_config`` describes the *unrolled* model in the source's family: ``num_hidden_layers``
    is the depth, and per-layer lists have one entry per unrolled position. The rest is ours."""

    model_type = "ztt"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    head: int = 0
    block: int = 1
    cycles: int = 1
    tail: int = 0
    pool: bool = True  # a zero-token pool; False: head-tail cycling without a zero token
    grown: bool = False  # unique layers = a drop's kept layers, one residual gate per block position
    relax_rank: int = 0  # > 0: per-(cycle, block layer) low-rank deltas on the shared weights (relax.py)
    pool_bias_init: float = -6.0
    pool_key_std: float = 0.02
    zero_logit_log_n: bool = False  # add log(#visible keys) to the zero logit
    exit_signal: str = "zero-attention"
    exit_threshold: float = NEVER  # > 1: never exit early
    halting_offsets: list[float] | None = None  # per cycle 1..C-1: the halting signal's logit offset (signals.py)
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # tying is the source model's business; mirror it so the composite model ties too
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def layout(self) -> Layout:
        return Layout(self.head, self.block, self.cycles, self.tail)


@dataclass
class ZTTCausalLMOutput(CausalLMOutputWithPast):
    """``zero_attention``: per-token zero attention, [batch, cycles, block layers, tokens], mean over heads."""

    zero_attention: torch.Tensor | None = None
    exit_cycles: torch.Tensor | None = None  # [batch, tokens]: the cycle each token exited after
    exit_signals: torch.Tensor | None = None  # [batch, cycles - 1, tokens]: each cycle's signal (NaN: not computed)


class ZeroTokenPool(nn.Module):
    def __init__(self, cycles: int, block: int, n_kv_heads: int, n_heads: int, head_dim: int, key_std, bias_init):
        super().__init__()
        self.key = nn.Parameter(torch.empty(cycles, block, n_kv_heads, head_dim))
        self.bias = nn.Parameter(torch.empty(cycles, block, n_heads))
        self.key_std, self.bias_init = key_std, bias_init
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.key.normal_(0.0, self.key_std)
        self.bias.fill_(self.bias_init)


class ResidualGates(nn.Module):
    """One scalar gate per (cycle, block layer): ``h <- h + g·(f(h) - h)``, no squashing, so 0 and
    1 are exact. Initialised to 1 on cycle 1 (the layers a drop keeps) and 0 on added cycles."""

    def __init__(self, cycles: int, block: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cycles, block))
        self._closed = HostCopy(_closed_gates, frozenset())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.weight[0] = 1.0

    def closed(self, cycle: int, position: int) -> bool:
        """Whether the position's gate is exactly 0 and not being trained: it need not run. The set
        of closed gates is read from the device only when the weights change (a host sync then)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return False
        return (cycle, position) in self._closed(self.weight)


def _closed_gates(weight: torch.Tensor) -> frozenset[tuple[int, int]]:
    """The (cycle, position) pairs whose gate is exactly 0."""
    return frozenset((c + 1, j) for c, row in enumerate(weight.tolist()) for j, g in enumerate(row) if g == 0.0)


class _ForwardRecord:
    """What the slots of one forward pass write down (plain object, shared by all slots)."""

    def __init__(self):
        self.zero: dict[tuple[int, int], torch.Tensor] = {}
        self.pool_on = True
        self.exit_after: int | None = None  # skip the cycles after this one (all tokens)
        self.exits: TokenExits | None = None  # per-token early exit, when active
        self.zero_cycles = 0  # the zero attention of cycles 1..zero_cycles is read in this pass; later cycles skip p0

    def put(self, cycle: int, position: int, p0: torch.Tensor) -> None:
        self.zero[(cycle, position)] = p0  # keyed, so a checkpointed recompute overwrites

    def zero_attention(self, block: int, cycles: int) -> torch.Tensor | None:
        """[B, C, K, T] over the block's ``block`` attention layers (K: all of the block, but in a hybrid)."""
        if not self.zero:
            return None
        rows = [torch.stack([self.zero[(c, j)].mean(1) for j in range(block)], dim=1) for c in range(1, cycles + 1)]
        return torch.stack(rows, dim=1)


class ExitStats:
    """Cycles run per token, accumulated over forward passes with early exit (``reset()`` to clear).
    Counted on the device the tokens are on: reading ``tokens`` or ``mean_cycles`` is the only
    host read."""

    def __init__(self, cycles: int):
        # explicit device: from_pretrained builds models under a meta-device context
        self.histogram = torch.zeros(cycles + 1, dtype=torch.long, device="cpu")  # c: tokens that exited after cycle c

    def add(self, exit_cycles: torch.Tensor) -> None:
        if self.histogram.device != exit_cycles.device:
            self.histogram = self.histogram.to(exit_cycles.device)
        flat = exit_cycles.flatten()
        self.histogram.scatter_add_(0, flat, torch.ones_like(flat))  # no host read (bincount sizes on the host)

    def reset(self) -> None:
        self.histogram.zero_()

    @property
    def tokens(self) -> int:
        return int(self.histogram.sum())

    @property
    def mean_cycles(self) -> float:
        c = torch.arange(len(self.histogram), dtype=torch.float64, device=self.histogram.device)
        return float((self.histogram * c).sum() / max(self.tokens, 1))


class LayerSlot(nn.Module):
    """One unrolled position. Holds its layer by reference so shared weights are registered once.

    What the plain model does not pay is kept off the per-call path: an unshared layer is pointed
    at its slot once, and at inference the slot keeps its zero-token entry (rebuilt only when the
    pool's tensors change) and one bound key/value hook."""

    def __init__(self, layer: nn.Module, slot, family: Family, model: ZTTForCausalLM):
        super().__init__()
        self.index, self.cycle, self.position, self.attribute = slot.index, slot.cycle, slot.position, slot.attribute
        self._refs = (layer, family, model)  # a tuple: not registered as submodules
        self._zero: tuple | None = None  # (pool tensors' versions, ZeroToken), inference only
        # the head and tail, and every layer of a one-cycle model without pool, gates or deltas
        # (a drop): used by this slot alone, run as the family runs it
        one_cycle = model.config.cycles == 1 and model.pool is None and model.gates is None and model.relax is None
        self._plain = self.cycle is None or one_cycle
        # in a hybrid, a block layer without attention has no zero token (and no keys or values to copy)
        self._attends = self.cycle is None or self.position in model.zero_positions
        self.zero_index = model.zero_positions.index(self.position) if self.cycle and self._attends else None
        point = family.pointer(layer, self.index, self.attribute, model.inner.config)
        if model._hybrid:  # a hybrid's model loop reads a layer's kind off the layer list (Nemotron-H's block_type)
            for module, name, value in point.targets:
                if module is layer and name != KV_INDEX and not hasattr(self, name):
                    setattr(self, name, value)
        if self._plain:
            point()
        else:
            self._point = point
            # bound methods and partials, not closures: a deep copy of the model rebinds them to its own
            self._kv_hook = self._copied_kv
            self._sink = partial(model._record.put, self.cycle, self.zero_index)

    @property
    def layer(self) -> nn.Module:
        """The decoder layer this position runs (shared by every cycle of a block position)."""
        return self._refs[0]

    def _copied_kv(self, key, value, q_len):
        return self._refs[2]._record.exits.kv_hook(self.cycle, self.position, key, value, q_len)

    def extra_repr(self) -> str:
        where = f"cycle={self.cycle}, position={self.position}" if self.cycle else "unshared"
        return f"index={self.index}, {where}"

    def forward(self, hidden_states, *args, **kwargs):
        layer, family, model = self._refs
        if self._plain:
            return layer(hidden_states, *args, **kwargs)
        record = model._record
        if record.exit_after is not None and self.cycle > record.exit_after:
            return hidden_states  # exited: straight on to the tail
        exits = record.exits
        if exits is not None and self.position == 0:
            exits.begin_cycle(self.cycle, hidden_states)
        gates = model.gates
        if gates is not None and gates.closed(self.cycle, self.position):
            return self._closed(model, exits, hidden_states)
        if exits is not None and self._attends:
            if exits.all_exited:  # a decoding step whose tokens have all exited: run nothing
                exits.skip(self.cycle, self.position, self.index)
                return self._end_of_cycle(exits, hidden_states)
            kwargs["ztt_kv"] = self._kv_hook
        # (a layer without attention runs even then, on the frozen states: its recurrent state then
        # sees what an uncached replay of the same exits feeds it, and its output is dropped below)
        self._point()
        if model.pool is not None and record.pool_on and self._attends:
            kwargs["ztt_zero"] = self._zero_token(model)
        if model.relax is not None:
            out = model.relax.run(layer, self.position, self.cycle, (hidden_states, *args), kwargs)
        else:
            out = layer(hidden_states, *args, **kwargs)
        if gates is not None:  # lerp: exactly f(h) at g = 1, exactly h at g = 0
            out = torch.lerp(hidden_states, out, gates.weight[self.cycle - 1, self.position].to(out.dtype))
        if exits is not None:
            if exits.all_exited:
                out = hidden_states
            elif exits.any_exited:
                out = torch.where(exits.active_mask, out, hidden_states)  # exited tokens stay
            out = self._end_of_cycle(exits, out)
        return out

    def _zero_token(self, model: ZTTForCausalLM) -> ZeroToken:
        """This position's pool entry: built per call where it may need a gradient or is being
        traced, kept otherwise (rebuilt when the pool's tensors change: a step, a load, a move)."""
        pool, c, j, log_n = model.pool, self.cycle - 1, self.zero_index, model.config.zero_logit_log_n
        if (torch.is_grad_enabled() and pool.key.requires_grad) or torch.compiler.is_compiling():
            return ZeroToken(pool.key[c, j], pool.bias[c, j], log_n, self._sink)
        sink = self._sink if self.cycle <= model._record.zero_cycles else None  # nobody reads p0: not computed
        version = (pool.key._version, pool.bias._version, pool.key.data_ptr(), pool.bias.data_ptr(), log_n, sink)
        if self._zero is None or self._zero[0] != version:
            self._zero = (version, ZeroToken(pool.key[c, j], pool.bias[c, j], log_n, sink))
        return self._zero[1]

    def _closed(self, model: ZTTForCausalLM, exits: TokenExits | None, hidden: torch.Tensor) -> torch.Tensor:
        """A position whose gate is 0: nothing runs. Its zero attention is NaN (not computed), so the
        zero-attention signal never exits a token after a closed cycle."""
        record = model._record
        if model.pool is not None and record.pool_on and self._attends:
            shape = (hidden.shape[0], model.pool.bias.shape[-1], hidden.shape[1])
            record.put(self.cycle, self.zero_index, hidden.new_full(shape, float("nan")))
        if exits is None:
            return hidden
        exits.pass_through(self.cycle, self.position)
        return self._end_of_cycle(exits, hidden)

    def _end_of_cycle(self, exits: TokenExits, hidden: torch.Tensor) -> torch.Tensor:
        if self.position == self._refs[2].config.block - 1:
            exits.end_of_cycle(self.cycle, hidden)
        return hidden


def attending_positions(model: ZTTForCausalLM, slots: list, family: Family, hybrid: bool) -> list[int]:
    """The block positions whose layer has the family's attention. In a hybrid, every unrolled position
    must be of its layer's kind (a cycled layer keeps it), and the block needs an attention layer."""
    config, layout = model.config, model.config.layout
    if not hybrid:
        return list(range(layout.block))
    kind = {True: "an attention layer", False: "a layer without attention"}
    for slot in slots:
        layer = model.layers[slot.unique]
        here = family.attends_at(layer, slot.index, slot.attribute, model.inner.config)
        if family.attends(layer) != here:
            raise LayoutError(
                f"unrolled position {slot.index} would run {kind[not here]} where the source has {kind[here]}: "
                "a shared layer keeps its kind, so the block's pattern of attention and other layers must repeat",
                hint="choose {head} and {block} so that every cycle of the block meets the same pattern",
                fields=("head", "block"))
    block = model.layers[layout.head : layout.head + layout.block]
    positions = [j for j, layer in enumerate(block) if family.attends(layer)]
    if not positions and (config.pool or config.cycles > 1):
        raise LayoutError(
            f"the shared block (source layers {layout.head}..{layout.head + layout.block - 1}) has no attention "
            "layer: the zero token and early exit live in the block's attention layers",
            hint="choose {head} and {block} so that the block holds one of the source's attention layers",
            fields=("head", "block"))
    return positions


class _BlockView:
    """The model's config as the exits read it, with the block's attention layers as its block."""

    def __init__(self, config: ZTTConfig, block: int):
        self._config, self.block = config, block

    def __getattr__(self, name):
        if name.startswith("_"):  # (copying looks up hooks before the config is set)
            raise AttributeError(name)
        return getattr(self._config, name)


class ZTTPreTrainedModel(PreTrainedModel):
    config_class = ZTTConfig
    base_model_prefix = "ztt"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, (ZeroTokenPool, ResidualGates, PositionDeltas)):
            module.reset_parameters()
        else:
            super()._init_weights(module)


PARAMETER_ROLES = ("block", "unshared", "pool", "gates", "relax", "other")  # see parameter_groups()


class ZTTForCausalLM(ZTTPreTrainedModel, GenerationMixin):
    def __init__(self, config: ZTTConfig, source: PreTrainedModel | None = None):
        """Build from ``config`` alone (random weights, filled by ``from_pretrained``), or around a
        loaded ``source`` model whose layers are taken as they are (see :func:`ztt_cli.convert`)."""
        register_attention()  # idempotent; loaded as remote code, nothing else would register it
        super().__init__(config)
        layout = config.layout
        text_config = config.text_config
        impl = config._attn_implementation if config._attn_implementation in ATTENTION_NAMES else "sdpa"
        if source is None:  # each unique layer built as its first unrolled position
            source = AutoModelForCausalLM.from_config(remap_layers(text_config, layout.first_positions(config.grown)))
            family = family_for(source)
            unique = list(family.layer_list(source))
        else:
            family = family_for(source)
            by_index = list(family.layer_list(source))
            unique = [by_index[i] for i in layout.unique_sources(len(by_index))]
        source.config.num_hidden_layers = layout.depth
        for name in per_layer_lists(text_config):  # per unrolled position, as text_config gives them
            setattr(source.config, name, list(getattr(text_config, name)))
        source.config._attn_implementation = ATTENTION_NAMES[impl]
        self.inner = source
        self.family = family  # the source family's conventions (architecture.py): its layer list, attention
        self.layers = nn.ModuleList(unique)
        self._hybrid = hybrid = not all(family.attends(layer) for layer in family.layer_list(source))
        slots = layout.slots(config.grown)
        # the block positions whose layer has attention: where the zero token lives (all, but in a hybrid)
        self.zero_positions = attending_positions(self, slots, family, hybrid)
        n_heads = text_config.num_attention_heads
        n_kv = getattr(text_config, "num_key_value_heads", None) or n_heads
        # the width of queries and keys: multi-head latent attention (DeepSeek) has its own
        head_dim = (getattr(text_config, "qk_head_dim", None) or getattr(text_config, "head_dim", None)
                    or text_config.hidden_size // n_heads)
        self.pool = (
            ZeroTokenPool(layout.cycles, len(self.zero_positions), n_kv, n_heads, head_dim, config.pool_key_std,
                          config.pool_bias_init)
            if config.pool
            else None
        )
        self.gates = ResidualGates(layout.cycles, layout.block) if config.grown else None
        block = list(self.layers[layout.head : layout.head + layout.block])
        self.relax = Relaxation(block, layout.cycles, config.relax_rank) if config.relax_rank > 0 else None
        self._record = _ForwardRecord()
        self._exit_policy: ExitPolicy | None = None  # set by exiting(); None: the checkpoint's
        self.exit_stats = ExitStats(layout.cycles)
        # the exits' view of the block: its attention layers (all of it, but in a hybrid)
        self._exit_config = config if not hybrid else _BlockView(config, len(self.zero_positions))
        slots = [LayerSlot(self.layers[s.unique], s, family, self) for s in slots]
        family.set_layer_list(self.inner, nn.ModuleList(slots))
        self.post_init()

    # --- plumbing transformers expects -------------------------------------------------
    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.inner.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits read straight off a hidden state: the final norm and the LM head, no tail."""
        norm = self.family.final_norm(self.inner)
        if norm is None:
            raise ValueError(f"{self.family.model_type} has no single final norm for the logit lens")
        return self.get_output_embeddings()(norm(hidden))

    def set_output_embeddings(self, value):
        self.inner.set_output_embeddings(value)

    # --- the model ------------------------------------------------------------------------
    @contextlib.contextmanager
    def pool_disabled(self):
        """Run as plain weight sharing (head-tail cycling), pool untouched."""
        before, self._record.pool_on = self._record.pool_on, False
        try:
            yield self
        finally:
            self._record.pool_on = before

    def settings_now(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A context (factory) that runs within the forward pass's settings as they are now: the pool on
        or off, the cycles it exits after, the zero attention it reads. A position recomputed in the
        backward pass, checkpointed around its slot, must see them again. (Per-token exits are not
        replayed: their state moves on as the pass runs.)"""
        record = self._record
        now = (record.pool_on, record.exit_after, record.zero_cycles)

        @contextlib.contextmanager
        def again():
            before = (record.pool_on, record.exit_after, record.zero_cycles)
            record.pool_on, record.exit_after, record.zero_cycles = now
            try:
                yield
            finally:
                record.pool_on, record.exit_after, record.zero_cycles = before

        return again

    @property
    def exit_policy(self) -> ExitPolicy:
        """The exit policy in force: the one :meth:`exiting` set, else the checkpoint's (config.json)."""
        return self._exit_policy or ExitPolicy.for_checkpoint(self.config)

    @contextlib.contextmanager
    def exiting(self, policy: ExitPolicy):
        """Run with ``policy`` (signal and threshold) instead of the checkpoint's, for every call in
        the block (``generate()``, wrappers that call the model): the config is left as it is."""
        before, self._exit_policy = self._exit_policy, policy
        try:
            yield self
        finally:
            self._exit_policy = before

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, exit_after: int | None = None,
                exit_map: torch.Tensor | None = None, exit_policy: ExitPolicy | None = None,
                exit_threshold: float | None = None, output_zero_attention: bool = True, **kwargs) -> ZTTCausalLMOutput:
        """``exit_after=c`` runs cycles 1..c only, then the tail (the exit after cycle c, for every token;
        without a KV cache).

        Per-token early exit follows the exit policy: ``exit_policy`` if given, else the one in force
        (:attr:`exit_policy`); ``exit_threshold`` replaces its threshold. It is on when the threshold
        is at most 1: after cycle c < C a token whose exit signal is at or above it skips the remaining
        cycles. ``exit_map`` [batch, tokens] replays given decisions instead (the cycle each token
        exits after; C = full depth). ``exit_cycles`` in the output says what happened.

        ``zero_attention`` in the output is stacked only when asked for (``output_zero_attention``,
        on by default, off in ``generate()``: decoding reads no per-layer tensors it does not use)."""
        if "past_key_values" in kwargs:  # older spelling of the cache argument
            cache = kwargs.pop("past_key_values")
        if exit_after is not None and (use_cache or cache is not None):
            raise ValueError("exit_after is for uncached passes (training and scoring)")
        self._record.zero = {}
        self._record.exit_after = exit_after
        policy = (exit_policy or self.exit_policy).with_threshold(exit_threshold)
        self._record.exits = None
        if exit_after is None and self.config.cycles > 1 and (exit_map is not None or policy.active):
            policy.check(self.pool is not None and self._record.pool_on, exits=True)
            if cache is None and (use_cache or (use_cache is None and getattr(self.inner.config, "use_cache", False))):
                cache = DynamicCache(config=self.inner.config)
            self._record.exits = TokenExits(self._exit_config, policy.threshold, SIGNALS[policy.signal].score, exit_map,
                                            self._record.zero, cache, self.logit_lens)
        self._record.zero_cycles = self._zero_read(output_zero_attention, policy)
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        skipped = self._record.exits is not None and self._record.exits.skipped_any
        zero = (None if skipped or not output_zero_attention
                else self._record.zero_attention(len(self.zero_positions), exit_after or self.config.cycles))
        exits, self._record.exits = self._record.exits, None
        exit_cycles = exits.cycle if exits is not None else None
        exit_signals = exits.signal_table() if exits is not None else None
        if exit_cycles is not None:
            self.exit_stats.add(exit_cycles)
        self._record.zero, self._record.exit_after = {}, None
        return ZTTCausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            cache=getattr(out, "cache", None),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            zero_attention=zero,
            exit_cycles=exit_cycles,
            exit_signals=exit_signals,
        )

    def _zero_read(self, output_zero_attention: bool, policy: ExitPolicy) -> int:
        """The cycles whose zero attention this pass reads: all when it is returned; with exits on and
        a signal that reads it, the cycles after which tokens may exit (1..C-1); otherwise none."""
        if output_zero_attention:
            return self.config.cycles
        exits = self._record.exits
        return self.config.cycles - 1 if exits is not None and SIGNALS[policy.signal].needs_pool else 0

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("output_zero_attention", False)
        return inputs

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter once, by role, each group in ``parameters()`` order: ``block`` (the shared
        block's layers), ``unshared`` (the head's and tail's layers), ``pool``, ``gates``, ``relax``
        (the per-cycle deltas) and ``other`` (embeddings, final norm, lm_head)."""
        lay = self.config.layout
        block = self.layers[lay.head : lay.head + lay.block]
        roles = {id(p): role for role, module in (("unshared", self.layers), ("block", block), ("pool", self.pool),
                                                  ("gates", self.gates), ("relax", self.relax))
                 if module is not None for p in module.parameters()}
        groups: dict[str, list[nn.Parameter]] = {r: [] for r in PARAMETER_ROLES}
        for p in self.parameters():
            groups[roles.get(id(p), "other")].append(p)
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by role (:meth:`parameter_groups`), the unique layers together as ``layers``."""
        n = {role: sum(p.numel() for p in params) for role, params in self.parameter_groups().items()}
        counts = {"total": sum(n.values()), "layers": n["block"] + n["unshared"]}
        return {**counts, **{role: n[role] for role in ("pool", "gates", "relax", "other")}}


def register() -> None:
    register_attention()
    AutoConfig.register("ztt", ZTTConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZTTConfig, ZTTForCausalLM, exist_ok=True)
