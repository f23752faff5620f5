"""Resolve a model reference to a local Hugging Face folder with safetensors weights.

A reference is a built-in name, a ``.gguf`` file, a local folder, or a hub id.
GGUF files are dequantised once into a plain folder in the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from ..errors import CheckpointError, OfflineError, SourceError
from .assets import SMOLLM2_135M, Package, cache_dir, fetch, sha256_file
from .checkpoint import atomic_dir

BUILTIN_MODELS: dict[str, Package] = {"smollm2-135m": SMOLLM2_135M}
ALTERNATIVES = f"a local Hugging Face folder, a .gguf file, or a built-in name ({', '.join(BUILTIN_MODELS)})"


@dataclass(frozen=True)
class SourceModel:
    ref: str  # what the user typed
    kind: str  # builtin | gguf | local | hub
    folder: Path  # config.json + *.safetensors + tokenizer files
    sha256: str  # of the source weights as given (the .gguf, or the safetensors files)


WEIGHTS_AND_TOKENIZER = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
CORRUPT = "the safetensors files may be truncated or corrupt; re-download or re-export them"


def looks_like_path(ref: str) -> bool:
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith((".gguf", ".safetensors")):
        return True
    return os.sep in ref and Path(ref).parent.exists()


def weights_sha256(folder: Path) -> str:
    """One digest over every safetensors file of a folder, in name order."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _check_folder(folder: Path, ref: str) -> None:
    if not (folder / "config.json").is_file():
        raise SourceError(f"'{ref}' is not a Hugging Face model folder (no config.json)", hint=f"give {ALTERNATIVES}")
    if not any(folder.glob("*.safetensors")):
        hint = "convert it to safetensors first; pickled weights are never loaded"
        raise SourceError(f"'{ref}' has no .safetensors weights", hint=hint)


def _dequantise_gguf(path: Path, sha: str) -> Path:
    """A plain safetensors folder for a .gguf file, made once and cached by the file's sha256."""
    out = cache_dir() / "gguf" / sha
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:  # the dequantiser draws its own progress bar on stderr: keep stderr for our messages
        with contextlib.redirect_stderr(StringIO()):
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises many kinds of errors for files that are not models
        raise SourceError(f"'{path}' is not a readable GGUF model ({type(e).__name__})", hint=f"give {ALTERNATIVES}")
    # a model loaded from GGUF is flagged as quantised and refuses save_pretrained: rebuild a plain one
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain_config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": path.name, "sha256": sha}))
    return out


def _from_hub(ref: str, patterns: list[str] = WEIGHTS_AND_TOKENIZER) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        path = snapshot_download(ref, allow_patterns=patterns)
    except (RepositoryNotFoundError, HFValidationError):
        raise SourceError(f"'{ref}' is neither a local path nor a model on the hub", hint=f"give {ALTERNATIVES}")
    except Exception as e:  # connection errors come in many types; all mean "not reachable"
        raise OfflineError(
            f"cannot reach the model hub for '{ref}' ({type(e).__name__})", hint=f"offline, give {ALTERNATIVES}"
        )
    return Path(path)


def config_from_hub(ref: str) -> Path:
    """A hub model's config and weights index only (what ``ztt plan`` reads), not its weights."""
    return _from_hub(ref, ["config.json", "*.safetensors.index.json"])


def find_source(ref: str) -> SourceModel:
    """Find (fetching or dequantising if needed) the local folder for a model reference."""
    if ref in BUILTIN_MODELS:
        gguf = fetch(BUILTIN_MODELS[ref])
        sha256 = BUILTIN_MODELS[ref].member_sha256
        return SourceModel(ref, "builtin", _dequantise_gguf(gguf, sha256), sha256)
    path = Path(ref).expanduser()
    if path.exists() or looks_like_path(ref):
        if not path.exists():
            raise SourceError(f"no such file or folder: '{ref}'", hint=f"give {ALTERNATIVES}, or a hub id")
        if path.is_file() and path.suffix == ".gguf":
            sha = sha256_file(path)
            return SourceModel(ref, "gguf", _dequantise_gguf(path.resolve(), sha), sha)
        if path.is_dir():
            _check_folder(path, ref)
            return SourceModel(ref, "local", path, weights_sha256(path))
        raise SourceError(f"'{ref}' is neither a model folder nor a .gguf file", hint=f"give {ALTERNATIVES}")
    folder = _from_hub(ref)
    _check_folder(folder, ref)
    return SourceModel(ref, "hub", folder, weights_sha256(folder))


def load_model(folder: Path, dtype):
    """The source model, in ``dtype``, from safetensors only."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    except Exception as e:
        raise CheckpointError(
            f"cannot read the weights in '{folder}': {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}",
            hint=CORRUPT,
        ) from None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SourceError(f"cannot load the tokenizer in '{folder}' ({type(e).__name__})", hint="add tokenizer files")
