"""The README and docs/ hold together: every relative link reaches a file and, where it names one, a heading
(anchors as GitHub makes them), and prose lines stay within 120 characters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], False
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            out.append((n, line))
    return out


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    for _, line in outside_code(path.read_text()):
        m = re.match(r"#+ (.*)", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            if seen[s]:
                seen[f"{s}-{seen[s]}"] = 0
    return set(seen)


def test_slug_matches_github():
    assert slug("`make demo` over time") == "make-demo-over-time"
    assert slug("On a GPU: `gpu_suite.sh`") == "on-a-gpu-gpu_suitesh"
    assert slug("DataComp's tasks") == "datacomps-tasks"
    assert slug("Real-scale recipes: exact accumulation, FLIP, LiT") == "real-scale-recipes-exact-accumulation-flip-lit"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for n, line in outside_code(doc.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.name}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.name}:{n}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_prose_lines_fit(doc: Path):
    long = [f"{doc.name}:{n}" for n, line in outside_code(doc.read_text()) if len(line) > 120]
    assert not long, f"lines over 120 characters: {long}"


def test_every_doc_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in readme]
    assert not missing, f"docs/ files the README's table of contents lacks: {missing}"
