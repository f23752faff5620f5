"""Every family of transformers' causal-LM mapping, built tiny: the outcome recorded in
bench/results/families.json (the table in docs/convert.md) still holds. A family recorded as
passing passes all three checks (no-share parity, cycled cached = uncached generation, save/load);
one recorded as refused is still refused the same way; whether `convert --fit` folds into a passing
family is as recorded."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import families as census  # noqa: E402

RECORDED = json.loads(census.RESULTS.read_text())["families"]


def test_the_record_covers_the_causal_lm_mapping_and_the_docs_show_it():
    assert sorted(RECORDED) == census.model_types()
    docs = (ROOT / "docs" / "convert.md").read_text()
    assert census.render(json.loads(census.RESULTS.read_text())) in docs
    for must in ("llama", "gpt2", "opt", "qwen2", "mistral"):  # the families ztt was first built for
        assert RECORDED[must]["outcome"] == "pass"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (as the census does)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", sorted(RECORDED))
def test_a_family_keeps_its_recorded_outcome(model_type, one_thread):
    got = census.census_one(model_type)
    want = RECORDED[model_type]
    assert got["outcome"] == want["outcome"], got["why"]
    if "fit" in want:  # whether a drop's map folds into it (convert --fit)
        assert got["fit"] == want["fit"]
    if want["outcome"] in ("left out", "convention") and "not supported" in want["why"]:
        assert got["why"] == want["why"]  # ztt's own refusal, word for word
