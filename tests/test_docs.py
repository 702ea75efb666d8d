"""The documentation holds together: README.md stays a short entry point, and every relative link in the
README, docs/, benchmarks/ and native/ Markdown files reaches an existing file and, for a ``#anchor``, a
heading of the target (GitHub's heading slugs), so moving or renaming a page or a section breaks a test
instead of a reader's click."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
DOCS = sorted(
    {ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/**/*.md"), *ROOT.glob("native/*.md")}
)

# [text](target "title") and ![alt](target); the text may hold one level of brackets (an image inside a link)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...: not checked here


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks: where a ``#`` line is a heading and a ``[x](y)``
    a link (unless inside an inline code span)."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(fence[0] + " "):
                fence = None
        else:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped, each space a '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path):
    """(line number, target) of every inline link, image and reference definition outside code."""
    for n, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)  # inline code is not a link
        for m in INLINE_LINK.finditer(line):
            yield n, m.group(1)
        m = REFERENCE_DEF.match(line)
        if m:
            yield n, m.group(1)


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """One message per relative link in ``doc`` whose file, or whose #anchor in a Markdown target, is missing."""
    errors = []
    where = doc.relative_to(root)
    for n, target in links(doc):
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc.resolve()
        if root.resolve() not in (dest, *dest.parents):
            errors.append(f"{where}:{n}: {target} points outside the repository")
        elif not dest.exists():
            errors.append(f"{where}:{n}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            errors.append(f"{where}:{n}: {target}: {dest.relative_to(root.resolve())} has no heading #{anchor}")
    return errors


def test_readme_is_an_entry_point_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")  # what `wc -l` counts
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_docs_relative_links_resolve(doc):
    errors = broken_links(doc)
    assert not errors, "broken links:\n" + "\n".join(errors)


def test_docs_every_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme) if not SCHEME.match(t)}
    missing = [str(d.relative_to(ROOT)) for d in sorted(ROOT.glob("docs/*.md")) if d.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_docs_slugs_follow_github():
    assert slug("Quantized base (`--quantize`)") == "quantized-base---quantize"
    assert slug("Seed-and-scalar log, `mobizo replay`") == "seed-and-scalar-log-mobizo-replay"
    assert slug("Export: memory, time and the program cache") == "export-memory-time-and-the-program-cache"
    assert slug("See [the CLI](docs/cli.md) & more") == "see-the-cli--more"
    assert slug("Schéma ε → δ") == "schéma-ε--δ"


def test_docs_checker_reports_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Same\n\n## Same\n\nText.\n", encoding="utf-8")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same-1) [ok](#top) ![ok](docs/a.md) [web](https://x.org/missing.md)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#same-2) ![gone](img.png) [self](#nowhere)\n"
        "[out](../outside.md)\n\n"
        "```\n[not a link](docs/nothing.md)\n```\n"
        "`[code](docs/nothing.md)`\n\n"
        "[ref]: docs/missing.md\n",
        encoding="utf-8",
    )
    (tmp_path.parent / "outside.md").write_text("# x\n", encoding="utf-8")
    errors = broken_links(doc, root=tmp_path)
    assert [e.split(": ", 1)[1] for e in errors] == [
        "docs/b.md: no such file",
        "docs/a.md#same-2: docs/a.md has no heading #same-2",
        "img.png: no such file",
        "#nowhere: README.md has no heading #nowhere",
        "../outside.md points outside the repository",
        "docs/missing.md: no such file",
    ]
