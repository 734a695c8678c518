"""README.md and docs/ point only at files in the repository (papers are cited by title and link)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = sorted(
    [REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").rglob("*.md"), *(REPO / "recipes").rglob("*.md")]
)
FOLDERS = "recipes|docs|kd_lightning|benchmarks|notebooks|tests"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_named_files_exist(page: Path) -> None:
    text = page.read_text()
    links = [m.group(1) for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)]
    missing = [t for t in links if not t.startswith(("http://", "https://")) and not (page.parent / t).exists()]
    named = re.findall(rf"`((?:{FOLDERS})/[\w./-]+\.(?:py|yaml|md|ipynb|png))`", text)
    missing += [t for t in named if not (REPO / t).exists()]
    assert not missing, f"{page.name} points at files that are not in the repository: {missing}"
    outside = re.findall(r"\bpapers/\w+\.md|\bDESIGN\.md|\bSTYLE\.md|\.\./shared", text)
    assert not outside, f"{page.name} points outside the repository: {outside}"


def test_every_datamodule_is_documented_and_tested() -> None:
    """Adding a dataset touches what docs/datasets.md says: the page names it, and a test or a recipe uses it."""
    import inspect

    import kd_lightning.data as data
    from kd_lightning.data.base import ImageDataModule

    exported = sorted(
        name
        for name, obj in vars(data).items()
        if inspect.isclass(obj) and issubclass(obj, ImageDataModule) and obj is not ImageDataModule
    )
    assert len(exported) >= 20 and "FashionMNISTDataModule" in exported  # the scan itself works
    page = (REPO / "docs" / "datasets.md").read_text() + (REPO / "README.md").read_text()
    used = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_docs.py")
    used += "".join(p.read_text() for p in (REPO / "recipes").rglob("*.yaml"))
    undocumented = [n for n in exported if f"`{n}`" not in page]
    unused = [n for n in exported if n not in used]
    assert not undocumented, f"DataModules not named in docs/datasets.md or the README: {undocumented}"
    assert not unused, f"DataModules no test and no recipe uses: {unused}"
