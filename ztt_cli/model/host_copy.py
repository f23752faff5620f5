"""A value the host derives from a device tensor, read back only when the tensor changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class HostCopy(Generic[T]):
    """``copy(tensor)`` is ``derive(tensor)``, computed on the host (a device read: a synchronisation on
    an accelerator) only when the tensor changed since the last read (its in-place version, storage or
    device). Inside a ``torch.compile`` trace it is the last eager read (``start`` before any)."""

    def __init__(self, derive: Callable[[torch.Tensor], T], start: T):
        self._derive, self._value, self._key = derive, start, None

    def __call__(self, tensor: torch.Tensor) -> T:
        if torch.compiler.is_compiling():
            return self._value
        key = (tensor._version, tensor.data_ptr(), tensor.device)
        if key != self._key:
            self._value, self._key = self._derive(tensor.detach()), key
        return self._value
