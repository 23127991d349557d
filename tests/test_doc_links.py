"""The Markdown docs' relative links resolve, and every result file is named in its study's README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md"), *RESULTS.glob("*/README.md")])
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", _FENCE.sub("", markdown), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(path: Path) -> list[str]:
    """The relative links of the Markdown file ``path`` whose file or heading anchor does not exist."""
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(_FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def test_the_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# A\n## micro-SD: speed and quality\n```\n# not a heading [x](gone.md)\n```\n"
                                   "[ok](a.md#micro-sd-speed-and-quality) [gone](b.md) [bad anchor](#not-a-heading) "
                                   "[web](https://example.org)", encoding="utf-8")
    assert broken_links(tmp_path / "a.md") == ["b.md", "#not-a-heading"]


def test_the_documents_exist():
    names = {path.relative_to(REPO).as_posix() for path in DOCS}
    assert {"README.md", "CONTRIBUTING.md", "docs/measurements.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_result_file_is_in_a_study_folder_named_by_its_readme():
    assert not [p.name for p in RESULTS.iterdir() if p.is_file()], "results go in a study folder"
    for study in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        readme = study / "README.md"
        assert readme.is_file(), f"{study.name} has no README.md"
        linked = set(_LINK.findall(readme.read_text(encoding="utf-8")))
        missing = [p.name for p in study.iterdir() if p.name != "README.md" and p.name not in linked]
        assert missing == [], f"{study.name}/README.md does not link {missing}"
