"""Recipes: schema validation, `ztt validate`, and `ztt run` with its resumable stage record."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ztt_cli.pipeline import run as run_pipeline
from ztt_cli.recipe import RecipeError, load

from .fixtures import cli, corpus, save_source

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-assets")
    save_source("llama", root / "src")
    (root / "text.txt").write_text("\n\n".join(corpus(30, seed=i) for i in range(8)))
    return root


def tiny_recipe(assets: Path, output: Path, **changes) -> dict:
    recipe = {
        "name": "tiny",
        "source": str(assets / "src"),
        "output": str(output),
        "convert": {"head": 1, "block": 2, "cycles": 2, "tail": 1, "init": "lower"},
        "finetune": {"data": str(assets / "text.txt"), "steps": 16, "seq_len": 32, "batch_size": 2,
                     "save_every": 2, "eval_every": 8, "val_batches": 1, "lr": 1e-3},
        "calibrate": {"data": str(assets / "text.txt"), "target_speedup": 1.05, "speedup_metric": "compute",
                      "windows": 4, "seq_len": 32, "candidates": 6, "reps": 1, "decode_tokens": 4, "prompts": 1},
        "eval": {"tasks": f"text:{assets / 'text.txt'}", "limit": 3, "compare": "source", "min_recovery": 0.01},
        "export": {"format": "hf"},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    return recipe


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def statuses(result) -> dict:
    return {s.name: s.status for s in result.stages}


def test_every_shipped_recipe_validates():
    shipped = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"smollm2-135m-shakespeare.yaml", "gpt2-medium.yaml", "llama-1b-gpu.yaml"}
    for path in shipped:
        loaded = load(path)
        assert loaded.recipe.stages() == ["convert", "finetune", "calibrate", "eval", "export"], path
        result = cli("validate", path)
        assert result.exit_code == 0 and "valid" in result.output, result.output


def test_validate_reports_every_problem_with_its_yaml_path(tmp_path):
    (tmp_path / "a-file").write_text("")
    bad = write(tmp_path / "bad.yaml", {
        "name": "x", "source": "./nowhere", "output": str(tmp_path / "a-file" / "out"), "colour": "blue",
        "convert": {"cycles": 0},
        "finetune": {"data": "shakespeare", "lr": -1, "out": "elsewhere", "steps": "many"},
        "calibrate": {"data": "shakespeare"},
    })
    result = cli("validate", bad)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    expected = ["colour: unknown key", "convert.cycles: must be >= 1", "finetune.lr: must be > 0",
                "finetune.out: set by the recipe", "finetune.steps:", "calibrate.target_speedup: required",
                "source: no such file or folder", "output: cannot write"]
    for fragment in expected:
        assert any(fragment in line for line in lines), (fragment, lines)
    assert len(lines) == len(expected)
    # `run` gives the first in one line and points at validate; nothing is created
    run = cli("run", bad)
    assert run.exit_code == 2 and len(run.output.strip().splitlines()) == 1
    assert "ztt validate" in run.output


def test_a_stage_error_in_a_run_names_the_recipe_keys(assets, tmp_path):
    """An error about an option, raised by a stage of ``ztt run``, names it as the recipe's key."""
    recipe = write(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "out",
                                                     convert={"block": 3, "cycles": 3, "init": "lower"}))
    result = cli("run", recipe)
    assert result.exit_code == 2, result.output
    assert "choose a smaller convert.block or fewer convert.cycles" in result.stderr, result.stderr
    assert "--block" not in result.stderr


@pytest.mark.parametrize("text, fragment", [
    ("name: x\nsource: [a\n", "malformed YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("name: x\noutput: out\n", "source: required"),
    ("name: 3\nsource: s\noutput: o\nfinetune: 5\n", "finetune: input should be a valid dictionary"),
])
def test_malformed_recipes(tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load(path)
    assert any(fragment in p for p in e.value.problems), e.value.problems
    assert cli("run", path).exit_code == 2


def test_missing_recipe_file(tmp_path):
    result = cli("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "no such recipe file" in result.output


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)
    return True


def _recorded(output: Path) -> set:
    path = output / "run.json"
    try:
        return set(json.loads(path.read_text())["stages"]) if path.is_file() else set()
    except json.JSONDecodeError:
        return set()


def _start(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ztt_cli", "run", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_run_killed_after_finetune_skips_finished_stages(assets, tmp_path):
    output = tmp_path / "out"
    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(assets, output))
    proc = _start(recipe)
    reached = _wait_for(lambda: "finetune" in _recorded(output), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached and {"convert", "finetune"} <= _recorded(output)
    result = run_pipeline(recipe)
    assert statuses(result)["convert"] == "skipped" and statuses(result)["finetune"] == "skipped"
    assert statuses(result)["export"] == "ran" and not result.gate_failed
    assert _recorded(output) == {"convert", "finetune", "calibrate", "eval", "export"}
    assert (output / "export" / "config.json").is_file() and (output / "eval.json").is_file()
    card = (output / "export" / "README.md").read_text()
    assert "## Recipe" in card and "## Evaluation" in card and "## Calibration" in card

    # nothing changed: everything is skipped
    again = run_pipeline(recipe)
    assert set(statuses(again).values()) == {"skipped"}

    # new finetune options: finetune and everything after it run again, convert does not
    write(recipe, tiny_recipe(assets, output, finetune__lr=5e-4))
    changed = run_pipeline(recipe)
    assert statuses(changed) == {"convert": "skipped", "finetune": "ran", "calibrate": "ran", "eval": "ran",
                                 "export": "ran"}

    # --only and --from
    only = run_pipeline(recipe, only="eval")
    assert statuses(only) == {"convert": "skipped", "finetune": "skipped", "calibrate": "skipped", "eval": "ran"}
    from_ = run_pipeline(recipe, start_from="calibrate")
    assert statuses(from_) == {"convert": "skipped", "finetune": "skipped", "calibrate": "ran", "eval": "ran",
                               "export": "ran"}


def test_run_killed_during_finetune_resumes_it(assets, tmp_path):
    output = tmp_path / "out"
    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(assets, output, finetune__steps=40))
    proc = _start(recipe)
    checkpoint = output / "finetune.partial" / "checkpoint" / "trainer.json"
    reached = _wait_for(checkpoint.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached and "finetune" not in _recorded(output)
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output
    record = json.loads((output / "run.json").read_text())
    assert record["stages"]["finetune"]["summary"]["resumed"] is True
    assert record["stages"]["finetune"]["summary"]["steps"] == 40
    assert "convert: done before, skipped" in result.output
    assert not (output / "finetune.partial").exists()


def test_failed_gate_exits_1_and_does_not_export(assets, tmp_path):
    output = tmp_path / "out"
    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(assets, output, eval__min_recovery=100.0, finetune=None))
    result = cli("run", recipe)
    assert result.exit_code == 1, result.output
    assert "gate failed" in result.output and not (output / "export").exists()
    assert _recorded(output) == {"convert", "calibrate", "eval"}
    assert cli("run", recipe).exit_code == 1  # the recorded verdict stands on a rerun


def test_run_flags_name_a_stage(assets, tmp_path):
    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "out", finetune=None))
    result = cli("run", recipe, "--from", "finetune")
    assert result.exit_code == 2 and "not a stage of this recipe" in result.output
    result = cli("run", recipe, "--only", "eval")
    assert result.exit_code == 2 and "stage convert is not done" in result.output


def test_rerun_with_a_hub_source_offline_skips_without_the_hub(assets, tmp_path, monkeypatch):
    from ztt_cli import pipeline
    from ztt_cli.errors import OfflineError

    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "out", finetune=None, eval=None, export=None))
    assert statuses(run_pipeline(recipe)) == {"convert": "ran", "calibrate": "ran"}

    def offline(ref):
        raise OfflineError("cannot reach the model hub")

    monkeypatch.setattr(pipeline, "_is_hub_ref", lambda ref: True)  # as if the source were a hub id
    monkeypatch.setattr(pipeline, "find_source", offline)
    assert set(statuses(run_pipeline(recipe)).values()) == {"skipped"}
    with pytest.raises(OfflineError):  # forcing the conversion needs the hub again
        run_pipeline(recipe, only="convert")


def test_an_older_recipe_validates_and_keeps_its_stage_keys(assets, tmp_path):
    """Recipes written with torch's dtype names still validate, and a stage's options key (what
    run.json compares on a rerun) is the same in either spelling: finished stages stay finished."""
    from ztt_cli.pipeline import _options_key
    from ztt_cli.recipe import slot
    from ztt_cli.stages import stage

    keys = []
    for dtype, precision in (("float32", "float32"), ("fp32", "fp32")):
        recipe = tiny_recipe(assets, tmp_path / "out", convert__dtype=dtype, finetune__precision=precision)
        loaded = load(write(tmp_path / f"r-{dtype}.yaml", recipe)).recipe
        keys.append([_options_key(stage(name), stage(name).options_in(slot(loaded, stage(name), tmp_path)))
                     for name in ("convert", "finetune")])
    assert keys[0] == keys[1]
    assert keys[0][0]["dtype"] == "float32" and keys[0][1]["precision"] == "fp32"
