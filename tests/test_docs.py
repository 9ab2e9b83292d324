"""The front page and the guides: every relative link in README.md, docs/*.md and results/README.md
leads to a file or folder that exists, every `#anchor` to a heading of the file it points into, and
the README stays a front page (at most 150 lines, with the two commands)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "results" / "README.md"]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of brackets
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than hyphens and
    spaces removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def test_slug_follows_github() -> None:
    assert slug("Previous single-run tables (M = 300)") == "previous-single-run-tables-m--300"
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("Countermeasures (`train.defense`)") == "countermeasures-traindefense"
    assert slug("Why, measured") == "why-measured"


def test_the_documents_exist() -> None:
    for path in DOCS:
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert {"owner.md", "cluster.md", "configuration.md", "experiments.md", "benchmarks.md", "architecture.md"} <= {
        p.name for p in DOCS
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if not target or EXTERNAL.match(target):
            continue
        file, _, anchor = unquote(target).partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file or folder")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_a_front_page() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make demo" in text and "make test" in text
    for guide in (
        "docs/owner.md",
        "docs/experiments.md",
        "docs/cluster.md",
        "docs/configuration.md",
        "docs/benchmarks.md",
        "docs/architecture.md",
        "results/README.md",
        "LICENSE",
    ):
        assert f"]({guide}" in text, f"README.md does not link {guide}"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n## A section\n\n[ok](#a-section) [gone](missing.md) [bad](#nowhere) "
        "`[not a link](x.md)`\n\n```\n[code](y.md)\n```\n[web](https://example.com)\n"
    )
    assert links(doc) == ["#a-section", "missing.md", "#nowhere", "https://example.com"]
    assert anchors(doc) == {"title", "a-section"}
