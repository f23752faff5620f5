"""Checkpoint folders: written atomically, checked before any work, loaded with one clear error."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError, OutputExistsError, ZTTError

# the weights' dtype names: short on the command line, torch's in a convert record
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of a weights dtype name (``fp32``, ``bf16``, ``fp16``, or torch's own name)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES.get(name, name))


def parse_size(text: str) -> int:
    """A shard size: '2GB', '500MB', '1.5GiB', '100000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 500MB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"'{out}' already exists",
                                hint="pass --overwrite to replace it, or choose another --out")
    check_writable(out)


def check_writable(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a writable folder (missing parents are created)."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ZTTError(f"cannot write into '{parent}'", hint="choose an --out in a writable folder")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on any failure it vanishes.

    A crash at any point leaves either the old ``out`` or the new one, never a partial one."""
    out = Path(out)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers create files 0600 through mkstemp: use the umask
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"'{out}' already exists", hint="pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary sibling and rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def compute_buffers(model, module) -> None:
    """``module``'s computed (non-persistent) buffers, e.g. rotary frequencies, made on the CPU as
    loading makes them, for a ``model`` built on the meta device (which builds them there too)."""
    import torch

    for name in module._non_persistent_buffers_set:
        module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
    with torch.no_grad():
        model._init_weights(module)
    module._is_hf_initialized = True


def load_checkpoint(path: Path, dtype=None, weights: bool = True):
    """A ZTT checkpoint (fp32 unless ``dtype``), or one clear error. ``weights=False``: its parameters
    on the meta device (nothing read or allocated) and its computed buffers made, for a caller that
    fills the weights itself, e.g. shard by shard."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a checkpoint folder (no config.json)",
                              hint="give a `ztt convert` output")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "ztt":
        raise CheckpointError(
            f"'{path}' is a {config.model_type} model, not a ZTT checkpoint", hint=f"run `ztt convert {path}` first"
        )
    if not weights:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        for module in model.modules():
            if module._non_persistent_buffers_set:
                compute_buffers(model, module)
        return model
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except Exception as e:
        raise CheckpointError(f"cannot load '{path}' ({type(e).__name__})",
                              hint="the checkpoint may be corrupt") from None
