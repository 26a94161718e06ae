"""The documentation's promises: a README that fits its purpose and links that resolve.

README.md is the front page: at most 150 lines, and its first screen (40 lines) shows the
two set-up commands that CI (.ci/run) and users type. Every relative link in README.md and
docs/*.md must name an existing file and, with a `#fragment`, a heading of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").glob("*.md")])

# [text](target) outside code; images too. Targets with a scheme (http:, mailto:) are external.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(path: Path, strip_code: bool = True) -> list[str]:
    """Lines outside fenced and indented code blocks, inline code spans removed unless told."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        lines.append(re.sub(r"`[^`]*`", "", line) if strip_code else line)
    return lines


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(line) for line in _prose_lines(path, strip_code=False) if re.match(r"#{1,6} ", line)}


def _relative_links() -> list[tuple[Path, str]]:
    return [
        (path, target)
        for path in DOCS
        for line in _prose_lines(path)
        for target in LINK.findall(line)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)
    ]


def test_readme_fits_on_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_anchor_rule_matches_github() -> None:
    assert _anchor("## 1. NetVLAD `.mat` (Pittsburgh, Tokyo 24/7)") == "1-netvlad-mat-pittsburgh-tokyo-247"


def test_docs_have_links_to_check() -> None:
    assert len(_relative_links()) >= 10  # the checker finds links at all


@pytest.mark.parametrize(("path", "target"), _relative_links(), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_relative_link_resolves(path: Path, target: str) -> None:
    file_part, _, fragment = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(REPO)} links to {target}"
    assert linked.exists(), f"{where}: {linked} does not exist"
    if fragment and linked.suffix == ".md":
        assert fragment in _anchors(linked), f"{where}: no heading with anchor #{fragment}"


def test_make_demo_runs_the_entry_scripts_of_this_checkout() -> None:
    """`make demo` runs train.py / eval.py / cluster.py by path (src/wakd/synth/demo.py)."""
    from wakd.synth import demo

    assert all((demo.REPO / script).is_file() for script in ("train.py", "eval.py", "cluster.py")), demo.REPO
