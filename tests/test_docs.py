"""The documentation: the README stays a short front page, every relative link and image in it and
in docs/ resolves, and bench/compare.py writes its generated blocks with a plot link that works
from any folder (docs/results.md holds them)."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _compare_module():
    """bench/compare.py, loaded when a test needs it (it imports torch and the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compare_docs", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "results.md", "how-it-works.md"} <= names
    assert all(_links(p) for p in PAGES), "every page links somewhere"


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    top = "\n".join(lines[:10])
    assert "./dev.sh demo" in top and "./dev.sh test" in top
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from the README: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_results_page_has_a_block_for_every_comparison_config():
    text = (ROOT / "docs" / "results.md").read_text()
    for config in sorted((ROOT / "bench").glob("compare*.yaml")):
        profile = yaml.safe_load(config.read_text())["profile"]
        start, end = f"<!-- compare:{profile} -->", f"<!-- /compare:{profile} -->"
        assert text.count(start) == 1 and text.count(end) == 1, f"{config.name}: no {start} block in docs/results.md"
        assert text.index(start) < text.index(end)


def test_update_readme_links_the_plot_relative_to_the_page(tmp_path, monkeypatch):
    compare = _compare_module()
    monkeypatch.chdir(tmp_path)  # relative paths, as on the command line: --readme docs/results.md
    page = Path("docs/results.md")
    page.parent.mkdir()
    page.write_text("# Results\n\n<!-- compare:gpu-h200 -->\nold table\n<!-- /compare:gpu-h200 -->\nafter\n")
    png = Path("bench/results/compare-gpu-h200.png")
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n")

    compare.update_readme(page, "gpu-h200", "| new | table |\n", png)
    text = page.read_text()
    assert text.startswith("# Results\n\n<!-- compare:gpu-h200 -->\n| new | table |\n")
    assert text.endswith("<!-- /compare:gpu-h200 -->\nafter\n") and "old table" not in text
    assert "![gpu-h200 results](../bench/results/compare-gpu-h200.png)" in text
    target = re.search(r"!\[gpu-h200 results\]\(([^)]+)\)", text).group(1)
    assert (page.parent / target).resolve() == png.resolve()

    # a page beside the results folder (a README at the root) still gets a plain relative link
    readme = Path("README.md")
    readme.write_text("<!-- compare:cpu -->\n<!-- /compare:cpu -->\n")
    compare.update_readme(readme, "cpu", "t\n", Path("bench/results/compare-cpu.png"))
    assert "![cpu results](bench/results/compare-cpu.png)" in readme.read_text()

    with pytest.raises(SystemExit, match="no <!-- compare:gpu -->"):
        compare.update_readme(page, "gpu", "t\n", png)
