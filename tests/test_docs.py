"""The docs site builds strictly (no broken link or anchor, no page left out of the nav), with a reference
page generated for every kind: the built-in ones and a kind installed through the entry point group, as
another package would ship it (the README's example kind)."""

from __future__ import annotations

import re
import sys

import pytest

from modelprobe import docs
from modelprobe.kinds import KINDS, builtin_kinds

ROOT = docs.ROOT


@pytest.fixture
def example_kind_installed(tmp_path, monkeypatch):
    """The README's example kind installed: a module and a dist-info declaring the entry point."""
    source = docs._EXAMPLE.search((ROOT / "README.md").read_text()).group(1)
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "priming_kind.py").write_text(source)
    info = site / "priming_kind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: priming-kind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelprobe.kinds]\npriming = priming_kind:Priming\n")
    monkeypatch.syspath_prepend(str(site))
    KINDS.refresh()
    yield
    sys.modules.pop("priming_kind", None)
    KINDS.refresh()


def test_the_site_builds_strictly_with_a_page_per_kind(example_kind_installed, tmp_path):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    assert "priming" in KINDS
    out = tmp_path / "built"
    build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(out)))  # Abort on any warning
    index = (out / "kinds" / "index.html").read_text()
    for name in KINDS:
        page = out / "kinds" / name / "index.html"
        assert page.is_file(), name
        assert f'href="{name}/"' in index, name
    priming = (out / "kinds" / "priming" / "index.html").read_text()
    assert "entry point group" in priming and "priming_kind:Priming" in priming
    assert "PrimingSpec" in priming and "logprob_rise" in priming
    assert "class Priming" in (out / "writing-kinds" / "index.html").read_text()


def test_every_builtin_page_states_its_method_controls_verdicts_example_and_fields():
    pages = docs.kind_pages(ROOT / "docs" / "kinds" / "notes")
    assert set(builtin_kinds()) <= set(pages)
    for name in builtin_kinds():
        page = pages[name]
        for heading in ("## Method", "## Controls", "## Verdicts", "## Example probe file", "## Fields"):
            assert heading in page, (name, heading)
        assert "names no control" not in page, name  # each built-in kind's docstring states its controls
        assert "```yaml\n# yaml-language-server" in page and f"kind: {name}" in page, name
        assert re.search(r"^\| `claims` \| map of string to \[\w+\]\(#field-\w+\) ", page, re.M), name


def test_the_readme_example_kind_has_a_page_without_being_installed():
    page = docs.kind_pages()["priming"]
    assert "README's example kind" in page and "| `prompts` | string |" in page


def test_field_tables_give_type_range_and_default():
    page = docs.kind_pages()["logit_lens"]
    assert "| `top_k` | int | ≥ 1, ≤ 1000000 | `1` |" in page
    assert '| `target` | `"first_token"` or `"single_token"` |  | `"first_token"` |' in page
    assert "| `prompts` | string |  | required |" in page


def test_the_skeleton_comes_from_the_kind_class_first(monkeypatch):
    cls = KINDS["logit_lens"]
    assert docs.kind_skeleton("logit_lens").count("kind: logit_lens") == 1
    monkeypatch.setattr(cls, "skeleton", "kind: logit_lens\n# from the class\n", raising=False)
    assert docs.kind_skeleton("logit_lens") == "kind: logit_lens\n# from the class\n"
