"""The benchmark configurations in bench/ are well formed (the runs themselves are benchmarks, not tests)."""

from pathlib import Path

import pytest
import yaml

from ztt_cli.layout import Layout
from ztt_cli.options import FinetuneOptions

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("path", sorted(BENCH.glob("compare*.yaml")), ids=lambda p: p.name)
def test_compare_config(path):
    cfg = yaml.safe_load(path.read_text())
    assert {"profile", "work", "source", "layout", "heal", "variants", "decode"} <= set(cfg)
    Layout.resolve(30, **cfg["layout"])  # SmolLM2-135M's depth
    names = [v["name"] for v in cfg["variants"]]
    assert len(names) == len(set(names))
    for v in cfg["variants"]:
        assert v["kind"] in ("source", "dense", "drop", "cycle"), v
        if v["kind"] == "drop":
            assert v["select"] in ("block-influence", "contiguous")
        if "layout" in v:
            Layout.resolve(30, **v["layout"])
        FinetuneOptions(checkpoint=".", out=".", **{**cfg["heal"], **v.get("heal", {})})
    if "early_exit" in cfg:
        assert cfg["early_exit"]["variant"] in names
