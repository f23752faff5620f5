"""Where a command runs: ``--device auto|cpu|cuda|cuda:N``.

``auto`` takes the first CUDA GPU when torch sees one. Wall-clock figures (``calibrate``'s
speedups, ``eval``'s tokens/s) are measured on this device, so calibrate where you deploy."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import ZTTError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(ZTTError):
    """The requested device is not available on this machine."""


def valid_device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise ValueError(f"not a device: {text!r} (auto, cpu, cuda or cuda:N)")
    return text


def resolve_device(choice: str) -> torch.device:
    """The torch device for ``choice``, or one clear error when it is not there."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {choice}: torch sees no CUDA GPU on this machine",
                              hint="use --device cpu (or auto); a CPU-only torch build never sees a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {choice}: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                              hint="number GPUs from 0, or use --device cuda")
    return device


def describe(device: torch.device) -> str:
    """What timings were measured on: 'cpu (2 threads)' or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
