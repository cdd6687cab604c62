"""The documents' links: every relative link in README.md and BENCHMARKS.md names a file of
the repository, and every #anchor a heading of it (as GitHub makes anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not headings in code
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_slugs_are_githubs() -> None:
    assert slug("Compute/communication overlap") == "computecommunication-overlap"
    assert slug("Simulator scale: 256 and 1,000 nodes") == "simulator-scale-256-and-1000-nodes"
    assert slug("Averaging: hivemind's `DecentralizedAverager`") == (
        "averaging-hiveminds-decentralizedaverager"
    )


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc: str) -> None:
    broken = []
    for target in LINK.findall((ROOT / doc).read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = ROOT / (file or doc)
        if not path.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)
