"""Every relative link in README.md and docs/*.md resolves: the file exists, and so does the
heading an anchor names. Links inside code (fenced blocks, inline spans) are not links, and
URLs with a scheme are out of reach here (no network), so both are skipped.

The pages also name the project's files in prose (`mtplx/engine/strict.py`); modules move, so
every such path must exist too, or the page sends a reader to nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) or [text](target "title"); an image ![..](..) is a link to a file too.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A repository path named in inline code: `mtplx/...`, `tests/...`, `runtime_contracts/...`.
NAMED_PATH = re.compile(r"`((?:mtplx|tests|runtime_contracts|formula|docs)/[^`\s]*)`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (hyphens and
    underscores kept), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings give, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    found = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        found += LINK.findall(INLINE_CODE.sub("", line))
    return found


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken(page: Path) -> list[str]:
    """The page's relative links that do not resolve, each with the reason."""
    problems = []
    for target in links(page):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no file {_show(dest)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading gives #{anchor} in {_show(dest)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken(page) == [], f"{page.relative_to(ROOT)}: fix these links"


def missing_paths(page: Path) -> list[str]:
    """Repository paths the page names in its prose that do not exist."""
    named = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        named.update(NAMED_PATH.findall(line))
    return sorted(p for p in named if not (ROOT / p).exists())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(page):
    assert missing_paths(page) == [], f"{page.relative_to(ROOT)} names files that moved or went"


def test_the_checker_sees_a_broken_file_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Real shapes: `mtplx bench --shape`\n")
    page.write_text(
        "# Title\n\n"
        "[ok](other.md) [ok](other.md#real-shapes-mtplx-bench---shape) [ok](#title)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad here](#nothing)\n"
        "`[code](missing-in-code.md)` [web](https://example.com/x.md)\n"
        "```\n[fenced](missing-in-fence.md)\n```\n")
    assert [p.split(":")[0] for p in broken(page)] == ["missing.md", "other.md#nowhere", "#nothing"]


def test_the_path_checker_sees_a_moved_module(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See `mtplx/api.py` and `mtplx/no_such_module.py`.\n```\n`mtplx/in_a_fence.py`\n```\n")
    assert missing_paths(page) == ["mtplx/no_such_module.py"]


def test_the_readme_is_read_in_five_minutes():
    # issue 27: what mtplx is, its promises, set-up and use; everything else lives in docs/.
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
