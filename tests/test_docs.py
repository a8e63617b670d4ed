"""The docs cannot drift from the code: the config reference is the generator's output, the code
layout names every module, and the README's links lead to pages that exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llama_pretrain import config_docs
from llama_pretrain.config import ModelConfig
from llama_pretrain.train.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "llama_pretrain"


def test_config_reference_is_the_generated_page():
    committed = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    assert committed == config_docs.render(), (
        "docs/config-reference.md differs from the config classes: run "
        "`python -m llama_pretrain.config_docs --out docs/config-reference.md`")


def test_config_reference_has_every_key_with_its_default():
    page = config_docs.render()
    for f in dataclasses.fields(ModelConfig):
        assert f"| `model.{f.name}` |" in page
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            row = next(line for line in page.splitlines() if line.startswith(f"| `{section}.{f.name}` |"))
            if f.default is not dataclasses.MISSING:
                assert f"| `{config_docs.toml_value(f.default)}` |" in row
    # the AdamW kernel as train/optim.py picks it
    assert "auto (fused on CUDA and CPU, foreach on any other device)" in page


def test_a_key_without_a_docstring_stops_the_generator():
    @dataclasses.dataclass
    class Section:
        documented: int = 1
        """Has one."""
        bare: int = 2

    with pytest.raises(KeyError, match="Section.bare has no docstring"):
        config_docs.key_rows(Section, "x.")


def test_field_docs_are_read_from_the_source():
    docs = config_docs.field_docs(SECTIONS["optimizer"])
    assert docs["grad_clip"] == "Clip the global gradient norm to this value; 0 disables clipping."


def test_cells_escape_what_would_break_a_table():
    assert config_docs._inline("a | b <x> `c|<d>` ``e``") == "a \\| b &lt;x> `c|<d>` `e`"


def test_the_generator_writes_the_page(tmp_path):
    out = tmp_path / "ref.md"
    assert config_docs.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_docs.render()


def test_code_layout_names_every_module():
    page = (DOCS / "code-layout.md").read_text(encoding="utf-8")
    missing = [p.relative_to(SRC).as_posix() for p in sorted(SRC.rglob("*.py"))
               if f"`{p.relative_to(SRC).as_posix()}`" not in page]
    assert not missing, f"docs/code-layout.md does not name: {', '.join(missing)}"


def test_readme_links_lead_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]*)", readme)
    assert len(links) >= 12
    for link in links:
        assert (ROOT / link).exists(), link
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}  # the site's home: the README itself
    assert pages <= {Path(link).name for link in links}, "a docs page the README does not link"


def test_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -e . && llama-pretrain train\n" in readme
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -n 2 -q\n' in readme
