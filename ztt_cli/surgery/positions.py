"""A relaxed model's positions fitted to the source's activations before any healing (SHARP's
single-layer warm-up, LLM-Streamline's hidden-state MSE).

In a layout whose unrolled depth is the source's, block position (cycle c, layer j) stands for source
layer i = head + (c − 1)·K + j: it runs the shared layer with its own deltas (``model/relax.py``). The
fit trains those deltas, one position at a time from the truncated-SVD start, so that the position
maps layer i's input to layer i's output, by MSE normalised by the target's norm:

    ‖f_cj(x) − h_{i+1}‖² / ‖h_{i+1}‖²,

with x either
- ``source``: the source's own h_i (teacher-forced), or
- ``own``: the state the converted model itself hands the position, its earlier positions already
  fitted (sequential), so that the fit sees the errors it must correct instead of compounding them.

One pass of the source over the calibration windows writes the states entering the middle layers
to files (float32, read and written by window), so memory does not grow with the number of tokens; each position
then reads only its input and its target. Only the position's own deltas move: the shared weights
and every other position stay as they are. A fit that would raise a position's error on its windows
is undone, so the fit never makes a position worse than its start.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..heap import release_freed_memory
from .drop import layer_input, layer_output, run_until

FIT_INPUTS = ("source", "own")


class StateFile:
    """The hidden states [windows, window, hidden] entering one layer, float32, in a file: read and
    written by whole windows with plain file reads and writes (``states[a:b]``, ``states[indices]``),
    so that the process holds the windows it asked for, not the file."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        self.path, self.shape = path, shape
        self._bytes = 4 * math.prod(shape[1:])  # one window
        with open(path, "wb") as f:
            f.truncate(self._bytes * shape[0])

    def _runs(self, key) -> list[tuple[int, int, int]]:
        """(first window, windows, where in the result) for each run of consecutive windows ``key`` asks for."""
        rows = list(range(*key.indices(self.shape[0]))) if isinstance(key, slice) else torch.as_tensor(key).tolist()
        runs: list[list[int]] = []
        for at, row in enumerate(rows):
            if runs and row == runs[-1][0] + runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([row, 1, at])
        return [tuple(r) for r in runs]

    def __getitem__(self, key) -> torch.Tensor:
        runs = self._runs(key)
        out = torch.empty(sum(n for _, n, _ in runs), *self.shape[1:], dtype=torch.float32)
        with open(self.path, "rb") as f:
            for row, n, at in runs:
                f.seek(row * self._bytes)
                f.readinto(memoryview(out[at : at + n].numpy()).cast("B"))
        return out

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        data = value.detach().to("cpu", torch.float32).contiguous()
        with open(self.path, "r+b") as f:
            for row, n, at in self._runs(key):
                f.seek(row * self._bytes)
                f.write(memoryview(data[at : at + n].numpy()).cast("B"))

    def copy_from(self, other: StateFile, chunk: int = 16) -> None:
        for a in range(0, self.shape[0], chunk):
            self[a : a + chunk] = other[a : a + chunk]


class States:
    """The hidden states [windows, window, hidden] entering some layers, one :class:`StateFile` each."""

    def __init__(self, folder: Path, layers: list[int], shape: tuple[int, int, int]):
        self.shape = shape
        self._files = {i: StateFile(folder / f"state-{i}.f32", shape) for i in layers}

    def __getitem__(self, layer: int) -> StateFile:
        return self._files[layer]


@torch.no_grad()
def gather_states(model, family, layers: list[int], windows: torch.Tensor, folder: Path,
                  batch_size: int = 4) -> States:
    """One pass of the source over ``windows``, up to the last state it reads: the state entering each
    of ``layers`` (the layer count: the last layer's output), written to files in ``folder``."""
    source_layers = family.layer_list(model)
    n = len(source_layers)
    states = States(folder, layers, (*windows.shape, model.config.hidden_size))
    at = [0]

    def keep(i, h):
        states[i][at[0] : at[0] + h.shape[0]] = h.float().cpu()

    handles = [source_layers[i].register_forward_pre_hook(
        lambda m, args, kwargs, i=i: keep(i, layer_input(args, kwargs)), with_kwargs=True) for i in layers if i < n]
    if n in layers:
        handles.append(source_layers[n - 1].register_forward_hook(lambda m, a, o: keep(n, layer_output(o))))
    stop = source_layers[max(layers)] if max(layers) < n else None  # nothing after it is read
    try:
        for ids in windows.split(batch_size):
            run_until(model, stop, input_ids=ids.to(model.device), use_cache=False)
            at[0] += ids.shape[0]
            release_freed_memory()
    finally:
        for h in handles:
            h.remove()
    return states


@dataclass
class PositionFit:
    """One position's relative error ‖f(x) − h_{i+1}‖ / ‖h_{i+1}‖ on the calibration windows, at its SVD
    start and after the fit, on the inputs it was fitted on."""

    cycle: int
    position: int
    source_layer: int
    error_before: float
    error_after: float


@dataclass
class PositionsReport:
    """What a fit of the positions did, for the terminal and ``ztt.json``."""

    method: str
    inputs: str
    data: str
    tokens: int
    windows: int
    steps: int
    lr: float
    positions: list[PositionFit] = field(default_factory=list)
    perplexity_before: float = float("nan")
    perplexity_after: float = float("nan")
    perplexity_windows: int = 0
    seconds: float = 0.0

    def record(self) -> dict:
        return asdict(self)


def _slice_batch(value, full: int, n: int):
    """A captured keyword argument for a batch of ``n`` instead of ``full`` windows."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() and value.shape[0] == full and n != full else value
    if isinstance(value, tuple):
        return tuple(_slice_batch(v, full, n) for v in value)
    return value


class _Call:
    """A block position called by itself, with the arguments the model passes it."""

    def __init__(self, slot, args: tuple, kwargs: dict, batch: int):
        self.slot, self.args, self.kwargs, self.batch = slot, args, kwargs, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        kwargs = {k: _slice_batch(v, self.batch, n) for k, v in self.kwargs.items()}
        return layer_output(self.slot(x, *_slice_batch(self.args, self.batch, n), **kwargs))


def _calls(model, indices: list[int], probe: torch.Tensor) -> dict[int, _Call]:
    """The positions at unrolled ``indices``, each with the arguments one forward pass gives it (a
    family may give layers of different kinds different masks or position embeddings)."""
    slots = model.family.layer_list(model.inner)
    seen: dict[int, tuple] = {}

    def capture(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, (args[1:], dict(kwargs)))  # (returns None: the call goes on unchanged)
        return hook

    handles = [slots[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in indices]
    after = max(indices) + 1  # the pass stops there: no later layer, and no logits, need computing
    try:
        with torch.no_grad(), model.pool_disabled():
            run_until(model, slots[after] if after < len(slots) else None, input_ids=probe, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: _Call(slots[i], *seen[i], probe.shape[0]) for i in indices}


def _relative_error(forward, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                    outputs: torch.Tensor | None = None) -> float:
    """‖forward(x) − y‖ / ‖y‖ over all the windows, in batches; ``outputs``: also written there."""
    err = total = 0.0
    with torch.no_grad():
        for a in range(0, inputs.shape[0], batch_size):
            y = targets[a : a + batch_size]
            out = forward(inputs[a : a + batch_size]).float()
            if outputs is not None:
                outputs[a : a + batch_size] = out
            err += float(((out - y) ** 2).sum())
            total += float((y * y).sum())
            release_freed_memory()
    return math.sqrt(err / max(total, 1e-300))


def _fit_one(model, call: _Call, j: int, cycle: int, inputs: torch.Tensor, targets: torch.Tensor,
             steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Adam on position (cycle, j)'s deltas alone (its slice of A, B and the 1-D copies: the other
    cycles' slices do not move)."""
    deltas = model.relax.positions[j]
    params = [*deltas.A.values(), *deltas.B.values(), *deltas.d.values()]
    with model.pool_disabled():
        _adam(model, params, lambda x, y: call(x), inputs, targets, steps, lr, batch_size, seed,
              rows=slice(cycle - 1, cycle))


def _adam(model, params: list, forward, inputs, targets, steps: int, lr: float, batch_size: int, seed: int,
          rows: slice = slice(None)) -> None:
    """``steps`` Adam steps on ``params``' ``rows`` alone (every other parameter of ``model``, and the
    other rows, frozen meanwhile), each on ``batch_size`` random windows, minimising ‖forward(x) − y‖² /
    ‖y‖². Adam's state and the summed gradient are kept for those rows only: it steps views of them,
    which write through to the parameters, and each backward pass's gradient is added into the views'
    as it arrives. The gradient is summed one window at a time: a backward pass keeps one window's
    activations, not the batch's."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    trained = [p.detach()[rows] for p in params]  # leaves that share the parameters' storage
    views = {id(p): view for p, view in zip(params, trained)}

    def into_view(p: torch.Tensor) -> None:  # the whole parameter's gradient, handed to its rows' view
        view, grad = views[id(p)], p.grad[rows]
        view.grad = grad.clone() if view.grad is None else view.grad.add_(grad)
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(into_view) for p in params]
    optimizer = torch.optim.Adam(trained, lr=lr)
    order = torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            pick = torch.randint(inputs.shape[0], (batch_size,), generator=order)
            scale = (targets[pick] ** 2).sum().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            for one in pick.split(1):
                y = targets[one]
                (((forward(inputs[one], y).float() - y) ** 2).sum() / scale).backward()
                release_freed_memory()  # one window's activations, freed: not kept by the heap for the next
            optimizer.step()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)


def fit_positions(model, states: States, windows: torch.Tensor, inputs: str, steps: int, lr: float, data: str,
                  batch_size: int = 4, seed: int = 0) -> PositionsReport:
    """Fit every block position of the relaxed ``model`` (its depth the source's) in depth order, on
    the source's ``states`` over ``windows``; ``inputs``: ``source`` or ``own`` (see the module)."""
    start = time.perf_counter()
    lay = model.config.layout
    report = PositionsReport("per-position deltas, normalised hidden-state MSE from the SVD start", inputs, data,
                             windows.numel(), windows.shape[0], steps, lr)
    block = [s for s in lay.slots() if s.cycle is not None]
    calls = _calls(model, [s.index for s in block], windows[:batch_size])
    with tempfile.TemporaryDirectory(prefix="ztt-fit-") as tmp:
        own = States(Path(tmp), [0, 1], states.shape) if inputs == "own" else None
        if own is not None:
            own[0].copy_from(states[lay.head])  # the head is the source's own layers
        for n, slot in enumerate(block):
            i, call = slot.index, calls[slot.index]
            x = states[i] if own is None else own[n % 2]
            with model.pool_disabled():  # as the fit sees it, and as it hands its output on
                before = _relative_error(call, x, states[i + 1], batch_size)
            deltas = model.relax.positions[slot.position]
            start_at = {k: v.clone() for k, v in deltas.state_dict().items()}
            _fit_one(model, call, slot.position, slot.cycle, x, states[i + 1], steps, lr, batch_size, seed + n)
            handed = own[(n + 1) % 2] if own is not None else None  # what the fitted position hands the next one
            with model.pool_disabled():
                after = _relative_error(call, x, states[i + 1], batch_size, handed)
                if after > before:  # never worse than its start (at an exact start, Adam's steps only jitter)
                    deltas.load_state_dict(start_at)
                    after = _relative_error(call, x, states[i + 1], batch_size, handed)
            report.positions.append(PositionFit(slot.cycle, slot.position, i, before, after))
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# a grown model's added cycles


@torch.no_grad()
def state_entering(model, index: int, ids: torch.Tensor) -> torch.Tensor:
    """The state entering the model's unrolled layer ``index`` on ``ids``, the pool off; nothing after
    it runs."""
    seen = []
    slot = model.family.layer_list(model.inner)[index]
    handle = slot.register_forward_pre_hook(lambda m, args, kwargs: seen.append(layer_input(args, kwargs)),
                                            with_kwargs=True)
    try:
        with model.pool_disabled():
            run_until(model, slot, input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@dataclass
class AddedCyclesFit:
    """The fit of a grown model's added cycles: the relative error of the state entering the tail
    against the source's state there (the span the drop removed), before and after."""

    steps: int
    lr: float
    error_before: float
    error_after: float
    gates: list[list[float]]  # the added cycles' gates after the fit
    windows: int = 0  # the calibration windows the errors are measured on


def added_cycles(model, probe: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
    """A grown model's added cycles (2..C) run by themselves: the unrolled index where they start, and
    the function that maps the state entering them to the state entering the tail (the pool off),
    each position called with the arguments a forward pass on ``probe`` gives it."""
    lay = model.config.layout
    indices = list(range(lay.head + lay.block, lay.head + lay.block * lay.cycles))
    calls = _calls(model, indices, probe)

    def run(x: torch.Tensor) -> torch.Tensor:
        for i in indices:
            x = calls[i](x)
        return x

    return indices[0], run


ADDED_ERROR_WINDOWS = 16  # calibration windows the added cycles' error is measured on, before and after


def fit_added_cycles(model, windows: torch.Tensor, target: torch.Tensor, steps: int, lr: float,
                     batch_size: int = 4, seed: int = 0) -> AddedCyclesFit:
    """Fit a grown ``model``'s added cycles (cycles 2..C: their gates and deltas, all free) so that the
    state entering its tail matches the source's there (``target`` [windows, window, hidden]), by MSE
    normalised by the target's norm. Cycle 1 (the fitted drop), the head, the tail and every shared
    weight stay as they are; a fit that would raise the error on the first ``ADDED_ERROR_WINDOWS``
    windows is undone.

    Since nothing before cycle 2 moves, its input is computed without gradients, and only the added
    cycles' positions run with them (called one by one, as :func:`fit_positions` calls a position); the
    error before and after reads cycle 2's inputs computed once, from a file. Each Adam step draws
    ``batch_size`` windows; every pass runs one window at a time, so a pass's activations are one window's,
    and Adam keeps state for the added cycles' rows alone."""
    first, through_added_cycles = added_cycles(model, windows[:1])  # every call below is one window's
    params = [model.gates.weight] + ([*model.relax.parameters()] if model.relax is not None else [])
    shown = min(ADDED_ERROR_WINDOWS, windows.shape[0])
    with tempfile.TemporaryDirectory(prefix="ztt-fit-") as tmp:
        torch.save([p.detach() for p in params], Path(tmp) / "start.pt")  # kept on disk, for an undo
        entering = StateFile(Path(tmp) / "entering.f32", (shown, *target.shape[1:]))  # (float32: exact)
        for a in range(shown):
            state = state_entering(model, first, windows[a : a + 1])
            entering[a : a + 1] = state
        dtype = state.dtype  # the model's: what the file's float32 copies are cast back to, exactly

        def from_file(x: torch.Tensor) -> torch.Tensor:
            return through_added_cycles(x.to(dtype))

        with model.pool_disabled():
            before = _relative_error(from_file, entering, target, 1)
            _adam(model, params, lambda ids, y: through_added_cycles(state_entering(model, first, ids)),
                  windows, target, steps, lr, batch_size, seed, rows=slice(1, None))
            after = _relative_error(from_file, entering, target, 1)
        if after > before:
            with torch.no_grad():
                for p, start in zip(params, torch.load(Path(tmp) / "start.pt")):
                    p.copy_(start)
            after = before
    return AddedCyclesFit(steps, lr, before, after, model.gates.weight[1:].tolist(), shown)
