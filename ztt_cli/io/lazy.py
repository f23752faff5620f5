"""A safetensors source read on demand, and a model written shard by shard.

:class:`LazySource` builds the source model on the meta device from its config and reads its
tensors from the safetensors files when they are needed, one at a time (each file opened for the
read and closed after it, so that no mapping of a file stays resident). The embeddings, the final
norm, the LM head and every module outside the decoder layers are read at once and stay; the
decoder layers stay on the meta device, and :meth:`LazySource.offloaded` gives each one its
weights for its own forward call only, so that a full forward (block influence) holds one layer
at a time. The weights are those ``from_pretrained`` loads, bit for bit: each tensor cast to the
dtype of the parameter it fills, non-persistent buffers (rotary frequencies) computed as
transformers initialises them.

:func:`write_weights` writes a model whose tensors are (partly) on the meta device as
``save_pretrained`` would write it -- the same config files, keys, shards and index, the same bytes
-- each tensor asked for as it is written (:func:`save_streamed`) and let go."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import CheckpointError
from ..heap import release_freed_memory
from ..model.architecture import family_for
from .checkpoint import compute_buffers
from .sources import CORRUPT

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@functools.cache
def _dtype_rank() -> dict[torch.dtype, int]:
    """Where safetensors puts each dtype's tensors in a file (it sorts them by dtype, then by name):
    read off the header of a file it writes with one tensor of each."""
    from safetensors.torch import save

    raw = save({str(i): torch.zeros(1, dtype=d) for i, d in enumerate(SAFETENSORS_DTYPES)})
    order = [k for k in json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]]) if k != "__metadata__"]
    return {list(SAFETENSORS_DTYPES)[int(k)]: rank for rank, k in enumerate(order)}


def save_streamed(path: Path, entries: list[tuple[str, torch.Tensor]],
                  tensor: Callable[[str, torch.Tensor], torch.Tensor], metadata: dict[str, str]) -> None:
    """The file ``safetensors.torch.save_file`` writes for ``entries`` (name, a tensor of the shape
    and dtype to write, possibly meta), each tensor asked of ``tensor(name, entry)`` as it is written
    and let go: one tensor in memory at a time. Byte for byte the same (the tests compare)."""
    rank = _dtype_rank()
    entries = sorted(entries, key=lambda e: (rank[e[1].dtype], e[0].encode()))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, value in entries:
        size = value.numel() * value.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, value in entries:
            data = tensor(name, value)
            if data.shape != value.shape or data.dtype != value.dtype:
                raise RuntimeError(f"'{name}': {data.dtype} {tuple(data.shape)}, planned {value.dtype} "
                                   f"{tuple(value.shape)}")
            f.write(data.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del data


def _tensor_files(folder: Path) -> dict[str, Path] | None:
    """Each checkpoint key's file: from the index if there is one, else from ``model.safetensors``
    (where from_pretrained looks; ``None``: neither is there). A file the index names that is
    missing, or whose header cannot be read, is refused here."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        try:
            names = {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"cannot read '{index}': not a safetensors index", hint=CORRUPT) from None
    elif (folder / WEIGHTS).is_file():
        names = {}
    else:
        return None
    files = sorted(set(names.values())) if names else [folder / WEIGHTS]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"'{path.name}', named in {index.name}, is missing from '{folder}'",
                                  hint="the download may be incomplete; fetch the missing shard again")
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read the weights in '{path}' ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120]})", hint=CORRUPT) from None
        if not index.is_file():
            names.update((key, path) for key in keys)
    return names


def _owners(model: nn.Module, skip: frozenset[int] = frozenset()) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Each parameter and persistent buffer (by identity: a tied weight once) with every (module,
    attribute, state-dict key) that holds it; the modules whose identity is in ``skip`` left out."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in skip:
            continue
        held = [*module._parameters.items(),
                *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set)]
        for name, tensor in held:
            if tensor is not None:
                owners.setdefault(id(tensor), []).append((module, name, f"{prefix}.{name}" if prefix else name))
    return owners


class LazySource:
    """The source model on the meta device, its tensors read from ``folder`` on demand (see the
    module's docstring). Build it with :func:`open_lazy`, which says when a source cannot be read so."""

    def __init__(self, folder: Path, model: nn.Module, files: dict[str, Path], keys: dict[int, str]):
        self.folder, self.model, self.files = folder, model, files
        self.family = family_for(model)
        self._keys = keys  # a parameter's (or persistent buffer's) identity -> its checkpoint key
        self._layers = list(self.family.layer_list(model))  # all of them, alive while ids are keys
        self.resident: dict = {}  # what materialising the modules outside the layers replaced

    def key_of(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint key a parameter or buffer of the source model (meta or resident) is read from."""
        return self._keys.get(id(tensor))

    def read(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor ``key``, cast to the dtype of ``like`` (the tensor it fills), read alone."""
        from safetensors import safe_open

        path = self.files[key]
        try:
            with safe_open(str(path), "pt") as f:
                tensor = f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read the weights in '{path}' ('{key}': {type(e).__name__})",
                                  hint=CORRUPT) from None
        if tuple(tensor.shape) != tuple(like.shape):
            raise CheckpointError(f"'{key}' in '{path}' has shape {tuple(tensor.shape)}, the model's config says "
                                  f"{tuple(like.shape)}", hint=CORRUPT)
        return tensor.to(like.dtype) if tensor.is_floating_point() else tensor

    def materialise(self, module: nn.Module, skip: frozenset[int] = frozenset(),
                    read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Give ``module``'s meta tensors their weights (but those of the modules in ``skip``, by
        identity): ``read(meta)``, by default the checkpoint tensor it was built from; what
        :meth:`release` takes to put them back."""
        saved = {}
        for owners in _owners(module, skip).values():
            first, name, _ = owners[0]
            meta = getattr(first, name)
            if not meta.is_meta:
                continue
            value = read(meta) if read is not None else self.read(self._keys[id(meta)], meta)
            if isinstance(meta, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            value._is_hf_initialized = True  # loaded, as from_pretrained marks it: a later post_init keeps it
            for owner, attr, _ in owners:
                saved[(id(owner), attr)] = (owner, attr, meta)
                (owner._parameters if isinstance(meta, nn.Parameter) else owner._buffers)[attr] = value
        return saved

    @staticmethod
    def release(saved: dict) -> None:
        """Put back the meta tensors :meth:`materialise` replaced (the weights are freed)."""
        for owner, attr, meta in saved.values():
            (owner._parameters if isinstance(meta, nn.Parameter) else owner._buffers)[attr] = meta

    @contextlib.contextmanager
    def holding(self, module: nn.Module, spill_to: Path | None = None,
                read: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Within: ``module`` has its weights (by ``read`` if given: see :meth:`materialise`). After:
        back on the meta device, its tensors as they are then (changed within, e.g. a fit folded into
        them) written to a file in ``spill_to`` and read from there from then on, by every later read
        of their keys."""
        from safetensors.torch import save_file

        saved = self.materialise(module, read=read)
        try:
            yield module
            if spill_to is not None and saved:
                tensors = {self._keys[id(meta)]: getattr(owner, attr) for owner, attr, meta in saved.values()}
                path = Path(spill_to) / f"spilled-{len(list(Path(spill_to).glob('spilled-*')))}.safetensors"
                save_file({key: t.detach().contiguous() for key, t in tensors.items()}, str(path))
                self.files.update(dict.fromkeys(tensors, path))
        finally:
            self.release(saved)

    @contextlib.contextmanager
    def offloaded(self, around: Iterable[tuple[nn.Module, nn.Module]] = (),
                  read: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  replay: Callable[[], Callable[[], contextlib.AbstractContextManager]] | None = None):
        """Within: each decoder layer has its weights for its forward call only (a forward pre-hook
        reads them, a forward hook puts the layer back on the meta device).

        ``around``: (caller, layer) pairs, a module that calls a decoder layer (with more around the
        call) and that layer. The caller's whole call gets the layer's weights, by ``read`` if given
        (see :meth:`materialise`). Where gradients are taken, the call is recomputed in the backward
        pass (activation checkpointing), so that a backward pass, too, holds one layer at a time;
        ``replay()``, asked at the call, gives the context its recompute must run under (the
        caller's settings as they were)."""
        held: dict[int, dict] = {}

        def load(layer, args):
            held[id(layer)] = self.materialise(layer)

        def drop(layer, args, output):
            saved = held.pop(id(layer), {})
            if saved:  # (a layer its caller gave its weights is put back, and handed back, by the caller)
                self.release(saved)
                release_freed_memory()  # the layer's weights: handed back, not kept by the heap for the next layer

        handles = [h for layer in self._layers for h in (layer.register_forward_pre_hook(load),
                                                         layer.register_forward_hook(drop, always_call=True))]
        around = list(around)
        for caller, layer in around:
            caller.forward = self._with_weights(caller.forward, layer, read, replay or (lambda: contextlib.nullcontext))
        try:
            yield self.model
        finally:
            for h in handles:
                h.remove()
            for caller, _ in around:
                del caller.forward  # the class's own again
            for saved in held.values():
                self.release(saved)

    def _with_weights(self, forward: Callable, layer: nn.Module, read, replay) -> Callable:
        """``forward`` with ``layer``'s weights for the call, recomputed in the backward pass."""
        def run(under, *args, **kwargs):
            saved = self.materialise(layer, read=read)
            try:
                with under():
                    return forward(*args, **kwargs)
            finally:
                self.release(saved)
                release_freed_memory()

        def call(*args, **kwargs):
            if not torch.is_grad_enabled():
                return run(contextlib.nullcontext, *args, **kwargs)
            return torch.utils.checkpoint.checkpoint(functools.partial(run, replay()), *args, use_reentrant=False,
                                                     **kwargs)

        return call


def _checkpoint_keys(model: nn.Module, files: dict[str, Path]) -> tuple[dict[int, str], str | None]:
    """Each tensor's checkpoint key (the key of any of its names, or that name with or without the
    base model's prefix), and the first tensor that has none (``None``: all found)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    keys: dict[int, str] = {}
    for tensor_id, owners in _owners(model).items():
        names = [key for _, _, key in owners]
        names += [n.removeprefix(prefix) for n in names] + [prefix + n for n in names]
        found = next((n for n in names if n in files), None)
        if found is None:
            return keys, owners[0][2]
        keys[tensor_id] = found
    return keys, None


def _why_not(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> str | None:
    """Why a model cannot be read lazily as ``from_pretrained`` would load it (``None``: it can)."""
    if getattr(model.config, "quantization_config", None) is not None:
        return "its weights are quantised"
    fp32 = getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    if fp32 and dtype != torch.float32:
        return "it keeps some modules in float32"
    for name, _ in layers.named_buffers():
        return f"its decoder layers hold buffers ({name})"
    return None


def lazy_refusal(folder: Path, model: nn.Module, dtype: torch.dtype) -> str | None:
    """Why ``folder``'s weights cannot be read lazily into ``model`` (built on the meta device) in
    ``dtype``, from the files and the model alone (``None``: they can)."""
    if _tensor_files(folder) is None:
        return f"no {WEIGHTS} or {INDEX}"
    return _why_not(model, family_for(model).layer_list(model), dtype)


def stored_dtypes(folder: Path) -> set[str]:
    """The dtypes of the tensors in ``folder``'s safetensors files, from their headers (``F32``, ``BF16``...)."""
    dtypes = set()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        dtypes |= {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    return dtypes


def open_lazy(folder: Path, dtype: torch.dtype) -> LazySource | str:
    """The source in ``folder`` read lazily in ``dtype``, or why it cannot be (then load it whole). A
    missing or unreadable shard is a :class:`CheckpointError`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = _tensor_files(folder)
    if files is None:
        return f"no {WEIGHTS} or {INDEX}"
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except Exception as e:  # what from_pretrained refuses, it says best
        return f"its model cannot be built from its config ({type(e).__name__})"
    layers = family_for(model).layer_list(model)
    why = _why_not(model, layers, dtype)
    if why is not None:
        return why
    keys, missing = _checkpoint_keys(model, files)
    if missing is not None:
        return f"the checkpoint has no tensor for '{missing}'"
    lazy = LazySource(folder, model, files, keys)
    in_layers = frozenset(id(m) for m in layers.modules())
    lazy.resident = lazy.materialise(model, skip=in_layers)  # all but the decoder layers (the meta ones kept alive)
    for owner, attr, meta in lazy.resident.values():
        keys[id(getattr(owner, attr))] = keys[id(meta)]
    for module in model.modules():
        if id(module) not in in_layers and module._non_persistent_buffers_set:
            if module._parameters:
                return f"{type(module).__name__} holds both weights and computed buffers"
            compute_buffers(model, module)  # as from_pretrained computes them (rotary frequencies)
    return lazy


def write_weights(model, folder: Path, max_shard: int, tensor: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Write ``model`` into ``folder`` as ``save_pretrained(folder, max_shard_size=max_shard)`` would
    (config files, keys, shards, index), each shard's tensors from ``tensor(key, state-dict entry)``
    as it is written: one tensor held at a time (a whole shard if it has a dtype outside
    ``SAFETENSORS_DTYPES``)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    folder = Path(folder)
    model.save_pretrained(folder, state_dict={})  # the config files, as the model writes them
    (folder / WEIGHTS).unlink(missing_ok=True)  # (were it to write a weights file without tensors)
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard)
    for filename, names in split.filename_to_tensors.items():
        entries = [(name, state.pop(name)) for name in names]
        if all(value.dtype in SAFETENSORS_DTYPES for _, value in entries):
            save_streamed(folder / filename, entries, tensor, metadata={"format": "pt"})
        else:
            shard = {name: tensor(name, value).contiguous() for name, value in entries}
            save_file(shard, str(folder / filename), metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
