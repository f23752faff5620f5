"""`ztt export`: hf and self-contained remote-code folders, and plain checkpoints of the source family."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from ztt_cli.io.checkpoint import load_checkpoint
from ztt_cli.model.unroll import NotPlainError, to_plain
from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert

from .fixtures import FAMILIES, grown_model, save_source, token_ids, ztt_model
from .fixtures import cli as run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = save_source("llama", root / "src")
    out = root / "ztt"
    convert(ConvertOptions(source=str(src), out=out, init="lower", head=1, tail=1, block=2, cycles=2))
    # a calibrated-looking checkpoint: a threshold in config.json, a recipe beside it
    config = json.loads((out / "config.json").read_text())
    config["exit_threshold"] = 0.01
    (out / "config.json").write_text(json.dumps(config))
    (out / "recipe.yaml").write_text("name: tiny\nsource: src\n")
    return out


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A virtual environment with torch and transformers but without ztt_cli: the packages of
    this one are reachable through a plain path entry, which does not run the .pth hooks that
    make an editable install importable."""
    venv = tmp_path_factory.mktemp("venv") / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.util, sys, torch
    assert importlib.util.find_spec("ztt_cli") is None, "ztt_cli must not be importable here"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = torch.load(ids_path)
    with torch.no_grad():
        full = model(ids, exit_threshold=2.0).logits
        calibrated = model(ids)
        first = model(ids, exit_threshold=0.0)
        generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    torch.save({"full": full, "calibrated": calibrated.logits, "cycles": calibrated.exit_cycles,
                "first": first.exit_cycles, "generated": generated, "module": type(model).__module__}, out_path)
""")


def test_remote_code_ships_the_model_code_only():
    """Every file of ``model/`` travels (they import only each other), nothing else: not the test and
    benchmark helpers."""
    from ztt_cli.stages.export import ENTRY_MODULE, code_files

    shipped = set(code_files().values())
    assert ENTRY_MODULE in shipped and {"layout.py", "signals.py", "exits.py", "errors.py"} <= shipped
    assert "host_reads.py" not in shipped and "__init__.py" not in shipped


def test_remote_code_export_loads_without_ztt(ckpt, bare_venv, tmp_path):
    out = tmp_path / "dist"
    result = run("export", ckpt, "--out", out, "--format", "remote-code", "--shard-size", "40KB")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file()  # sharded, with its index
    assert (json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
            == "modeling_ztt.ZTTForCausalLM")
    ids = token_ids(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(bare_venv), "-I", str(tmp_path / "remote.py"), str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "got.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["module"].startswith("transformers_modules")  # the copied code, not ztt_cli
    model = load_checkpoint(ckpt).eval()
    with torch.no_grad():
        full = model(ids, exit_threshold=2.0).logits
        calibrated = model(ids)
        generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(got["full"], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["calibrated"], calibrated.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["cycles"], calibrated.exit_cycles)  # the calibrated threshold travels
    assert (got["first"] == 1).all()
    assert torch.equal(got["generated"], generated)


def test_hf_export_card_and_files(ckpt, tmp_path):
    out = tmp_path / "hf"
    old_umask = os.umask(0o022)
    try:
        result = run("export", ckpt, "--out", out, "--dtype", "bf16", "--name", "tiny-ztt")
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # shareable, not mkstemp's 0600
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "ztt.json", "recipe.yaml"} <= names
    assert not any(n.endswith(".py") for n in names)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "tags:" in card
    assert "# tiny-ztt" in card
    assert "1/2×2/1" in card and "## Recipe" in card and "threshold 0.01" in card
    assert json.loads((out / "ztt.json").read_text())["stages"][-1]["stage"] == "export"
    exported = load_checkpoint(out, dtype=torch.bfloat16).eval()
    assert exported.dtype == torch.bfloat16
    ids = token_ids(2, 16)
    with torch.no_grad():
        ref = load_checkpoint(ckpt).eval()(ids, exit_threshold=2.0).logits
        got = exported(ids, exit_threshold=2.0).logits.float()
    # bf16 weights: errors stay a small fraction of the logit scale
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_export_bad_input(ckpt, tmp_path):
    for result, fragment in [
        (run("export", tmp_path / "missing", "--out", tmp_path / "x"), "not a checkpoint"),
        (run("export", ckpt, "--out", ckpt), "already exists"),
        (run("export", ckpt, "--out", tmp_path / "y", "--format", "onnx"), "--format"),
        (run("export", ckpt, "--out", tmp_path / "z", "--shard-size", "lots"), "--shard-size"),
    ]:
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- --format plain

PLAIN_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys, torch
    assert importlib.util.find_spec("ztt_cli") is None, "ztt_cli must not be importable here"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids_path, out_path, *folders = sys.argv[1:]
    ids, got = torch.load(ids_path), {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
        AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            got[folder] = {"logits": model(ids).logits, "class": type(model).__name__,
                           "module": type(model).__module__, "layers": model.config.num_hidden_layers,
                           "generated": model.generate(ids[:1], max_new_tokens=8, do_sample=False)}
    torch.save(got, out_path)
""")


def _full_depth_without_pool(folder, ids):
    model = load_checkpoint(folder).eval()
    with torch.no_grad(), model.pool_disabled():
        return model(ids, exit_threshold=2.0).logits, model.generate(ids[:1], max_new_tokens=8, do_sample=False,
                                                                     exit_threshold=2.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_export_loads_as_the_family_without_ztt(family, ckpt, bare_venv, tmp_path, calib_file):
    """A --drop checkpoint (a plain model with fewer layers) and a cycled one (unrolled, zero token
    left out) load with AutoModelForCausalLM as the family's own class where ztt is not installed,
    with the logits of the ztt checkpoint at full depth with its pool off."""
    src = save_source(family, tmp_path / "src")
    drop = tmp_path / "drop"
    convert(ConvertOptions(source=str(src), out=drop, drop=2, calib_data=calib_file, calib_tokens=32))
    cycled = ckpt if family == "llama" else tmp_path / "cycled"
    if family != "llama":
        convert(ConvertOptions(source=str(src), out=cycled, init="lower", head=1, tail=1, block=2, cycles=2))
    outs = {}
    for name, folder in (("drop", drop), ("cycled", cycled)):
        outs[name] = tmp_path / f"plain-{name}"
        result = run("export", folder, "--out", outs[name], "--format", "plain")
        assert result.exit_code == 0, result.output
        assert "parameters; calibration-text perplexity" in result.output  # said before writing
        config = json.loads((outs[name] / "config.json").read_text())
        assert config["model_type"] == family and "auto_map" not in config and "head" not in config
        assert not any(p.suffix == ".py" for p in outs[name].iterdir())
        card = (outs[name] / "README.md").read_text()
        assert f"A plain `{family}` checkpoint" in card and "import ztt_cli" not in card
        assert "Exported as a plain model" in card
    ids = token_ids(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "plain.py").write_text(PLAIN_SCRIPT)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(bare_venv), "-I", str(tmp_path / "plain.py"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "got.pt"), *map(str, outs.values())], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    for name, folder in (("drop", drop), ("cycled", cycled)):
        plain = got[str(outs[name])]
        assert plain["module"].startswith(f"transformers.models.{family}")
        assert plain["layers"] == (4 if name == "drop" else 6)
        logits, generated = _full_depth_without_pool(folder, ids)
        torch.testing.assert_close(plain["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(plain["generated"], generated)


@pytest.mark.parametrize("family", FAMILIES)
def test_unrolling_merges_deltas_and_drops_closed_positions(family):
    """Relaxation deltas fold into the written weights; a grown model's positions whose gate is 0
    are left out, those at 1 kept; the plain model computes the ztt model with its pool off."""
    ids = token_ids(2, 16)
    relaxed, _ = ztt_model(family, (1, 2, 2, 1), relax_rank=4)
    with torch.no_grad():
        for p in relaxed.relax.parameters():
            p.normal_(0.0, 0.05)
    grown, _ = grown_model(family, (1, 2, 2, 1), dropped=(2, 3))
    for model, depth in ((relaxed, 6), (grown, 4)):
        plain = to_plain(model)
        assert type(plain).__name__ != "ZTTForCausalLM" and plain.config.num_hidden_layers == depth
        with torch.no_grad(), model.pool_disabled():
            torch.testing.assert_close(plain(ids).logits, model(ids, exit_threshold=2.0).logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        grown.gates.weight[1] = 1.0  # the added cycle fully open: a plain layer per position
    assert to_plain(grown).config.num_hidden_layers == 6
    with torch.no_grad():
        grown.gates.weight[1, 0] = 0.5
    with pytest.raises(NotPlainError, match="gate of cycle 2, block layer 0 is 0.5"):
        to_plain(grown)


def test_plain_export_refuses_what_no_plain_model_computes(tmp_path, calib_file):
    """Gates between 0 and 1, and positions whose index-derived attributes a plain model cannot give
    (GPT-2's 1/(i+1) scaling on a grown model's added cycle): one line, exit 2, nothing written."""
    common = dict(calib_data=calib_file, calib_tokens=32, init="grow", head=1, block=2, cycles=2, tail=1)
    for family, gate, fragment in (("llama", 0.5, "residual gate of cycle 2"), ("gpt2", 1.0, "does not reproduce")):
        src = save_source(family, tmp_path / f"src-{family}")
        folder = tmp_path / f"grown-{family}"
        convert(ConvertOptions(source=str(src), out=folder, grow_gate=gate, **common))
        result = run("export", folder, "--out", tmp_path / f"plain-{family}", "--format", "plain")
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert fragment in lines[0] and any("hint" in line.lower() or "--format hf" in line for line in lines), lines
        assert not (tmp_path / f"plain-{family}").exists()
