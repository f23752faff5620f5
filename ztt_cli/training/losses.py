"""The healing objective: distillation, exit-aware loss and the zero token's exit objective.

The objective is the task loss ``(1 - w)·CE + w·T²·KL`` at full depth plus weighted *terms*.
Each term is a class registered in ``TERMS`` that names the ``FinetuneOptions`` field holding
its weight and computes its value from a shared :class:`Batch` (ids, teacher logits, the
full-depth output, and the exited outputs per cycle, each computed once, on first use). A
term whose weight is 0 is not built, so it costs nothing. A new term is a class here plus its
weight option in ``FinetuneOptions`` (``ztt_cli.stages``).

On a grown model (residual gates on the added cycles) each exit's terms are weighted by how
open the cycles after it are: mean |g| over their gates, at most 1, not differentiated. While
those gates are 0, exiting changes nothing (every exit target exp(-KL) is 1), so the terms
would only push the zero token without information (``rank``: no gradient; ``bce``: p0 -> 1,
whose (1 - p0) scaling erases the very layers that reproduce the source). They therefore start
at 0, are not even computed, and phase in as healing opens the added cycles."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZTTError
from ..model.signals import HALT, SIGNALS, ExitPolicy, halting_rates

ZERO_ATTENTION = "zero-attention"  # the method's exit signal: the zero token's attention p0


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``, in float32.

    ``reduction`` as for ``F.cross_entropy``; ``"none"`` gives one loss per position, [B, T-1]."""
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)
    return loss.view(ids.shape[0], -1) if reduction == "none" else loss


@dataclass(frozen=True)
class SparseLogits:
    """The teacher's k largest logits per position and their token ids, [B, T, k] each (``teacher.py``)."""

    values: torch.Tensor
    indices: torch.Tensor


def task_loss(logits, ids, teacher_logits, kd_weight: float, temperature: float, reduction: str = "mean"):
    """(1 - w) * CE + w * T^2 * KL(teacher || student at T), over next-token positions. With the
    teacher's top-k logits (:class:`SparseLogits`), the teacher's distribution is renormalised over
    its k tokens and the student's log-probabilities (over the whole vocabulary) are read there.

    Returns (loss, ce, kd) with ce and kd detached for logging; ``reduction="none"``: each per
    position, [B, T-1]."""
    ce = next_token_loss(logits, ids, reduction=reduction)
    if teacher_logits is None or kd_weight == 0:
        return ce, ce.detach(), None
    sparse = isinstance(teacher_logits, SparseLogits)
    t = (teacher_logits.values if sparse else teacher_logits)[:, :-1].float() / temperature
    log_p_teacher = t.log_softmax(-1)
    log_p_student = (logits[:, :-1].float() / temperature).log_softmax(-1)
    if sparse:
        log_p_student = log_p_student.gather(-1, teacher_logits.indices[:, :-1].long())
    kd = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    kd = (kd if reduction == "none" else kd.mean()) * temperature**2
    return (1 - kd_weight) * ce + kd_weight * kd, ce.detach(), kd.detach()


def exit_target(exit_logits, full_logits):
    """exp(-KL(exit || full)) per token, from detached logits: 1 when exiting changes nothing. One
    sequence at a time: the KL's five vocabulary-sized temporaries are a sequence's, not the batch's."""
    with torch.no_grad():
        kl = torch.stack([_kl(e, f) for e, f in zip(exit_logits, full_logits)])
        return torch.exp(-kl.clamp(min=0))


def _kl(exit_logits, full_logits):
    log_exit = exit_logits.float().log_softmax(-1)
    log_full = full_logits.float().log_softmax(-1)
    return (log_exit.exp() * (log_exit - log_full)).sum(-1)


def exit_objective(signal: torch.Tensor, target: torch.Tensor, form: str = "rank") -> torch.Tensor:
    """How far an exit ``signal`` in [0, 1] (the zero attention p0, or another trained signal) is from
    ``target`` = exp(-KL(exit || full)), per token. Below, p0 stands for the signal.

    ``bce``: binary cross-entropy, pulling p0 to the target's level (its gradient wrt the zero
    logit, p0 - target, does not vanish while p0 is small). Targets are often near 1, and p0 also
    scales its layer's attention output by (1 - p0), so this can damp the block heavily.
    ``rank`` (default): 1 - Pearson correlation of logit(p0) and logit(target) over the batch's
    tokens. It asks p0 to *order* tokens like the target and leaves its level free: the exit
    threshold is calibrated afterwards anyway, and low p0 keeps the block's output intact."""
    signal = signal.float().clamp(1e-6, 1 - 1e-6)
    if form == "bce":
        return F.binary_cross_entropy(signal, target)
    a = torch.logit(signal).flatten()
    b = torch.logit(target.clamp(1e-6, 1 - 1e-6)).flatten()
    a, b = a - a.mean(), b - b.mean()
    return 1 - (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-9)


@dataclass(frozen=True)
class TaskLoss:
    """The loss at one output: (1 - w)·CE + w·T²·KL; w = 0 without a teacher."""

    kd_weight: float = 0.0
    temperature: float = 1.0

    def __call__(self, logits, ids, teacher_logits, reduction: str = "mean"):
        return task_loss(logits, ids, teacher_logits, self.kd_weight, self.temperature, reduction)


class Batch:
    """One micro-batch as the terms see it. The exit after cycle ``c`` is computed on first
    request and kept; it carries gradients when a term that needs them (``exit_grad``) applies.
    The task loss at each output is computed once: averaged over tokens, or, when a term reads it
    per token (``per_token``), per token, its averages taken from there."""

    def __init__(self, model, ids, teacher_logits, task: TaskLoss, full,
                 teacher_states: dict[int, torch.Tensor] | None = None):
        self.model, self.ids, self.teacher_logits, self.task, self.full = model, ids, teacher_logits, task, full
        self.teacher_states = teacher_states or {}  # source layer -> its output in the teacher's pass
        self.exit_grad = False
        self.per_token = False
        self._exited: dict[int, object] = {}
        self._exit_losses: dict[int, tuple] = {}
        self._token_losses: dict[int, tuple] = {}
        self._exit_weights: list[tuple[int, torch.Tensor | None]] | None = None

    @property
    def exits(self) -> range:
        """The cycles after which the model can exit early: 1..C-1."""
        return range(1, self.model.config.cycles)

    def exit_weights(self) -> list[tuple[int, torch.Tensor | None]]:
        """The exits whose terms count, each with its weight: every exit with weight ``None`` (full)
        without gates; on a grown model the exits whose later cycles are open, weighted by their
        openness (one host sync per micro-batch)."""
        if self._exit_weights is None:
            gates = self.model.gates
            if gates is None:
                self._exit_weights = [(c, None) for c in self.exits]
            else:
                openness = [gates.weight[c:].detach().abs().mean().clamp(max=1.0) for c in self.exits]
                live = torch.stack(openness).tolist() if openness else []
                self._exit_weights = [(c, w) for c, w, v in zip(self.exits, openness, live) if v > 0]
        return self._exit_weights

    def over_exits(self, value) -> torch.Tensor:
        """``value(c)`` averaged over the exits 1..C-1, each weighted as :meth:`exit_weights` says."""
        weights = self.exit_weights()
        if all(w is None for _, w in weights):  # no gates: the plain mean over every exit
            return torch.stack([value(c) for c, _ in weights]).mean()
        return torch.stack([w * value(c) for c, w in weights]).sum() / len(self.exits)

    def exited(self, c: int):
        """The model's output when it exits after cycle ``c``."""
        if c not in self._exited:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.exit_grad):
                self._exited[c] = self.model(input_ids=self.ids, exit_after=c)
        return self._exited[c]

    def _logits(self, c: int) -> torch.Tensor:
        return self.full.logits if c == self.model.config.cycles else self.exited(c).logits

    def exit_loss(self, c: int) -> tuple:
        """The task loss at the exit after cycle ``c`` (``c`` = C: full depth): (loss, ce, kd) as
        :func:`task_loss`, averaged over tokens."""
        if c not in self._exit_losses:
            if self.per_token:  # the averages of the losses a term reads per token, not a second pass
                self._exit_losses[c] = tuple(None if x is None else x.mean() for x in self._per_token(c))
            else:
                self._exit_losses[c] = self.task(self._logits(c), self.ids, self.teacher_logits)
        return self._exit_losses[c]

    def token_loss(self, c: int) -> torch.Tensor:
        """The task loss per next-token position, [B, T-1], when the model exits after cycle ``c``
        (``c`` = C: the full-depth output)."""
        return self._per_token(c)[0]

    def _per_token(self, c: int) -> tuple:
        if c not in self._token_losses:
            self._token_losses[c] = self.task(self._logits(c), self.ids, self.teacher_logits, reduction="none")
        return self._token_losses[c]

    def exit_metrics(self) -> dict[str, torch.Tensor]:
        """``exit{c}_ce`` for every exit some term computed."""
        metrics = {}
        for c in sorted(self._exited):
            if c in self._exit_losses or c in self._token_losses:
                metrics[f"exit{c}_ce"] = self.exit_loss(c)[1]
            else:
                with torch.no_grad():
                    metrics[f"exit{c}_ce"] = next_token_loss(self._exited[c].logits, self.ids)
        return metrics


class Term:
    """A weighted term added to the task loss. ``weight_option``: the ``FinetuneOptions`` field
    holding its weight; ``metric``: the name it is logged under (none: not logged on its own);
    ``exit_grad``: it needs gradients through the exited outputs."""

    weight_option: ClassVar[str]
    metric: ClassVar[str | None] = None
    exit_grad: ClassVar[bool] = False
    per_token: ClassVar[bool] = False  # it reads the task loss per token (``Batch.token_loss``)
    replaces: ClassVar[tuple[str, ...]] = ()  # the weight options of terms this one stands in for

    def __init__(self, weight: float):
        self.weight = weight

    @classmethod
    def from_options(cls, opts, **context) -> Term:
        """The term ``opts`` asks for; ``context``: what the run knows besides (``provenance``)."""
        return cls(getattr(opts, cls.weight_option))

    def teacher_layers(self) -> list[int]:
        """The source layers whose outputs the term needs from the teacher's pass (``Batch.teacher_states``)."""
        return []

    def setup(self, model, ids: torch.Tensor) -> None:
        """Once before training, on the checkpoint's weights, given the first training sequences (the
        same on every process, and again when a run resumes)."""

    def watching(self, model) -> contextlib.AbstractContextManager:
        """A context around the full-depth pass, e.g. hooks that keep the outputs the term compares."""
        return contextlib.nullcontext()

    def applies(self, batch: Batch) -> bool:
        """Whether the term means anything for this model (e.g. it has more than one cycle)."""
        return True

    def full_inputs(self, model, ids: torch.Tensor) -> dict:
        """What the term needs the full-depth pass to be given (e.g. an exit map that records signals)."""
        return {}

    def note(self, model) -> str | None:
        """A line worth showing before healing about what the term does on this model (None: nothing)."""
        return None

    def value(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        """Figures the last :meth:`value` worked out besides the value itself, logged with it."""
        return {}

    def exit_policy(self) -> ExitPolicy | None:
        """The exit policy the healed model should run with, when the term trains one (None: leave it)."""
        return None


TERMS: list[type[Term]] = []  # in the order their weighted values are added to the loss


def register(term: type[Term]) -> type[Term]:
    TERMS.append(term)
    return term


@register
class ExitAware(Term):
    """The task loss at the exits after cycles 1..C-1, averaged over the exits."""

    weight_option = "exit_aware_weight"
    exit_grad = True

    def applies(self, batch: Batch) -> bool:
        return len(batch.exit_weights()) > 0

    def value(self, batch: Batch) -> torch.Tensor:
        return batch.over_exits(lambda c: batch.exit_loss(c)[0])


@register
class ExitObjective(Term):
    """After each cycle c < C, the exit signal the model exits by (its exit policy's) against
    exp(-KL(exit after c || full)), averaged over the exits (see :func:`exit_objective`).

    For the method's signal, ``zero-attention``, that is the mean zero attention p0 over the
    block's layers. Another signal is trained as it is when it is differentiable (``differentiable``
    in the signal registry; its scores come from a full-depth replay of the full pass); one that is
    not cannot be trained, and the objective then trains p0 only, a signal the model does not exit
    by: :meth:`note` says so, and the healing run shows that line."""

    weight_option = "exit_objective_weight"
    metric = "exit_objective"

    def __init__(self, weight: float, form: str = "rank"):
        super().__init__(weight)
        self.form = form

    @classmethod
    def from_options(cls, opts, **context) -> Term:
        return cls(opts.exit_objective_weight, opts.exit_objective)

    @staticmethod
    def trained_signal(model) -> str:
        """The signal trained: the model's own where it is differentiable, else zero-attention (p0)."""
        name = model.exit_policy.signal
        return name if SIGNALS[name].differentiable else ZERO_ATTENTION

    def note(self, model) -> str | None:
        name = model.exit_policy.signal
        if self.trained_signal(model) == name:
            return None
        return (f"the exit objective trains the zero attention (p0) only: the model's exit signal, {name}, is not "
                "differentiable")

    def full_inputs(self, model, ids: torch.Tensor) -> dict:
        """A signal other than zero-attention is read from a full-depth replay (every token exits after cycle C)."""
        if self.trained_signal(model) == ZERO_ATTENTION or model.config.cycles < 2:
            return {}
        return {"exit_map": torch.full(ids.shape, model.config.cycles, device=ids.device), "use_cache": False}

    def applies(self, batch: Batch) -> bool:
        full = batch.full
        read = full.zero_attention if self.trained_signal(batch.model) == ZERO_ATTENTION else full.exit_signals
        return len(batch.exit_weights()) > 0 and read is not None

    def value(self, batch: Batch) -> torch.Tensor:
        zero = self.trained_signal(batch.model) == ZERO_ATTENTION

        def at(c: int) -> torch.Tensor:
            target = exit_target(batch.exited(c).logits, batch.full.logits)
            if zero:
                signal = batch.full.zero_attention[:, c - 1].mean(1)  # mean over block layers: [B, T]
            else:
                signal = batch.full.exit_signals[:, c - 1]
            return exit_objective(signal, target, self.form)

        return batch.over_exits(at)


def removed_layers(provenance: dict | None) -> set[int]:
    """The source layers the conversion removed (a drop, a grown model's first cycle), from ``ztt.json``."""
    stages = (provenance or {}).get("stages") or [{}]
    return set(stages[0].get("metrics", {}).get("dropped_layers") or [])


def hidden_pairs(config, provenance: dict) -> list[tuple[int, int]]:
    """(unrolled position, source layer) pairs whose outputs the hidden-state term compares.

    A drop: each kept layer with the source layer it is. A grown model: the state entering the
    tail with the source's state entering the same layer (the span the drop removed is what the
    cycles stand for). Any other layout replaces the source layer for layer: each position with
    the source layer it replaced."""
    lay = config.layout
    n = provenance.get("source", {}).get("layers", lay.depth)
    dropped = removed_layers(provenance)
    kept = [i for i in range(n) if i not in dropped]
    if config.grown:
        before_tail = kept[len(kept) - lay.tail] - 1 if lay.tail else n - 1
        return [(lay.depth - lay.tail - 1, before_tail)]
    if dropped:
        return list(enumerate(kept))
    return [(i, i) for i in range(lay.depth)]


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, form: str) -> torch.Tensor:
    """Per token ‖s − t‖² / ‖t‖² (``mse``, normalised: a token of huge norm does not swamp the rest) or
    1 − cos(s, t) (``cosine``), averaged over tokens."""
    s, t = student.float(), teacher.float()
    if form == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)).mean()


@contextlib.contextmanager
def layer_outputs(layers: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, the outputs of ``layers[i]`` for each ``i`` in ``indices``, by index (the last call's)."""
    outputs: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, output):
            outputs[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [layers[i].register_forward_hook(keep(i)) for i in indices]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@register
class HiddenState(Term):
    """The hidden states of the positions that stand for source layers against those layers' outputs
    in the teacher (:func:`hidden_pairs`; :func:`hidden_distance`), averaged over the pairs: the
    intermediate-state distillation that Minitron adds to logit distillation for deep cuts."""

    weight_option = "hidden_weight"
    metric = "hidden"

    def __init__(self, weight: float, form: str = "mse", pairs: Sequence[tuple[int, int]] = ()):
        super().__init__(weight)
        self.form, self.pairs = form, list(pairs)
        self._student: dict[int, torch.Tensor] = {}

    @classmethod
    def from_options(cls, opts, **context) -> Term:
        model, provenance = context.get("model"), context.get("provenance") or {}
        pairs = hidden_pairs(model.config, provenance) if model is not None else []
        return cls(opts.hidden_weight, opts.hidden_loss, pairs)

    def teacher_layers(self) -> list[int]:
        return sorted({source for _, source in self.pairs})

    @contextlib.contextmanager
    def watching(self, model):
        slots = model.family.layer_list(model.inner)
        with layer_outputs(slots, sorted({position for position, _ in self.pairs})) as outputs:
            self._student = outputs
            yield

    def applies(self, batch: Batch) -> bool:
        return bool(self.pairs) and bool(batch.teacher_states)

    def value(self, batch: Batch) -> torch.Tensor:
        return torch.stack([hidden_distance(self._student[p], batch.teacher_states[s], self.form)
                            for p, s in self.pairs]).mean()


def halting_distribution(halts: torch.Tensor) -> torch.Tensor:
    """PonderNet's halting distribution: from λ_c, the probability of halting after cycle c given that
    cycle c ran ([..., C-1], cycles 1..C-1), p_c = λ_c·∏_{j<c}(1 − λ_j), with λ_C = 1: [..., C], summing to 1."""
    running = torch.cumprod(1 - halts, dim=-1)  # not halted by the end of cycle c
    before = torch.cat([torch.ones_like(halts[..., :1]), running[..., :-1]], dim=-1)
    return torch.cat([halts * before, running[..., -1:]], dim=-1)


def geometric_prior(rate: float, cycles: int) -> torch.Tensor:
    """The geometric distribution of halting rate ``rate`` truncated at ``cycles`` (the rest of its
    mass on the last cycle): [C], summing to 1."""
    return halting_distribution(torch.full((cycles - 1,), rate, dtype=torch.float64)).float()


def prior_rate(mean_cycles: float, cycles: int) -> float:
    """The rate whose truncated geometric prior has mean ``mean_cycles`` (in (1, C)). Its mean is
    Σ_{c<C} (1 − r)^c = (1 − (1 − r)^C) / r, falling from C at r → 0 to 1 at r = 1; found by bisection."""
    low, high = 0.0, 1.0
    for _ in range(100):
        rate = (low + high) / 2
        if (1 - (1 - rate) ** cycles) / rate > mean_cycles:
            low = rate
        else:
            high = rate
    return (low + high) / 2


def halting_kl(p: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ prior) over the last dimension (the cycles), per token."""
    p = p.float()
    return (p * (p.clamp(min=1e-12).log() - prior.to(p.device).log())).sum(-1)


def halting_mean(opts, layout) -> float:
    """The prior's mean cycles per token: ``--halting-cycles``, or ``--halting-speedup`` through the
    layout (layers run = depth / speedup); refused unless strictly between 1 and the layout's cycles."""
    if opts.halting_cycles is not None:
        mean, asked = opts.halting_cycles, f"--halting-cycles {opts.halting_cycles:g}"
    else:
        mean = layout.cycles_run(layout.depth / opts.halting_speedup)
        asked = f"--halting-speedup {opts.halting_speedup:g}"
    if not 1 < mean < layout.cycles:
        raise ZTTError(
            f"{asked} asks for {mean:.3g} cycles per token on average; this layout ({layout}) halts after 1 to "
            f"{layout.cycles}", hint=f"choose --halting-cycles strictly between 1 and {layout.cycles}, or "
            f"--halting-speedup strictly between 1 and {layout.speedup_bound:.3g}")
    return mean


def halting_cutoff(cumulative: torch.Tensor, mean_cycles: float) -> float:
    """The cut-off on the cumulative halting probability (``cumulative``: [tokens, C-1], after cycles
    1..C-1) at which the halting rule (exit after the first cycle whose value reaches it) runs these
    tokens ``mean_cycles`` cycles on average, as near as their values allow; found by bisection, since
    the rule's depth, 1 + the cycles still below the cut-off, grows with it."""
    cumulative = cumulative.double()

    def depth(cut: float) -> float:
        return 1 + float((cumulative < cut).sum(-1).double().mean())

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if depth(mid) < mean_cycles else (low, mid)
    return high if abs(depth(high) - mean_cycles) <= abs(depth(low) - mean_cycles) else low


@register
class Halting(Term):
    """PonderNet's halting objective. After each cycle c < C the zero attention p0 (mean over the
    block's layers) gives λ_c, the probability of halting there (:func:`halting_rates`); the halting
    distribution p (:func:`halting_distribution`) weighs the task loss at each exit, per token, and
    a KL pulls the batch's marginal halting distribution towards a geometric prior whose mean is the
    requested average depth:

        mean over tokens of Σ_c p_c·L_c  +  β·KL(mean over tokens of p ‖ Geometric),

    L_C the full depth's loss. PonderNet puts the KL on each token's p; with the median rule at
    inference that makes every token halt alike (each λ pulled to the prior's rate, all on the same
    side of 0.5), whereas on the marginal the tokens share the budget: those whose exit costs least
    halt early. The healed model exits by the rule it learned: the ``halting`` signal (the
    cumulative halting probability) at a cut-off fitted on the last healing batches so that the rule
    runs them the prior's mean depth (:func:`halting_cutoff`). PonderNet's and ACT's cut-off, 0.5,
    runs the median depth instead, and when every token's distribution is near the prior that is one
    cycle for any prior mean below 1.5. It stands in for the exit objective, which would pull p0
    towards another target."""

    weight_option = "halting_weight"
    metric = "halting"
    exit_grad = True
    per_token = True
    replaces = ("exit_objective_weight",)
    RECENT_TOKENS = 4096  # tokens of the last batches the rule's cut-off is fitted on

    def __init__(self, weight: float, mean_cycles: float, cycles: int, beta: float = 1.0):
        super().__init__(weight)
        self.mean_cycles, self.beta = mean_cycles, beta
        self.rate = prior_rate(mean_cycles, cycles)
        self.prior = geometric_prior(self.rate, cycles)
        self._extra: dict[str, torch.Tensor] = {}
        self._recent: list[torch.Tensor] = []  # the last batches' cumulative halting probabilities [tokens, C-1]

    @classmethod
    def from_options(cls, opts, **context) -> Term:
        model = context["model"]
        lay = model.config.layout
        if lay.cycles < 2 or model.pool is None:
            raise ZTTError("--halting-weight learns when to halt from the zero attention after each cycle: "
                           + ("this layout has one cycle" if lay.cycles < 2 else "this model has no zero-token pool"),
                           hint="leave out --halting-weight, or convert with --cycles 2 or more and the pool")
        return cls(opts.halting_weight, halting_mean(opts, lay), lay.cycles, opts.halting_beta)

    @torch.no_grad()
    def setup(self, model, ids: torch.Tensor) -> None:
        """The halting rule's offsets (``config.halting_offsets``), unless the model has learned a rule
        before: per cycle, minus the (1 − r)-quantile of logit p0 over ``ids``, so that training starts
        with the share r of tokens that the prior halts there (its rate) at λ ≥ 0.5, where the rule
        halts them. The zero attention starts near 0, where its gradient would vanish; this starts
        the rule where the prior is instead."""
        if model.config.halting_offsets is not None:
            return
        training = model.training
        model.eval()
        p0 = model(input_ids=ids).zero_attention[:, : model.config.cycles - 1].mean(2)  # [B, C-1, T]
        model.train(training)
        logits = torch.logit(p0.double().clamp(1e-6, 1 - 1e-6)).transpose(1, 2).flatten(0, 1)  # [tokens, C-1]
        quantile = torch.quantile(logits, 1 - self.rate, dim=0)
        model.config.halting_offsets = [round(-float(q), 6) for q in quantile]

    def applies(self, batch: Batch) -> bool:
        return batch.full.zero_attention is not None

    def value(self, batch: Batch) -> torch.Tensor:
        cycles = batch.model.config.cycles
        p0 = batch.full.zero_attention[:, : cycles - 1].mean(2).transpose(1, 2)[:, :-1]  # [B, T-1, C-1]: next tokens
        halts = halting_rates(p0, batch.model.config.halting_offsets)
        self._remember(1 - torch.cumprod(1 - halts.detach(), dim=-1))
        p = halting_distribution(halts)
        losses = torch.stack([batch.token_loss(c) for c in range(1, cycles + 1)], dim=-1)  # [B, T-1, C]
        kl = halting_kl(p.flatten(0, -2).mean(0), self.prior)  # the batch's marginal against the prior
        depth = torch.arange(1, cycles + 1, device=p.device, dtype=p.dtype)
        self._extra = {"halting_kl": kl.detach(), "halting_cycles": (p * depth).sum(-1).mean().detach()}
        return (p * losses).sum(-1).mean() + self.beta * kl

    def _remember(self, cumulative: torch.Tensor) -> None:
        """Keeps the cumulative halting probabilities of the last ``RECENT_TOKENS`` tokens trained on."""
        self._recent.append(cumulative.flatten(0, -2).float())  # stays on the device: no host sync per step
        while sum(len(x) for x in self._recent[1:]) >= self.RECENT_TOKENS:
            self._recent.pop(0)

    def extra_metrics(self) -> dict[str, torch.Tensor]:
        return self._extra

    def note(self, model) -> str | None:
        lay = model.config.layout
        return (f"the halting objective: a geometric prior of mean {self.mean_cycles:.3g} cycles per token "
                f"({lay.depth / lay.layers_run(self.mean_cycles):.2f}× compute); the healed model exits where its "
                "cumulative halting probability reaches the cut-off that runs the last healing batches that deep")

    def exit_policy(self) -> ExitPolicy:
        """The ``halting`` signal at the cut-off fitted on the last batches trained on (before any: ``HALT``)."""
        if not self._recent:
            return ExitPolicy("halting", HALT)
        return ExitPolicy("halting", halting_cutoff(torch.cat(self._recent).cpu(), self.mean_cycles))


def _name(term: type[Term]) -> str:
    """A term's name in a line: its class name in words (``ExitObjective``: the exit objective)."""
    words = "".join(f" {ch.lower()}" if ch.isupper() else ch for ch in term.__name__).strip()
    return words if words.endswith("objective") else f"{words} objective"


class HealingObjective(nn.Module):
    """One forward computes every term, so DDP sees one forward and one backward per micro-batch."""

    def __init__(self, model, task: TaskLoss = TaskLoss(), terms: Sequence[Term] = ()):
        super().__init__()
        self.model = model
        self.task = task
        self.terms = list(terms)
        self.replaced: list[str] = []  # lines: which terms asked for stand aside for another

    @classmethod
    def from_options(cls, model, opts, distill: bool = True, provenance: dict | None = None) -> HealingObjective:
        """The objective ``opts`` (a ``FinetuneOptions``) asks for; ``distill``: a teacher is there;
        ``provenance``: the checkpoint's ``ztt.json`` (which source layers its positions stand for).
        Terms whose weight is 0 are left out."""
        task = TaskLoss(opts.kd_weight if distill else 0.0, opts.kd_temperature)
        asked = [term for term in TERMS if getattr(opts, term.weight_option) > 0]
        replaced = {option: term for term in asked for option in term.replaces}
        terms = [term.from_options(opts, model=model, provenance=provenance) for term in asked
                 if term.weight_option not in replaced]
        objective = cls(model, task, terms)
        objective.replaced = [f"the {_name(replaced[t.weight_option])} replaces the {_name(t)}: "
                              f"--{t.weight_option.replace('_', '-')} is not used" for t in asked
                              if t.weight_option in replaced]
        return objective

    @torch.no_grad()
    def setup(self, ids: torch.Tensor) -> None:
        """Once before training (see :meth:`Term.setup`); under FSDP a pass of the sharded root's own."""
        for term in self.terms:
            term.setup(self.model, ids)

    def teacher_layers(self) -> list[int]:
        """The source layers whose outputs the terms need from the teacher's pass."""
        return sorted({i for term in self.terms for i in term.teacher_layers()})

    def notes(self) -> list[str]:
        """What the terms say about themselves on this model (see :meth:`Term.note`), and which terms
        asked for stand aside for another (``Term.replaces``)."""
        return [*self.replaced,
                *(note for term in self.terms if (note := term.note(self.model)) is not None)]

    def exit_policy(self) -> ExitPolicy | None:
        """The exit policy a term trained for the healed model (see :meth:`Term.exit_policy`), if any."""
        return next((policy for term in self.terms if (policy := term.exit_policy()) is not None), None)

    def forward(self, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                teacher_states: dict[int, torch.Tensor] | None = None):
        inputs = {k: v for term in self.terms for k, v in term.full_inputs(self.model, ids).items()}
        with contextlib.ExitStack() as watched:
            for term in self.terms:
                watched.enter_context(term.watching(self.model))
            full = self.model(input_ids=ids, **inputs)
        batch = Batch(self.model, ids, teacher_logits, self.task, full, teacher_states)
        active = [term for term in self.terms if term.applies(batch)]
        batch.exit_grad = any(term.exit_grad for term in active)
        batch.per_token = any(term.per_token for term in active)
        loss, ce, kd = batch.exit_loss(self.model.config.cycles)  # full depth
        metrics = {"ce": ce} if kd is None else {"ce": ce, "kd": kd}
        logged = {}
        for term in active:
            value = term.value(batch)
            loss = loss + term.weight * value
            if term.metric is not None:
                logged[term.metric] = value.detach()
            logged.update(term.extra_metrics())
        metrics.update(batch.exit_metrics())
        metrics.update(logged)
        if self.model.gates is not None:  # how far healing has opened each added cycle
            for c in range(2, self.model.config.cycles + 1):
                metrics[f"gate{c}"] = self.model.gates.weight[c - 1].detach().abs().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
