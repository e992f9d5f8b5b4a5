"""The documentation's links hold: in README.md, every docs/*.md and bench/README.md, each relative link and
image names a file that exists, and a #fragment names a heading of that file by GitHub's anchor rules. Also the
README's own rules: at most 250 lines, the two commands in its first code block, and every docs page saying
what it is for right under its title. Pure file reads: no network, no processes."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "bench" / "README.md"]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target may be <...>, and may carry a "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence) and not line.strip()[len(mark):].strip():
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links reduced to their text, markup dropped), lowercased,
    every character that is not a letter, digit, space, '-' or '_' removed, each space made '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        if base in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        else:
            seen[base] = 0
            anchor = base
        out.add(anchor)
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code (fenced blocks and inline spans)."""
    found = []
    for number, line in prose_lines(path.read_text()):
        line = INLINE_CODE.sub("", line)
        for m in LINK.finditer(line):
            target = m.group(1).strip("<>")
            found.append((number, target))
    return found


def broken_links(path: Path) -> list[str]:
    bad = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...: not checked here
            continue
        file_part, _, fragment = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{number}: ({target})"
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{where}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if fragment:
            if dest.is_dir() or dest.suffix != ".md":
                bad.append(f"{where}: a #fragment on a file that is not markdown")
            elif unquote(fragment) not in anchors(dest):
                bad.append(f"{where}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert page.is_file(), page
    assert broken_links(page) == []


def test_the_docs_are_there():
    names = {p.name for p in DOCS}
    assert {"api.md", "operations.md", "memory.md", "models.md", "deploy.md", "security.md",
            "development.md"} <= names, names


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert text.startswith("# sdfleet\n")
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert first_block, "README has no code block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert "make demo" in commands and "make test" in commands, first_block.group(1)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_each_docs_page_says_what_it_is_for(page):
    """An H1, then a paragraph of text (not a heading, a list, a table, code or a picture) saying what the page
    is for."""
    blocks = [b.strip() for b in page.read_text().split("\n\n") if b.strip()]
    assert blocks[0].startswith("# ") and "\n" not in blocks[0], f"{page.name} does not open with one H1"
    first = blocks[1]
    assert not re.match(r"^(#|[-*+] |\d+\. |\||```|~~~|!\[|>|<)", first), f"{page.name}: {first[:80]!r}"
    assert len(re.findall(r"[A-Za-z]+", first)) >= 8, f"{page.name}: {first!r} is too short to say much"


# the checker itself, on made-up files: a broken link is found, a good one is not


def test_slugs_follow_github():
    assert slug("API (v1)") == "api-v1"
    assert slug("Exporting a model: `sdfleet model export`") == "exporting-a-model-sdfleet-model-export"
    assert slug("Low mode's speed on a bf16 CPU without AMX (2026-11-29)") == \
        "low-modes-speed-on-a-bf16-cpu-without-amx-2026-11-29"
    assert slug("int8-hybrid: 8-bit convolutions at f32 (`sdfleet model export --weight-format int8-hybrid`)") == \
        "int8-hybrid-8-bit-convolutions-at-f32-sdfleet-model-export---weight-format-int8-hybrid"
    assert slug("f32 without bf16: split guidance (`SDFLEET_SPLIT_GUIDANCE`, on in `low`)") == \
        "f32-without-bf16-split-guidance-sdfleet_split_guidance-on-in-low"


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\nText.\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n[not](a-link.md)\n```\n"
        "[ok](#same-1) [ok](b.md#b) ![ok](pic.png) [ok](https://example.com/x) `[code](no.md)`\n"
        "[bad](#same-2) [bad](missing.md) [bad](b.md#nope) [bad](#not-a-heading)\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    bad = broken_links(tmp_path / "docs" / "a.md")
    assert [b.split(": (")[1].split(")")[0] for b in bad] == ["#same-2", "missing.md", "b.md#nope", "#not-a-heading"]
