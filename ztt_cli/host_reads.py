"""Counting the places where the host reads a value back from the device.

On an accelerator each such read waits for every queued kernel (a synchronisation); on the CPU
it costs nothing, but it is the same place in the code, so counting on the CPU says what a GPU
will pay. Used by the tests (decoding with early exit reads at most once per step) and by
``bench/overhead.py``; not model code, so a remote-code export does not ship it."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...`` counts the tensor methods that read a value to the host
    (``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``item``, ``cpu``, ``tolist``) in ``reads.count``."""

    NAMES = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "cpu", "tolist"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))
