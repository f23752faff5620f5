"""Options: one dtype vocabulary on the command line, the other spelling accepted, records unchanged."""

import pytest
import torch

from ztt_cli.io.checkpoint import torch_dtype
from ztt_cli.stages import ConvertOptions, ExportOptions, FinetuneOptions


@pytest.mark.parametrize("given,short,torch_name", [("fp32", "fp32", "float32"), ("float32", "fp32", "float32"),
                                                    ("bf16", "bf16", "bfloat16"), ("bfloat16", "bf16", "bfloat16"),
                                                    ("fp16", "fp16", "float16"), ("float16", "fp16", "float16")])
def test_dtype_spellings_are_one_vocabulary(given, short, torch_name):
    convert = ConvertOptions(source="s", out="o", dtype=given)
    export = ExportOptions(checkpoint="c", out="o", dtype=given)
    assert convert.dtype == export.dtype == short
    assert torch_dtype(given) is getattr(torch, torch_name)
    # what is recorded (ztt.json, run.json keys) is spelled as before this vocabulary was unified
    assert convert.model_dump(mode="json")["dtype"] == torch_name
    assert export.model_dump(mode="json")["dtype"] == short


def test_precision_accepts_torch_names_and_records_the_short_one():
    opts = FinetuneOptions(checkpoint="c", data="d", out="o", precision="bfloat16")
    assert opts.precision == "bf16" and opts.model_dump(mode="json")["precision"] == "bf16"
    with pytest.raises(ValueError):
        FinetuneOptions(checkpoint="c", data="d", out="o", precision="fp16")


def test_a_bad_dtype_is_refused_on_the_command_line(tmp_path):
    from .fixtures import cli

    result = cli("convert", "smollm2-135m", "--out", tmp_path / "o", "--dtype", "int8")
    assert result.exit_code == 2 and "--dtype" in result.stderr and "fp32" in result.stderr
