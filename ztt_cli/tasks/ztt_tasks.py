"""Datasets of the tasks shipped with ztt, loaded by lm-eval through ``custom_dataset: !function``.

lm-eval calls each with the task's metadata and ``dataset_kwargs`` as keyword arguments; the
``text:PATH`` / ``mc:PATH`` task specs of ``ztt eval`` pass the path as ``dataset_kwargs``."""

from __future__ import annotations


def _test_split(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def shakespeare_heldout(**_):
    from ztt_cli.io.texts import tempest_acts

    return _test_split([{"name": name, "text": text} for name, text in tempest_acts()])


def docutils_ppl(**_):
    from ztt_cli.io.texts import DOCUTILS_PPL, docutils_documents

    return _test_split([{"name": name, "text": text} for name, text in docutils_documents(DOCUTILS_PPL)])


def docutils_cloze(**_):
    from ztt_cli.io.texts import cloze_questions, docutils_documents

    return _test_split(cloze_questions(docutils_documents()))


def text_file(path: str | None = None, text_field: str = "text", **_):
    from ztt_cli.stages.eval import text_documents

    return _test_split(text_documents(path, text_field))


def mc_file(path: str | None = None, **_):
    from ztt_cli.stages.eval import mc_questions

    return _test_split(mc_questions(path))
