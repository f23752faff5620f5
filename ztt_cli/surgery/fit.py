"""A drop fitted to the source's own activations (ReplaceMe, Shopkhoev et al. 2025), before any
healing and with no parameter added.

A drop removes runs of consecutive layers. For a run s..e after the kept layer p = s − 1, let M
be p's MLP output and h_i the hidden state entering layer i (h_L: the last layer's output). The
plain drop hands h_s to layer e + 1, which expected h_{e+1}. The fit finds a linear map T of
M, folded into p's MLP output projection (y = W·x becomes y = Tᵀ·W·x), so that p writes
M·T = M + M·D and layer e + 1 receives h_s + M·D ≈ h_{e+1}. The map is shrunk toward the
identity, T = I + D with the ridge penalty on D:

    D = (MᵀM + αI)⁻¹ Mᵀ (h_{e+1} − h_s),   α = ridge · mean(diag MᵀM),

in float64. D = 0 is always a candidate, so on the calibration tokens the fit never raises the
hidden-state error at the gap, and a huge α gives back the plain drop.

Teacher-forced: every gap is fitted on the source's own activations, all in one pass over the
text. The pass keeps only MᵀM and Mᵀ(h_{e+1} − h_s) per gap (d × d each, float64): memory does
not grow with the number of tokens.

A run that starts at the embeddings (layer 0 removed) has no kept layer before it to fold into:
it stays a plain drop and the record says so.

Where the map folds, found by convention and then checked:
- p's MLP is the last of its parametrised children to run that is not a norm and returns the
  hidden size (``mlp``, ``feed_forward``, OPT's ``fc2`` …);
- inside it, the linear maps onto the hidden size: a dense MLP's down projection (GPT-2's
  ``c_proj`` is a Conv1D), or in a mixture of experts every expert's down projection (fused 3-D
  weights included, laid out [experts, out, in] or [experts, in, out]) and the shared expert's,
  since the MLP output is linear in each of them.

The fold is checked on a probe before any statistics are gathered: with a map folded in, the
layer's output must move by exactly M·(T − I). A family where it does not (a norm after the
MLP, as in Gemma 3) is refused in one line, and nothing is written.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedArchitectureError
from ..heap import release_freed_memory
from ..model.relax import PositionDeltas, as_out_in, delta_key
from .drop import layer_input, layer_output, run_until


@dataclass(frozen=True)
class Gap:
    """A run of removed source layers, and the kept layer before it (None: it starts at the embeddings)."""

    removed: tuple[int, ...]
    into: int | None

    @property
    def end(self) -> int:
        """The source layer the gap hands its state to (the layer count: the final norm)."""
        return self.removed[-1] + 1


def gaps(dropped: list[int]) -> list[Gap]:
    """The runs of consecutive removed layers, in order."""
    runs: list[list[int]] = []
    for i in sorted(dropped):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [Gap(tuple(run), run[0] - 1 if run[0] > 0 else None) for run in runs]


@dataclass
class GapFit:
    """One gap's fit: relative hidden-state error ‖h_s + M·D − h_{e+1}‖ / ‖h_{e+1}‖ at the gap on the
    calibration tokens, before (D = 0, the plain drop) and after."""

    removed: list[int]
    into: int | None
    error_before: float
    error_after: float
    fitted: bool
    note: str = ""
    rank: int | None = None  # kept as a shared position's rank-r delta (a grown model), not folded


@dataclass
class FitReport:
    """What a fit did, for the terminal and ``ztt.json``."""

    method: str
    data: str
    tokens: int
    windows: int
    ridge: float
    gaps: list[GapFit]
    perplexity_before: float = float("nan")  # of the drop on the first calibration windows, before the fit
    perplexity_after: float = float("nan")
    perplexity_windows: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    added_cycles: dict | None = None  # a grown model: the fit of its added cycles (``AddedCyclesFit``)

    def record(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# where a kept layer's MLP output is, and the weights that make it


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() or all(p.dim() == 1 for p in module.parameters())


def find_mlp(model, family, layer_index: int, probe: torch.Tensor) -> str:
    """The path, within decoder layer ``layer_index``, of the module whose output is the layer's
    MLP output: the last parametrised child to finish that is not a norm and returns the hidden
    size (found by running ``probe``)."""
    layer = family.layer_list(model)[layer_index]
    hidden = model.config.hidden_size
    finished: list[str] = []

    def note(name):
        def hook(module, args, output):
            out = layer_output(output)
            if isinstance(out, torch.Tensor) and out.shape[-1:] == (hidden,):
                finished.append(name)
        return hook

    children = [(name, m) for name, m in layer.named_children()
                if any(True for _ in m.parameters()) and not _is_norm(m)]
    handles = [m.register_forward_hook(note(name)) for name, m in children]
    try:
        with torch.no_grad():
            model(input_ids=probe.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise UnsupportedArchitectureError(
            f"--fit found no MLP in layer {layer_index} of model type '{model.config.model_type}'",
            hint="convert with --no-fit: the plain drop needs no MLP")
    return finished[-1]


FUSED_LAYOUTS = ("rows", "cols")  # fused experts' weights: [experts, out, in] (F.linear) or [experts, in, out] (x @ W)


# the conventional names of an MLP's input projections: where one maps onto the hidden size (an
# intermediate size equal to it), the fold check is tried again without them
INPUT_PROJECTIONS = ("gate", "up", "fc1", "w1", "w3", "c_fc", "wi", "dense_h_to_4h")


def _output_weights(mlp: nn.Module, hidden: int, fused: str = "rows",
                    inputs_named: bool = False) -> list[tuple[nn.Parameter, str]]:
    """The parameters whose products sum to the MLP's output, each with how it maps onto the hidden
    size: 'rows' (an [.., hidden, in] weight, y = W·x), 'cols' (an [.., in, hidden] weight, y = x·W:
    GPT-2's Conv1D), 'bias'. ``fused``: how 3-D expert weights are laid out; ``inputs_named``: leave
    out the linear maps named as input projections (both checked, see :func:`check_fold`)."""
    found: list[tuple[nn.Parameter, str]] = []
    linears = [mlp] if isinstance(mlp, (nn.Linear, Conv1D)) else \
        [m for m in mlp.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if inputs_named:
        named = {m for name, m in mlp.named_modules() if name.rpartition(".")[2].startswith(INPUT_PROJECTIONS)}
        linears = [m for m in linears if m not in named]
    for m in linears:
        conv = isinstance(m, Conv1D)
        out_features = m.weight.shape[1] if conv else m.weight.shape[0]
        if out_features != hidden:
            continue
        found.append((m.weight, "cols" if conv else "rows"))
        if m.bias is not None:
            found.append((m.bias, "bias"))
    in_linears = {id(p) for m in linears for p in m.parameters()}
    for name, p in mlp.named_parameters():  # fused experts: [experts, hidden, in] weights, [experts, hidden] biases
        if id(p) in in_linears:
            continue
        out_dim, in_dim = (1, 2) if fused == "rows" else (2, 1)
        if p.dim() == 3 and p.shape[out_dim] == hidden and p.shape[in_dim] != hidden:
            found.append((p, fused))
        elif p.dim() == 2 and name.endswith("bias") and p.shape[1] == hidden:
            found.append((p, "bias"))
    return found


@dataclass(frozen=True)
class Fold:
    """Where a map folds in a layer: the path of its MLP, how fused expert weights are laid out
    (``FUSED_LAYOUTS``), and whether input projections are left out by name (see :func:`check_fold`)."""

    mlp: str
    fused: str = "rows"
    inputs_named: bool = False

    def weights(self, layer: nn.Module, hidden: int) -> list[tuple[nn.Parameter, str]]:
        return _output_weights(layer.get_submodule(self.mlp), hidden, self.fused, self.inputs_named)


@torch.no_grad()
def _fold(weights: list[tuple[nn.Parameter, str]], t: torch.Tensor) -> None:
    """Make every weight's output x·T instead of x (float64 products, stored in the weight's dtype):
    W ← Tᵀ·W for an [..., hidden, in] weight (y = W·x), W ← W·T for an [..., in, hidden] one or a bias."""
    for p, how in weights:
        folded = t.T @ p.double() if how == "rows" else p.double() @ t
        p.copy_(folded.to(p.dtype))


def _layer_outputs(model, layer: nn.Module, mlp: nn.Module, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", layer_output(o).double())),
               layer.register_forward_hook(lambda m, a, o: seen.__setitem__("layer", layer_output(o).double()))]
    try:
        model(input_ids=probe.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen["mlp"], seen["layer"]


@torch.no_grad()
def check_fold(model, family, layer_index: int, mlp_path: str, probe: torch.Tensor) -> Fold:
    """Which of the MLP's weights hold its output (the first reading of :func:`_output_weights` that
    works: fused experts laid out either way, then with input projections left out by name): the one
    for which folding a map into them moves the layer's output by exactly M·(T − I), checked with a
    random map near the identity, then undone. Refused in one line where none does."""
    layer = family.layer_list(model)[layer_index]
    mlp = layer.get_submodule(mlp_path)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    t = torch.eye(hidden, dtype=torch.float64) + 0.1 * torch.randn(hidden, hidden, generator=g, dtype=torch.float64) \
        / hidden ** 0.5
    m, y = _layer_outputs(model, layer, mlp, probe)
    expected = m @ (t - torch.eye(hidden, dtype=torch.float64))
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    misses = []
    layouts = FUSED_LAYOUTS if any(p.dim() == 3 for p in mlp.parameters()) else FUSED_LAYOUTS[:1]
    for fold in [Fold(mlp_path, fused, named) for named in (False, True) for fused in layouts]:
        weights = fold.weights(layer, hidden)
        saved = [p.detach().clone() for p, _ in weights]
        try:
            _fold(weights, t)
            _, y_folded = _layer_outputs(model, layer, mlp, probe)
        finally:
            for (p, _), w in zip(weights, saved):
                p.copy_(w)
        miss = float((y_folded - y - expected).norm() / expected.norm().clamp_min(1e-30))
        if weights and miss <= tolerance:
            return fold
        misses.append(miss)
    raise UnsupportedArchitectureError(
        f"--fit cannot fold a map into layer {layer_index} of model type '{model.config.model_type}': its MLP "
        f"('{mlp_path}') does not write to the residual stream through linear weights (off by {min(misses):.0%})",
        hint="convert with --no-fit: a norm or nonlinearity after the MLP leaves no weight to fold into")


# ---------------------------------------------------------------------------------------------
# the statistics and the solve


class _GapStatistics:
    """Sums over the calibration tokens, float64: MᵀM, Mᵀ(h_{e+1} − h_s), ‖h_{e+1} − h_s‖², ‖h_{e+1}‖²."""

    def __init__(self, hidden: int):
        self.mm = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.md = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.delta2 = 0.0
        self.target2 = 0.0

    def add(self, m: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
        m, start, end = (x.reshape(-1, x.shape[-1]).double().cpu() for x in (m, start, end))
        delta = end - start
        self.mm += m.T @ m
        self.md += m.T @ delta
        self.delta2 += float((delta * delta).sum())
        self.target2 += float((end * end).sum())

    def solve(self, ridge: float) -> torch.Tensor:
        """D of the identity-shrunk map T = I + D."""
        alpha = ridge * float(self.mm.diagonal().mean())
        lhs = self.mm + max(alpha, 1e-300) * torch.eye(self.mm.shape[0], dtype=torch.float64)
        return torch.linalg.solve(lhs, self.md)

    def errors(self, d: torch.Tensor) -> tuple[float, float]:
        """Relative error at the gap with D = 0 and with ``d``."""
        after = self.delta2 - 2 * float((d * self.md).sum()) + float((d * (self.mm @ d)).sum())
        scale = max(self.target2, 1e-300)
        return (self.delta2 / scale) ** 0.5, (max(after, 0.0) / scale) ** 0.5


@torch.no_grad()
def _gather(model, family, fitted: list[Gap], mlps: dict[int, str], windows: torch.Tensor,
            batch_size: int, record: dict[int, torch.Tensor]) -> list[_GapStatistics]:
    """One pass of the source over ``windows``, up to the last state it reads: each gap's statistics
    (teacher-forced), and the state entering each layer of ``record`` written into its tensor
    [windows, window, hidden]."""
    layers = family.layer_list(model)
    n = len(layers)
    hidden = model.config.hidden_size
    stats = [_GapStatistics(hidden) for _ in fitted]
    states: dict[int, torch.Tensor] = {}  # the hidden state entering layer i (n: the last layer's output)
    mlp_out: dict[int, torch.Tensor] = {}
    wanted = {i for gap in fitted for i in (gap.removed[0], gap.end)} | set(record)

    def entering(i):
        return lambda module, args, kwargs: states.__setitem__(i, layer_input(args, kwargs))

    def mlp_hook(i):
        return lambda module, args, output: mlp_out.__setitem__(i, layer_output(output))

    handles = [layers[i].register_forward_pre_hook(entering(i), with_kwargs=True) for i in wanted if i < n]
    if n in wanted:
        handles.append(layers[n - 1].register_forward_hook(lambda m, a, o: states.__setitem__(n, layer_output(o))))
    handles += [layers[i].get_submodule(path).register_forward_hook(mlp_hook(i)) for i, path in mlps.items()]
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    stop = layers[max(wanted)] if max(wanted, default=n) < n else None  # nothing after it is read
    try:
        at = 0
        for ids in windows.split(batch_size):  # the logits are not read: only the last position's computed
            run_until(model, stop, input_ids=ids.to(model.device), use_cache=False, **last)
            for gap, s in zip(fitted, stats):
                s.add(mlp_out[gap.into], states[gap.removed[0]], states[gap.end])
            for i, into in record.items():
                into[at : at + ids.shape[0]] = states[i].float().cpu()
            at += ids.shape[0]
            states.clear()
            mlp_out.clear()
            release_freed_memory()
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass
class DropFit:
    """The fitted maps of a drop, ready to fold into the kept layers once the drop is made."""

    maps: dict[int, torch.Tensor]  # source layer -> D of its map T = I + D
    folds: dict[int, Fold]  # source layer -> where its map folds
    report: FitReport
    statistics: dict[int, _GapStatistics] = field(default_factory=dict)  # source layer -> its gap's sums


Hold = Callable[[nn.Module], contextlib.AbstractContextManager]  # a layer's weights held in memory within


def resident(layer: nn.Module) -> contextlib.AbstractContextManager:
    """The :data:`Hold` of a model in memory: its layers hold their weights anyway."""
    return contextlib.nullcontext(layer)


def fit_drop(model, family, dropped: list[int], windows: torch.Tensor, ridge: float, data: str,
             batch_size: int = 4, hold: Hold = resident, record: dict[int, torch.Tensor] | None = None) -> DropFit:
    """The maps of a drop of ``dropped`` from the full source ``model`` (before it is cut), fitted on
    ``windows`` [n, window] of calibration tokens; each layer a map folds into is checked within
    ``hold(layer)`` (a model read on demand gives it its weights there). ``record``: source layer ->
    a tensor [n, window, hidden] that the same pass fills with the state entering that layer (the
    layer count: the last layer's output)."""
    start = time.perf_counter()
    all_gaps = gaps(dropped)
    fitted = [g for g in all_gaps if g.into is not None]
    probe = windows[:1, : min(32, windows.shape[1])]
    folds = {}
    for g in fitted:
        with hold(family.layer_list(model)[g.into]):
            folds[g.into] = check_fold(model, family, g.into, find_mlp(model, family, g.into, probe), probe)
    stats = _gather(model, family, fitted, {i: fold.mlp for i, fold in folds.items()}, windows, batch_size,
                    record or {})
    maps, records, by_layer = {}, [], {}
    for gap in all_gaps:
        if gap.into is None:
            records.append(GapFit(list(gap.removed), None, float("nan"), float("nan"), False,
                                  "starts at the embeddings: no kept layer before it to fold a map into"))
            continue
        s = stats[fitted.index(gap)]
        d = s.solve(ridge)
        before, after = s.errors(d)
        maps[gap.into], by_layer[gap.into] = d, s
        records.append(GapFit(list(gap.removed), gap.into, before, after, True))
    report = FitReport("least-squares map, shrunk to the identity (ReplaceMe)", data, windows.numel(),
                       windows.shape[0], ridge, records, seconds=time.perf_counter() - start)
    return DropFit(maps, folds, report, by_layer)


@torch.no_grad()
def apply_drop_fit(model, family, fit: DropFit, kept: list[int], shared: frozenset[int] = frozenset(),
                   hold: Hold = resident) -> None:
    """Fold each map into its layer's MLP output weights (within ``hold(layer)``), in the model cut to
    the ``kept`` source layers (in order); the maps of ``shared`` source layers are left for
    :func:`keep_in_position`."""
    layers = family.layer_list(model)
    hidden = model.config.hidden_size
    for source_layer, d in fit.maps.items():
        if source_layer not in shared:
            with hold(layers[kept.index(source_layer)]) as layer:
                _fold(fit.folds[source_layer].weights(layer, hidden), torch.eye(hidden, dtype=torch.float64) + d)


def reduced_rank(stats: _GapStatistics, d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` map on the calibration tokens (reduced-rank regression): D_r = D·V·Vᵀ, V
    the top eigenvectors of the fitted change's covariance Dᵀ(MᵀM)D. (D_r, V)"""
    _, vectors = torch.linalg.eigh(d.T @ stats.mm @ d)
    v = vectors[:, -rank:]
    return d @ v @ v.T, v


@torch.no_grad()
def keep_in_position(fit: DropFit, source_layer: int, layer: nn.Module, deltas: PositionDeltas, cycle: int) -> None:
    """Keep the map of ``source_layer`` as position ``cycle``'s own delta on the shared ``layer`` instead
    of folding it into the shared weights, so that the layer's other positions are left as they are.

    A map that lands on a layer a grown block shares belongs to cycle 1, the drop, alone. Its output
    weights W become W + (D_r)ᵀ·W, with D_r the best map of the delta's rank r on the calibration tokens
    (:func:`reduced_rank`): B = V, A = Vᵀ·Dᵀ·W, exact at full rank; a bias b gets b·D_r in the
    position's own 1-D copy. The gap's record gives the error at that rank."""
    d, stats = fit.maps[source_layer], fit.statistics[source_layer]
    hidden = d.shape[0]
    rank = min(next(iter(deltas.A.values())).shape[1], hidden)
    d_r, v = reduced_rank(stats, d, rank)
    linears = {id(m.weight): name for name, m in deltas.linears.items()}
    vectors = {id(p): name for name, p in layer.named_parameters() if name in deltas.vectors}
    c = cycle - 1
    for p, how in fit.folds[source_layer].weights(layer, hidden):
        if how == "bias":
            key = delta_key(vectors[id(p)])
            deltas.d[key][c] += (p.double() @ d_r).to(p.dtype)
        elif id(p) in linears:
            name = linears[id(p)]
            w = as_out_in(deltas.linears[name], p).double()  # [hidden, in]
            deltas.B[delta_key(name)][c].zero_()
            deltas.B[delta_key(name)][c, :, :rank] = v.to(p.dtype)
            deltas.A[delta_key(name)][c, :rank] = (v.T @ d.T @ w).to(p.dtype)
        else:
            raise UnsupportedArchitectureError(
                f"--fit cannot keep a map as a position's delta on a shared layer with fused expert weights "
                f"(source layer {source_layer})", hint="convert with --no-fit, or choose a layout that does not "
                "share that layer")
    record = next(g for g in fit.report.gaps if g.into == source_layer)
    record.error_after = stats.errors(d_r)[1]
    record.rank = rank
    record.note = f"kept as cycle {cycle}'s rank-{rank} delta on the shared layer, not folded into it"
