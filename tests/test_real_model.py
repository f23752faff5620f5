"""SmolLM2-135M from the package registry, measured with the Tempest-16 protocol
(The Tempest from character 3000, the first 16 non-overlapping 512-token windows).

Slow (about two minutes on two cores) but run by CI: it is the check that the tool works on a
real pretrained model, not only on tiny random ones."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ztt_cli.io.texts import tempest16
from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert
from ztt_cli.training.quality import perplexity

pytestmark = pytest.mark.slow


def _convert_and_score(tmp_path, **layout):
    out = tmp_path / "ztt"
    convert(ConvertOptions(source="smollm2-135m", out=out, init="lower", **layout))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok, perplexity(model, tempest16(tok))


def test_no_share_layout_reproduces_source_perplexity(tmp_path):
    _, _, ppl = _convert_and_score(tmp_path, head=10, tail=10, block=10, cycles=1, pool=False)
    assert ppl == pytest.approx(44.08, rel=0.005)


def test_cycled_layout_perplexity_and_generation(tmp_path):
    model, tok, ppl = _convert_and_score(tmp_path, head=10, tail=10, block=5, cycles=2)
    assert ppl == pytest.approx(106.4, rel=0.02)
    prompt = tok("The island was quiet, and the storm", return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        uncached = model.generate(**prompt, max_new_tokens=24, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    text = tok.decode(cached[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(text.split()) >= 5, text
