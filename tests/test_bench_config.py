"""bench/: the comparison configs are well formed and its results table, partial runs and README block come out right
(the runs themselves are benchmarks, not tests)."""

import json
from pathlib import Path

import pytest
import yaml

from ztt_cli.model.layout import Layout
from ztt_cli.stages import CalibrateOptions, ConvertOptions, FinetuneOptions

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("path", sorted(BENCH.glob("compare*.yaml")), ids=lambda p: p.name)
def test_compare_config(path):
    cfg = yaml.safe_load(path.read_text())
    assert {"profile", "work", "source", "layout", "heal", "variants", "decode"} <= set(cfg)
    Layout.for_source(30, **cfg["layout"])  # SmolLM2-135M's depth
    names = [v["name"] for v in cfg["variants"]]
    assert len(names) == len(set(names))
    for v in cfg["variants"]:
        assert v["kind"] in ("source", "dense", "drop", "cycle"), v
        if v["kind"] == "drop":
            assert v["select"] in ("block-influence", "contiguous") and 1 <= v.get("drop", 1) <= 28
        convert = ConvertOptions(source="s", out=".", **v.get("convert", {}))
        # a grown layout may run deeper than the source; every other one replaces it layer for layer
        Layout.for_source(30, **v.get("layout", cfg["layout"]), grown=convert.init == "grow")
        FinetuneOptions(checkpoint=".", out=".", **{**cfg["heal"], **v.get("heal", {})})
    if "early_exit" in cfg:
        assert cfg["early_exit"]["variant"] in names
        CalibrateOptions(checkpoint=".", data="d", target_speedup=1.1, **cfg["early_exit"].get("calibrate", {}))


def _bench_module(name: str = "compare"):
    """bench/NAME.py, imported as a module (its own imports of bench/'s other scripts resolve if bench/ is on
    sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ppl: float, layout: str, unique: int, heal: bool) -> dict:
    after = {"tempest16": ppl, "docutils16": 2 * ppl, "agreement": 0.6, "mean_cycles": 1.0, "compute_saved": 0.0}
    row = {"before": {"tempest16": 3 * ppl, "docutils16": 5 * ppl}, "after": after, "params": 100e6,
           "unique_layers": unique, "layout": layout, "decode_tok_s_b1": 20.0, "decode_tok_s_b8": 100.0, "done": True}
    if heal:
        row["heal"] = {"tokens": 30720, "train_tokens_per_s": 70.0, "train_s": 438.0}
    return row


def test_results_table_partial_runs_and_readme_block(tmp_path):
    compare = _bench_module()
    cfg = yaml.safe_load((BENCH / "compare.yaml").read_text())
    report = {
        "profile": "cpu", "config": cfg, "complete": False,
        "variants": {"source": _row(44.08, "0/30×1/0", 30, False), "ZTT": _row(45.04, "10/5×2/10", 25, True)},
        "early_exit": {"full depth": {"threshold": 2.0, "tempest16": 45.04, "docutils16": 36.6, "agreement": 0.63,
                                      "mean_cycles": 2.0, "compute_saved": 0.0, "done": True},
                       "calibrated 1.25× wall": {"error": "target 1.25× is above this layout's bound"}},
        "corpora": {"docutils": "docutils==0.21.2 sha256 abc"},
        "meta": {"device": "cpu", "machine": "x86_64, 2 threads", "torch": "2.13.0", "date": "2026-11-26"},
    }
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- compare:cpu -->\nold table\n<!-- /compare:cpu -->\nafter\n")
    table = compare.write_outputs(report, tmp_path / "results", readme)
    lines = table.splitlines()
    assert any(ln.startswith("| ZTT | 10/5×2/10 | 25 | 100.0 M | 135.12 → 45.04 |") and "70 (7.3 min)" in ln
               for ln in lines)
    assert any(ln.startswith("| source | 0/30×1/0 | 30 |") and ln.endswith("| – |") for ln in lines)
    missing = [v["name"] for v in cfg["variants"] if v["name"] not in report["variants"]]
    assert f"Partial run: not yet measured: {', '.join(missing)}." in lines
    assert "| calibrated 1.25× wall | not reached: target 1.25× is above this layout's bound |" in table
    text = readme.read_text()
    assert (text.startswith("# title\n\nbefore\n<!-- compare:cpu -->\n")
            and text.endswith("<!-- /compare:cpu -->\nafter\n"))
    assert "old table" not in text and table in text and "![cpu results](results/compare-cpu.png)" in text
    assert (tmp_path / "results" / "compare-cpu.png").stat().st_size > 1000
    # rebuilt from its own JSON (results measured elsewhere): the same table, the README unchanged
    again = compare.write_outputs(json.loads((tmp_path / "results" / "compare-cpu.json").read_text()),
                                  tmp_path / "results", readme)
    assert again == table and readme.read_text() == text


def test_variants_convert_with_their_own_options(tmp_path, monkeypatch):
    """Each kind of variant asks `ztt convert` for what it names (no conversion runs here)."""
    compare = _bench_module()
    asked = []
    monkeypatch.setattr(compare, "convert", lambda opts: asked.append(opts))
    monkeypatch.setattr(compare, "sources_layers", lambda cfg: 30)
    cfg = yaml.safe_load((BENCH / "compare-cpu-grow.yaml").read_text())
    for v in cfg["variants"]:
        compare.convert_variant(v, cfg, tmp_path)
    by_name = dict(zip([v["name"] for v in cfg["variants"]], asked))
    assert by_name["drop block influence"].drop == 11 and by_name["drop block influence, 22 layers"].drop == 8
    grown = by_name["ZTT grown, relaxed r = 32"]
    assert (grown.init, grown.relax_rank, grown.head, grown.block, grown.tail) == ("grow", 32, 4, 11, 4)
    outs = [opts.out for opts in asked]
    assert len(set(outs)) == len(outs) - 1  # the two healings of the same 19-layer drop share one conversion


def test_overhead_tables_and_docs_block(tmp_path):
    """bench/overhead.py's tables: per model, then per family the wrapper tax, the drop against its
    own model and the zero token's cost per block layer (from the tok/s of ztt with and without pool)."""
    module = _bench_module("overhead")
    rates = {"own 32": 100.0, "no-share": 98.0, "own 20": 160.0, "drop": 156.0, "ztt": 100.0, "ztt + pool": 80.0,
             "ztt + exits": 90.0}
    layers = {"own 32": 32, "no-share": 32, "own 20": 20, "drop": 20, "ztt": 32, "ztt + pool": 32, "ztt + exits": 26}
    rows = [{"family": "llama", "batch": 1, "model": m, "layers_run": layers[m], "tok_s": r, "tok_s_min": r - 1,
             "tok_s_max": r + 1, "per_layer_vs_own": r * layers[m] / ((160.0 if layers[m] == 20 else 100.0) *
                                                                   (20 if layers[m] == 20 else 32)),
             "host_reads_per_token": 1.0 if m == "ztt + exits" else 0.0, "cuda_syncs_per_token": 0.0,
             "python_us_per_slot": None if m.startswith("own") else 5.0,
             "times": [32 / r * f for f in (0.9, 1.0, 1.1)]} for m, r in rates.items()]  # drifts that all saw
    rows[1]["times"] = [t / f for t, f in zip(rows[0]["times"], (0.95, 0.98, 1.01))]  # no-share: 0.98 ± noise
    report = {"meta": {"device": "cpu", "machine": "x86_64", "threads": 2, "torch": "2", "date": "2026-11-28"},
              "reps": 7, "exit_fraction": 0.5, "rows": rows,
              "inductor": [{"family": "llama", "model": "ztt, compiled", "tok_s": 250.0, "tok_s_min": 240.0,
                            "tok_s_max": 260.0}]}
    table = module.markdown(report)
    # 24 pool slots (32 layers less head and tail 4 + 4): (1/80 - 1/100) s / 24 = 104.2 µs
    assert "| llama | 1 | 0.980 | 0.975 | 104.2 |" in table
    assert "| llama | ztt, compiled | 250 (240–260) |" in table
    # the goals, as paired ratios per repetition: the drifts cancel; quartiles of (0.95, 0.98, 1.01)
    assert "| no-share against its own model of the same depth | ≥ 0.98 | 0.980 (0.965–0.995) ~ |" in table
    assert "| drop against its own model of the same depth | ≥ 0.98 | 0.975 (0.975–0.975) ✗ |" in table
    assert "| ZTT without pool against the source, per layer run | ≥ 0.95 | 1.000 (1.000–1.000) ✓ |" in table
    assert "| ZTT with pool against ZTT without pool | ≥ 0.85 | 0.800 (0.800–0.800) ✗ |" in table
    assert "| exits on against exits off, per layer run | ≥ 0.97 | 0.914 (0.914–0.914) ✗ |" in table  # 90/80·26/32
    page = tmp_path / "results.md"
    page.write_text("before\n<!-- overhead -->\nold\n<!-- /overhead -->\nafter\n")
    module.update_readme(page, table)
    text = page.read_text()
    assert (text.startswith("before\n<!-- overhead -->\n`python bench/overhead.py`")
            and text.endswith("<!-- /overhead -->\nafter\n"))
    assert "old" not in text


def test_borrowed_points_layers_per_token_and_depth_by_text(tmp_path):
    """A profile can plot variants another profile measured (``points:``), its early-exit table gives
    layers per token, and the depth of each exiting model on every text comes with its spread."""
    compare = _bench_module()
    cfg = yaml.safe_load((BENCH / "compare-cpu-halting.yaml").read_text())
    assert [spec["from"] for spec in cfg["points"]] == ["cpu-fit-ztt", "cpu-fit-exit"]
    drops = cfg["points"][0]["variants"]
    cfg["points"] = [cfg["points"][0], {"from": "cpu-grow", "early_exit": True}]  # measured profiles only
    borrowed = compare.borrowed_points(cfg)
    assert list(borrowed)[:3] == drops and {v["from"] for v in borrowed.values()} == {"cpu-fit-ztt", "cpu-grow"}
    assert "ZTT grown, calibrated 1.1× wall" in borrowed and "ZTT grown, full depth" not in borrowed
    halting = _row(58.0, "4/11×2/4", 19, True)
    halting["after"].update(mean_cycles=1.5, cycles_by_text={"tempest16": 1.5, "docutils16": 1.4, "samples16": 1.6})
    full = _row(57.0, "4/11×2/4", 19, True)
    full["after"].update(mean_cycles=2.0, cycles_by_text={"tempest16": 2.0, "docutils16": 2.0, "samples16": 2.0})
    names = [v["name"] for v in cfg["variants"]]
    cfg["early_exit"] = {"variant": names[0], "calibrate_compute": [1.22]}
    report = {
        "profile": "cpu-halting", "config": cfg, "complete": False, "points": borrowed, "source_layers": 30,
        "variants": {names[0]: full, names[2]: halting},
        "early_exit": {"calibrated 1.22× compute": {
            "threshold": 0.3, "tempest16": 59.0, "docutils16": 104.0, "agreement": 0.55, "mean_cycles": 1.5,
            "compute_saved": 0.1833, "cycles_by_text": {"tempest16": 1.5, "docutils16": 1.8, "samples16": 1.2},
            "done": True}},
        "corpora": {"docutils": "docutils==0.21.2 sha256 abc"},
        "meta": {"device": "cpu", "machine": "x86_64, 2 threads", "torch": "2.13.0", "date": "2026-12-06"},
    }
    table = compare.write_outputs(report, tmp_path)
    assert "Also plotted, as measured by another profile at the same healing budget: drop block influence, fitted " \
           "(cpu-fit-ztt, 95.6 M): 57.48 / 102.39" in table
    assert "| calibrated 1.22× compute | 0.3 | 1.50 | 24.5 | 18.3% |" in table  # 30 layers × (1 − 0.1833)
    assert f"| {names[2]} | 1.500 | 1.400 | 1.600 | 13.3% |" in table
    assert f"| {names[0]}, calibrated 1.22× compute | 1.500 | 1.800 | 1.200 | 40.0% |" in table
    assert f"| {names[0]} | 2.000" not in table  # full depth on every text: no row
    assert (tmp_path / "compare-cpu-halting.png").stat().st_size > 1000
    # the plot's frontiers: each row at the depth it ran on that text (8 + 11 × cycles layers of 30)
    by_text = {text: {n: sx for (sx, _), ns in compare.frontier(report, text, 30).items() for n in ns}
               for text in ("tempest16", "docutils16")}
    assert by_text["tempest16"][names[2]] == by_text["tempest16"]["ZTT, calibrated 1.22× compute"] == 18.33
    assert (by_text["docutils16"][names[2]], by_text["docutils16"]["ZTT, calibrated 1.22× compute"]) == (22.0, 7.33)
    assert by_text["docutils16"][f"{drops[0]} (cpu-fit-ztt)"] == by_text["tempest16"][f"{drops[0]} (cpu-fit-ztt)"]


def test_fit_bench_cases_phases_and_verdicts(monkeypatch):
    """bench/fit.py (the cost of a fit at scale): every case is a conversion ztt accepts, the grown model's added
    cycle reads the tokens asked, each phase lasts to the next one's start, and each fit is judged against its own
    plain conversion."""
    monkeypatch.syspath_prepend(str(BENCH))  # it imports bench/memory.py
    fit = _bench_module("fit")
    cases = fit.cases(200_000)
    for options in cases.values():
        ConvertOptions(source="s", out=".", **options)
    grown = cases["grown, fitted"]
    per_step = 4 * grown["fit_window"]
    assert grown["fit_steps"] * per_step >= 200_000 > (grown["fit_steps"] - 1) * per_step
    assert cases["drop, plain"]["fit"] is False and cases["drop, fitted"]["fit_tokens"] == 200_000
    stamps = [[0.0, "load"], [2.5, "fit"], [4.0, "fit"], [10.0, "done"]]
    assert fit.phase_seconds(stamps) == [["load", 2.5], ["fit", 1.5], ["fit", 6.0]]
    rows = {"drop, plain": {"rc": 0, "wall_s": 60.0, "peak_rss_bytes": 1e9},
            "drop, fitted": {"rc": 0, "wall_s": 1000.0, "peak_rss_bytes": 1.4e9},
            "grown, plain": {"rc": 0, "wall_s": 60.0, "peak_rss_bytes": 1e9},
            "grown, fitted": {"rc": 1, "wall_s": 5.0, "peak_rss_bytes": 1e8}}  # a failed run is not judged
    assert fit.against_plain(rows) == {"drop": {"fit_s": 940.0, "peak_ratio": 1.4, "time_goal_met": False,
                                                "memory_goal_met": True}}


def test_fit_bench_records_the_phases_and_the_fit_of_a_conversion(tmp_path, monkeypatch, calib_file):
    """In the measured process, bench/fit.py stamps each phase the stage announces and keeps what the fit did."""
    from .fixtures import save_source

    monkeypatch.syspath_prepend(str(BENCH))
    fit = _bench_module("fit")
    monkeypatch.setattr(fit.memory, "SMOLLM2", str(save_source("llama", tmp_path / "src")))
    report = tmp_path / "report.json"
    fit.convert_one({"drop": 2, "fit": True, "fit_tokens": 2048, "fit_window": 64, "calib_data": str(calib_file)},
                    tmp_path / "out", report)
    done = json.loads(report.read_text())
    assert done["phases"][-1][1] == "done" and any("fitting the drop" in m for _, m in done["phases"])
    assert [t for t, _ in done["phases"]] == sorted(t for t, _ in done["phases"])
    assert done["fit"]["tokens"] == 2048 and all(gap["fitted"] for gap in done["fit"]["gaps"])
