"""`ztt calibrate` and `ztt generate` on tiny models."""

import json
import shutil

import pytest
import torch

from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert

from .fixtures import cli as run
from .fixtures import corpus, save_source

FAST = ["--windows", "6", "--seq-len", "64", "--reps", "1", "--decode-tokens", "4", "--prompts", "1",
        "--candidates", "10"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    src = save_source("llama", root / "src")
    convert(ConvertOptions(source=str(src), out=root / "ztt", init="lower", head=1, tail=1, block=2, cycles=2))
    convert(ConvertOptions(source=str(src), out=root / "ztt-nopool", init="lower", head=1, tail=1, block=2, cycles=2,
                           pool=False))
    (root / "calib.txt").write_text("\n\n".join(corpus(40, seed=i) for i in range(6)))
    return root


@pytest.fixture
def ckpt(base, tmp_path):
    shutil.copytree(base / "ztt", tmp_path / "ztt")
    return tmp_path / "ztt"


def test_calibration_reaches_the_compute_target(ckpt, base):
    result = run("calibrate", ckpt, "--data", base / "calib.txt", "--target-speedup", "1.1",
                 "--speedup-metric", "compute", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((ckpt / "calibration.json").read_text())
    chosen = report["chosen"]
    assert abs(chosen["compute_speedup"] / 1.1 - 1) < 0.10 and chosen["compute_speedup"] >= 1.1
    config = json.loads((ckpt / "config.json").read_text())
    assert config["exit_threshold"] == chosen["threshold"] and config["exit_signal"] == "zero-attention"
    assert (ckpt / "calibration.png").stat().st_size > 1000
    stages = [s["stage"] for s in json.loads((ckpt / "ztt.json").read_text())["stages"]]
    assert stages[-1] == "calibrate"
    assert "chose threshold" in result.stdout
    assert report["device"].startswith("cuda" if torch.cuda.is_available() else "cpu (")  # --device auto
    # the model now exits early by itself, at about that compute speedup
    from transformers import AutoModelForCausalLM

    from ztt_cli.io.data import prepare
    from ztt_cli.io.sources import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    windows = prepare(str(base / "calib.txt"), load_tokenizer(ckpt), 64, 0.0).train[:6]
    cycles = model(windows, use_cache=False).exit_cycles.double()
    assert 6 / (2 + 2 * cycles.mean()) == pytest.approx(chosen["compute_speedup"], rel=0.01)


def test_wall_clock_is_timed_through_generate_with_an_interval(ckpt, base, monkeypatch):
    """Calibration times what users call, ``generate(..., exit_threshold=t)`` on batch-1 prompts,
    and reports the chosen threshold's speedup from paired repetitions with a 95% interval."""
    from transformers import GenerationMixin

    seen = []
    generate = GenerationMixin.generate

    def spy(self, inputs=None, *args, **kwargs):
        seen.append((inputs.shape, kwargs.get("exit_threshold"), kwargs.get("max_new_tokens")))
        return generate(self, inputs, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    args = [*FAST[: FAST.index("--prompts")], "--prompts", "3", "--candidates", "10", "--confirm-reps", "4"]
    result = run("calibrate", ckpt, "--data", base / "calib.txt", "--target-speedup", "1.1", "--speedup-metric",
                 "compute", *args)
    assert result.exit_code == 0, result.output
    chosen = json.loads((ckpt / "calibration.json").read_text())["chosen"]
    timed = [s for s in seen if s[2] == 4]
    assert {shape for shape, _, _ in timed} == {(1, 16)}
    assert sum(t == chosen["threshold"] for _, t, _ in timed) == 3 * (1 + 4)  # screening, then confirming
    low, high = chosen["wall_interval"]
    assert low <= high and low > 0
    assert "95%" in result.stdout


def test_paired_speedup_and_its_interval():
    from ztt_cli.stages.calibrate import paired_speedup

    median, low, high = paired_speedup([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert median == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    median, low, high = paired_speedup([1.0, 1.1, 0.9, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert low < 1.0 < high and median == pytest.approx(1.0, abs=0.05)
    assert paired_speedup([2.0], [1.0])[1] != paired_speedup([2.0], [1.0])[1]  # NaN from one pair


def test_a_source_model_is_timed_beside_its_checkpoint(ckpt, base):
    """``time_generation`` times a plain model at its full depth (benchmarks time the source beside
    the ZTT checkpoint); an exit threshold for it is refused."""
    from transformers import AutoModelForCausalLM

    from ztt_cli.stages.calibrate import NEVER, time_generation

    prompt = torch.randint(3, 100, (1, 16))
    for folder in (base / "src", ckpt):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        times = time_generation(model, [prompt], [], tokens=3, reps=2)
        assert list(times) == [NEVER] and len(times[NEVER]) == 2 and min(times[NEVER]) > 0
    with pytest.raises(ValueError, match="exit threshold"):
        time_generation(AutoModelForCausalLM.from_pretrained(base / "src"), [prompt], [0.5], tokens=3, reps=1)


def test_monotone_fit_pools_violators():
    from ztt_cli.stages.calibrate import monotone

    assert monotone([1.0, 1.1, 1.2]) == [1.0, 1.1, 1.2]
    assert monotone([1.0, 1.2, 0.9, 1.3]) == pytest.approx([1.0, 1.05, 1.05, 1.3])
    assert monotone([1.3, 1.2, 1.1]) == pytest.approx([1.2, 1.2, 1.2])
    assert monotone([]) == []


def test_screen_smooths_a_noisy_dip_and_keeps_what_it_timed(ckpt, base, monkeypatch):
    """One noisy median below a cheaper threshold's is pooled with it, so it neither picks nor
    rejects a threshold; calibration.json keeps the medians as timed."""
    from ztt_cli.stages import calibrate as stage

    def timed(model, prompts, thresholds, tokens, reps):  # thresholds arrive in rising compute speedup
        walls = [1.0 + 0.1 * i for i in range(len(thresholds))]
        walls[len(walls) // 2] = 0.5  # a machine hiccup in the middle
        return {stage.NEVER: [1.0] * reps, **{t: [1.0 / w] * reps for t, w in zip(thresholds, walls)}}

    monkeypatch.setattr(stage, "time_generation", timed)
    args = [*FAST, "--confirm-reps", "2"]
    result = run("calibrate", ckpt, "--data", base / "calib.txt", "--target-speedup", "1.05", "--speedup-metric",
                 "compute", *args)
    assert result.exit_code == 0, result.output
    rows = sorted(json.loads((ckpt / "calibration.json").read_text())["candidates"], key=lambda r: r["compute_speedup"])
    rows = [r for r in rows if r["wall_interval"] is None]  # the chosen one is timed again
    fitted, screened = [r["wall_speedup"] for r in rows], [r["wall_screened"] for r in rows]
    assert fitted == sorted(fitted) and min(screened) == pytest.approx(0.5) and min(fitted) > 0.5


@pytest.mark.parametrize("case,args,words", [
    ("above the bound", ["--target-speedup", "1.6"], "above this layout's bound"),
    ("unreachable", ["--target-speedup", "1.499"], "no threshold reaches"),
    ("speedup not above 1", ["--target-speedup", "1.0"], "must be above 1"),
    ("unknown signal", ["--target-speedup", "1.1", "--signal", "vibes"], "--signal"),
    ("not a device", ["--target-speedup", "1.1", "--device", "tpu"], "not a device"),
    pytest.param("no GPU here", ["--target-speedup", "1.1", "--device", "cuda"], "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_refusals_leave_the_config_untouched(ckpt, base, case, args, words):
    before = (ckpt / "config.json").read_bytes()
    result = run("calibrate", ckpt, "--data", base / "calib.txt", "--speedup-metric", "compute", *args, *FAST)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "hint:" in lines[0], result.stderr
    assert (ckpt / "config.json").read_bytes() == before
    assert not (ckpt / "calibration.json").exists()


def test_empty_data_and_missing_pool(ckpt, base, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run("calibrate", ckpt, "--data", tmp_path / "empty.txt", "--target-speedup", "1.1", *FAST)
    assert result.exit_code == 2 and "contains no text" in result.stderr
    result = run("calibrate", base / "ztt-nopool", "--data", base / "calib.txt", "--target-speedup", "1.1", *FAST)
    assert result.exit_code == 2 and "no zero-token pool" in result.stderr and "--signal saturation" in result.stderr


def test_saturation_signal_without_a_pool(base, tmp_path):
    ckpt = tmp_path / "np"
    shutil.copytree(base / "ztt-nopool", ckpt)
    result = run("calibrate", ckpt, "--data", base / "calib.txt", "--target-speedup", "1.05", "--signal", "saturation",
                 "--speedup-metric", "compute", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((ckpt / "config.json").read_text())["exit_signal"] == "saturation"


def test_generate_streams_with_cycles_per_token(ckpt):
    full = run("generate", ckpt, "The king", "--max-new-tokens", "8", "--full-depth")
    assert full.exit_code == 0, full.output
    assert "8 tokens, mean cycles 2.00" in full.stderr and full.stdout
    early = run("generate", ckpt, "The king", "--max-new-tokens", "8", "--threshold", "0")
    assert early.exit_code == 0 and "mean cycles 1.00" in early.stderr
    missing = run("generate", ckpt)
    assert missing.exit_code == 2 and "no prompt" in missing.stderr


def test_exit_stats_after_loading(ckpt):
    from transformers import AutoModelForCausalLM

    from .fixtures import token_ids

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model(token_ids(), exit_threshold=0.0)
    assert model.exit_stats.tokens == 40 and model.exit_stats.mean_cycles == 1.0


def test_out_writes_a_calibrated_copy_and_leaves_the_input(ckpt, base, tmp_path):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    out = tmp_path / "calibrated"
    args = ("calibrate", ckpt, "--data", base / "calib.txt", "--target-speedup", "1.1",
            "--speedup-metric", "compute", *FAST)
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before  # untouched
    chosen = json.loads((out / "calibration.json").read_text())["chosen"]
    assert json.loads((out / "config.json").read_text())["exit_threshold"] == chosen["threshold"]
    assert [s["stage"] for s in json.loads((out / "ztt.json").read_text())["stages"]][-1] == "calibrate"
    assert "## Calibration" in (out / "README.md").read_text()
    assert str(out / "config.json") in result.stdout.replace("\n", "")
    refused = run(*args, "--out", out)  # an existing --out is kept unless --overwrite
    assert refused.exit_code == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert run(*args, "--out", out, "--overwrite").exit_code == 0
    assert not any(p.name.startswith(".calibrated") for p in tmp_path.iterdir())
