"""The README and docs/ against the repository: generated pages equal what their generators
print now, every relative link and every cited source file exists, and nothing points
outside the repository (a user has only the repository)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mom_ds.config_reference import COMMAND, PAGE, render
from mom_ds.train.resume_rules import rules_markdown

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target): inline links and images
CITED = re.compile(r"\b((?:tests|mom_ds|configs|ds_configs|bench|launch|data_prep|scripts)"
                   r"/[\w/.-]+\.(?:py|yaml|json|sh|sbatch))")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lowercase, punctuation but - and _ dropped, spaces
    to hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_configuration_page_is_fresh():
    assert (REPO / PAGE).read_text() == render(), f"{PAGE} is stale: run {COMMAND}"


def test_configuration_page_lists_every_field_with_its_docstring():
    """Independent of render(): every field of every section has a docstring, and appears
    as a table row holding its docstring's first words."""
    import dataclasses
    import typing

    from mom_ds.config import RunConfig, field_docs

    page = (REPO / PAGE).read_text()
    for section in dataclasses.fields(RunConfig):
        klass = typing.get_type_hints(RunConfig)[section.name]
        assert f"## `{section.name}:`" in page
        docs = field_docs(klass)
        for name in (f.name for f in dataclasses.fields(klass)):
            assert docs.get(name), f"{section.name}.{name} has no docstring"
            assert re.search(rf"^\| `{name}` \| .*{re.escape(docs[name][:30])}", page, re.M), name


def test_resume_rules_table_is_in_the_training_page():
    assert rules_markdown() in (REPO / "docs" / "training.md").read_text(), \
        "docs/training.md's resume table is stale: paste mom_ds.train.resume_rules.rules_markdown()"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading in {file.name}")
    assert not broken, f"{_name(page)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_cited_source_files_exist(page):
    cited = set(CITED.findall(page.read_text()))
    placeholders = {p for p in cited if re.fullmatch(r"[A-Z_]+", Path(p).stem)}  # configs/X.yaml
    missing = sorted(p for p in cited - placeholders if not (REPO / p).is_file())
    assert not missing, f"{_name(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_nothing_points_outside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "/work/" not in text, _name(page)


def test_readme_is_a_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make quickstart" in readme and "make test" in readme
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_types_read_as_the_dataclass_spells_them():
    from typing import Any, Literal, Optional

    from mom_ds.config_reference import type_name

    assert [type_name(t) for t in (int, Optional[str], list[int], dict[str, Any],
                                   Literal["zero", "mask"], Optional[Literal["gru"]])] == \
        ["int", "str | None", "list[int]", "dict[str, Any]", "'zero' | 'mask'", "'gru' | None"]


def test_group_comments_head_their_fields():
    from mom_ds.config_reference import groups
    from mom_ds.model import MoMConfig

    found = groups(MoMConfig)
    assert found["vocab_size"] == "shape of the transformer" and found["n_bottom"] == "layout"
    assert "n_positions" not in found  # only the first field of a group opens it


def test_write_replaces_the_page(tmp_path):
    from mom_ds.config_reference import main

    page = tmp_path / "configuration.md"
    page.write_text("stale")
    main(["--write", str(page)])
    assert page.read_text() == render() and [p.name for p in tmp_path.iterdir()] == [page.name]
