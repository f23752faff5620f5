"""``ztt plan``: each stage's needs from the source's config alone, the parts following the options
(the measured check against real peaks is bench/plan.py)."""

import json

import pytest

from ztt_cli.stages import PlanOptions
from ztt_cli.stages.plan import GB, TRAIN_STATE, plan, read_shape

from .fixtures import cli, save_source
from .test_streaming import _deep_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source("llama", tmp_path_factory.mktemp("plan") / "src")


def _needs(target, *sets, **options) -> dict:
    result = plan(PlanOptions(target=str(target), set=list(sets), device="cpu", probe=False, **options))
    return {n.stage: n for n in result.needs}


def test_the_shape_is_read_without_weights(source):
    from transformers import AutoModelForCausalLM

    shape = read_shape(str(source))
    model = AutoModelForCausalLM.from_pretrained(source)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.streams is None and shape.stored_bytes == 4


def test_a_streamed_conversion_does_not_grow_with_depth_and_an_in_memory_one_does(tmp_path):
    layer = _deep_source(tmp_path / "src8", 8)
    _deep_source(tmp_path / "src32", 32)
    streamed = [_needs(tmp_path / f"src{n}", "convert.drop=2", "convert.fit=false")["convert"] for n in (8, 32)]
    fitted = [_needs(tmp_path / f"src{n}", "convert.drop=2")["convert"] for n in (8, 32)]
    grown = [_needs(tmp_path / f"src{n}", "convert.init=grow", "convert.head=1", "convert.block=3",
                    "convert.cycles=2", "convert.tail=1", "convert.fit=true", "convert.relax_rank=4")["convert"]
             for n in (8, 32)]
    whole = [_needs(tmp_path / f"src{n}", "convert.drop=2", "convert.fit_data=source-samples:4096")["convert"]
             for n in (8, 32)]
    assert streamed[0].host == streamed[1].host and "source" not in streamed[0].parts
    assert fitted[0].host == fitted[1].host and fitted[0].host > streamed[0].host
    assert "fit batch" in fitted[0].parts and "source" not in fitted[0].parts
    assert grown[0].host == grown[1].host and "added cycles' backward" in grown[0].parts
    assert whole[1].parts["source"] - whole[0].parts["source"] == pytest.approx(24 * layer, rel=1e-6)


def test_what_trains_sets_the_training_state(source):
    """All trains every parameter: 3 fp32 copies of the model (gradient, two moments); new trains the
    pool and the 1-D weights only; the seam sits between."""
    layout = ["convert.head=1", "convert.block=2", "convert.cycles=2", "convert.tail=1", "convert.init=lower"]
    state = {t: _needs(source, *layout, f"finetune.trainable={t}")["finetune"].parts["gradients and AdamW"]
             for t in ("all", "block", "new", "seam")}
    student = _needs(source, *layout)["finetune"].parts["student"]
    assert state["all"] == pytest.approx(TRAIN_STATE * student)
    assert state["new"] < 0.4 * state["all"] and state["new"] < state["block"] < state["all"]
    assert state["new"] < state["seam"] < state["all"]


def test_the_teacher_and_the_batch_follow_their_options(source):
    base = _needs(source)["finetune"].parts
    assert _needs(source, "finetune.teacher_dtype=bf16")["finetune"].parts["teacher"] == base["teacher"] / 2
    assert _needs(source, "finetune.no_teacher=true", "finetune.kd_weight=0")["finetune"].parts["teacher"] == 0
    top_k = _needs(source, "finetune.teacher_top_k=8")["finetune"]
    assert top_k.parts.get("teacher", 0) == 0 or "teacher logits" in top_k.parts  # or its caching pass, if larger
    double = _needs(source, "finetune.batch_size=8")["finetune"].parts["activations"]
    assert double == pytest.approx(2 * base["activations"])
    assert _needs(source, "finetune.grad_checkpointing=true")["finetune"].parts["activations"] < base["activations"]


def test_sharded_healing_divides_the_model_state_over_the_processes(source):
    whole = _needs(source, processes=2)["finetune"].parts
    sharded = _needs(source, processes=2, sharding="fsdp")["finetune"].parts
    assert sharded["student"] == whole["student"] / 2 and "student, before sharding" not in sharded
    assert sharded["gradients and AdamW"] == whole["gradients and AdamW"] / 2
    assert sharded["teacher"] == whole["teacher"]


def test_a_recipe_plans_its_stages(source, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsource: {source}\noutput: {tmp_path / 'out'}\nconvert: {{drop: 1}}\n"
                      "finetune: {data: shakespeare, steps: 10, batch_size: 2, seq_len: 16}\n"
                      "calibrate: {data: shakespeare, target_speedup: 1.2}\nexport: {format: plain}\n")
    needs = _needs(recipe)
    assert list(needs) == ["convert", "finetune", "calibrate", "export"]
    assert needs["finetune"].tokens == 10 * 2 * 16


def test_the_probe_times_one_layer_and_counts_what_it_saves(source):
    result = plan(PlanOptions(target=str(source), device="cpu"))
    probe = result.probe
    assert probe["layer_train"] > 0 and probe["layer_forward"] > 0 and probe["layer_saved_bytes"] > 0
    heal = next(n for n in result.needs if n.stage == "finetune")
    assert heal.seconds_per_token > 0 and heal.seconds == heal.seconds_per_token * heal.tokens


def test_the_command_prints_the_plan_and_says_what_does_not_fit(source):
    run = cli("plan", source, "--no-probe", "--device", "cpu", "--json-output", "--memory", "1MB")
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output)
    assert {n["stage"] for n in summary["needs"]} == {"convert", "finetune"}
    assert not any(n["fits"] for n in summary["needs"]) and summary["available"]["host"] == 1e6
    table = cli("plan", source, "--no-probe", "--device", "cpu")
    assert table.exit_code == 0 and "finetune" in table.output and "GB" in table.output
    assert _needs(source)["convert"].host < 1 * GB


@pytest.mark.parametrize("args, says", [
    (["--set", "finetune"], "is not STAGE.KEY=VALUE"),
    (["--set", "nothing.steps=3"], "is not STAGE.KEY=VALUE"),
    (["--set", "finetune.steps=-1"], "finetune.steps"),
    (["--set", "convert.drop=99"], "drop"),
])
def test_a_bad_plan_is_one_line_and_exit_2(source, args, says):
    run = cli("plan", source, "--no-probe", *args)
    assert run.exit_code == 2, run.output
    assert says in run.output and len(run.output.strip().splitlines()) == 1


def test_the_8b_recipe_fits_one_80gb_gpu():
    """recipes/llama-8b-h100.yaml, planned offline from Llama-3.1-8B's config: every stage fits an 80 GB
    GPU and a 128 GB host, and healing would not fit with everything training."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    recipe, config = root / "recipes" / "llama-8b-h100.yaml", root / "bench" / "configs" / "llama-3.1-8b"
    run = cli("plan", recipe, "--source", config, "--device", "cuda", "--memory", "80GB", "--host-memory", "128GB",
              "--no-probe", "--json-output")
    assert run.exit_code == 0, run.output
    needs = {n["stage"]: n for n in json.loads(run.output)["needs"]}
    assert set(needs) == {"convert", "finetune", "calibrate", "eval", "export"}
    assert all(n["fits"] for n in needs.values()), {k: n["device_bytes"] / GB for k, n in needs.items()}
    assert 30 * GB < needs["finetune"]["device_bytes"] < 80 * GB
    everything = cli("plan", recipe, "--source", config, "--device", "cuda", "--memory", "80GB", "--no-probe",
                     "--json-output", "--set", "finetune.trainable=all")
    heal = next(n for n in json.loads(everything.output)["needs"] if n["stage"] == "finetune")
    assert not heal["fits"] and heal["device_bytes"] > 80 * GB


@pytest.mark.parametrize("text, says", [(None, "no such recipe file"), ("a: [", "is not valid YAML"),
                                        ("name: x\n", "names no source")])
def test_a_bad_recipe_is_one_line_and_exit_2(text, says, tmp_path):
    recipe = tmp_path / "r.yaml"
    if text is not None:
        recipe.write_text(text)
    run = cli("plan", recipe, "--no-probe")
    assert run.exit_code == 2 and says in run.output and len(run.output.strip().splitlines()) == 1, run.output
