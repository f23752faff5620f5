"""The command line: help, version, the convert summary, and one clear line for every bad input."""

import pytest
from transformers import MambaConfig, MambaForCausalLM
from typer.testing import CliRunner

from ztt_cli import __version__
from ztt_cli.cli import app

from .fixtures import save_source, tokenizer

runner = CliRunner()
COMMANDS = ["convert", "finetune", "calibrate", "eval", "export", "generate", "validate", "run"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_with_examples(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"ztt {command}" in result.stdout


@pytest.mark.parametrize("command", ["eval", "export", "validate", "run"])
def test_unknown_options_give_one_line(command):
    result = runner.invoke(app, [command, "ckpt", "--some-option", "x"])
    assert result.exit_code == 2 and "--some-option" in result.output


def test_convert_prints_summary(tmp_path):
    src = save_source("llama", tmp_path / "src")
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "out"), "--init", "lower"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "2/1×2/2" in text and "derived from the source depth" in text
    assert "saved" in text and "compute bound" in text and "1.20×" in text
    assert "■■ ▣ ▣ ■■" in text  # the layout drawn as a row of blocks


def _unsupported(tmp_path):
    cfg = MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=len(tokenizer()))
    MambaForCausalLM(cfg).save_pretrained(tmp_path / "mamba")  # a state-space model: no attention to enter
    tokenizer().save_pretrained(tmp_path / "mamba")
    return [str(tmp_path / "mamba")]


def _truncated(tmp_path):
    src = save_source("llama", tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [str(src), "--init", "lower"]


def _not_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    return [str(path)]


def _layout(*extra):
    return lambda tmp_path: [str(save_source("llama", tmp_path / "src")), *extra]


BAD_INPUTS = {
    "missing path": (lambda tmp_path: ["./no/such/model"], "no such file"),
    "hub id offline": (lambda tmp_path: ["someorg/some-model"], "cannot reach the model hub"),
    "unsupported architecture": (_unsupported, "has no attention: a state-space or hybrid model"),
    "head + tail >= layers": (_layout("--head", "3", "--tail", "3"), "no middle"),
    "not divisible": (_layout("--head", "1", "--tail", "2", "--cycles", "2"), "not divisible"),
    "zero block": (_layout("--block", "0"), "--block: must be >= 1"),
    "zero cycles": (_layout("--cycles", "0"), "--cycles: must be >= 1"),
    "negative size": (_layout("--head", "-1"), "--head: must be >= 0"),
    "truncated safetensors": (_truncated, "cannot read the weights"),
    "gguf that is not a model": (_not_gguf, "not a readable GGUF"),
    "unknown init": (_layout("--init", "random"), "--init"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, cache_dir):
    make_args, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", *make_args(tmp_path), "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "hint:" in lines[0], result.stderr
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_a_layout_error_names_the_flags_in_its_hint(tmp_path):
    """The model code names the layout's sizes as fields; the command line spells them as flags."""
    args = _layout("--block", "3", "--cycles", "3")(tmp_path)  # 9 layers of block in a 6-layer source
    result = runner.invoke(app, ["convert", *args, "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "(hint: choose a smaller --block or fewer --cycles)" in result.stderr, result.stderr


def test_existing_output_is_kept(tmp_path):
    src = save_source("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    result = runner.invoke(app, ["convert", str(src), "--out", str(out), "--init", "lower"])
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (out / "mine.txt").read_text() == "precious"
    result = runner.invoke(app, ["convert", str(src), "--out", str(out), "--init", "lower", "--overwrite"])
    assert result.exit_code == 0 and not (out / "mine.txt").exists()


def test_unwritable_output_folder(tmp_path):
    src = save_source("llama", tmp_path / "src")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["convert", str(src), "--out", str(blocker / "out"), "--init", "lower"])
    assert result.exit_code == 2 and "cannot write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and blocker.read_text() == "not a folder"


def test_missing_parent_folders_are_created(tmp_path):
    src = save_source("llama", tmp_path / "src")
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "runs" / "deep" / "out"),
                                 "--init", "lower"])
    assert result.exit_code == 0 and (tmp_path / "runs" / "deep" / "out" / "ztt.json").is_file()
