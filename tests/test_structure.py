"""The codebase's shape: short functions, a command line that starts without torch, one-line help."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ztt_cli"
MAX_LINES = 60


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_every_function_is_at_most_60_lines():
    """Counted with ast from the def line to its end; a nested function is counted on its own too."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({n} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for name, line, n in _functions(path) if n > MAX_LINES]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_ruff_finds_nothing():
    """The lint rules (pyproject.toml: E, F, I, W at 120 characters a line) hold everywhere: the
    line cap cannot be traded for wide lines, nor the 60-line rule for long ones."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "ztt_cli", "tests", "bench"],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def _imported_modules(*args: str) -> set[str]:
    """Modules a fresh interpreter imports to run the console script with ``args``."""
    env = {**os.environ, "COLUMNS": "200"}
    code = "import sys; from ztt_cli.cli import entry; sys.argv = ['ztt', *sys.argv[1:]]; entry()"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("args", [("--help",), ("convert", "--help"), ("calibrate", "--help"),
                                  ("validate", "recipes/smollm2-135m-shakespeare.yaml")])
def test_the_command_line_starts_without_torch(args):
    os.chdir(PACKAGE.parent)
    names = _imported_modules(*args)
    assert "ztt_cli.cli" in names  # the measurement sees our imports
    assert not {n for n in names if n == "torch" or n.startswith("torch.")}
    assert "transformers" not in names


@pytest.mark.parametrize("first", ["import ztt_cli", "import transformers; import ztt_cli",
                                   "import ztt_cli.model.attention", "import ztt_cli.model.modeling",
                                   "import ztt_cli.stages.finetune", "import ztt_cli.cli"])
def test_import_ztt_cli_registers_the_model(first):
    """The public contract: `import ztt_cli` makes the Auto classes know `ztt`, whatever is imported
    first, while the command line above stays free of torch."""
    check = f"{first}\nfrom transformers import AutoConfig\nprint(type(AutoConfig.for_model('ztt')).__name__)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ZTTConfig", out.stderr[-2000:]


def test_command_list_has_one_line_per_command():
    """Short help comes from one sentence per command: no summary breaks mid-sentence."""
    from typer.testing import CliRunner

    from ztt_cli.cli import app
    from ztt_cli.stages import COMMANDS

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    lines = result.stdout.splitlines()
    for command in COMMANDS:
        row = [ln for ln in lines if f" {command.name} " in ln]
        assert row and command.summary in row[0], (command.name, row)


def _string_literals(path: Path):
    """(line, source text) of every string literal in ``path``, docstrings and f-strings included."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            yield node.lineno, ast.get_source_segment(source, node) or ""


def test_the_model_code_names_no_command_line_flags():
    """The model files ship inside remote-code exports, where there is no command line: their errors
    name the options as fields (``{block}``), which the command line spells as flags."""
    flags = re.compile(r"--[a-z{]")
    found = [f"{path.name}:{line}: {text[:80]}" for path in sorted((PACKAGE / "model").glob("*.py"))
             for line, text in _string_literals(path) if flags.search(text)]
    assert not found, "command-line flags in the model code:\n" + "\n".join(found)


def test_only_a_saved_checkpoint_changes_the_exit_policy_in_a_config():
    """The exit policy is passed to the model (``exit_policy=``, ``model.exiting(policy)``); no code
    writes it into a loaded model's config."""
    written = re.compile(r"config\.(exit_threshold|exit_signal)\s*=[^=]")
    found = [f"{path.relative_to(PACKAGE.parent)}:{i}" for root in (PACKAGE, PACKAGE.parent / "bench")
             for path in sorted(root.rglob("*.py")) for i, line in enumerate(path.read_text().splitlines(), 1)
             if written.search(line)]
    assert not found, found


def test_a_stage_is_its_module_and_its_entry_in_the_registry():
    """A new stage touches two files: its module in ``stages/``, and the registry, which holds its
    options model, its record and its name in the list of stage modules; each stage module is a
    command, and each command's options are defined in the registry."""
    import ztt_cli.stages as registry

    commands = {c.name: c for c in registry.COMMANDS}
    assert set(registry._stage_modules()) == set(commands)
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(commands)
    for command in commands.values():
        assert command.options.__module__ == "ztt_cli.stages", command.name
        assert callable(command.function())
    for stage in registry.STAGES:  # the contract of a pipeline stage
        assert callable(stage.module().summary_line) and callable(stage.module().card_section), stage.name
