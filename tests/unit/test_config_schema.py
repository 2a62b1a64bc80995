"""The JSON Schema and the README reference are made from the declarations: the checked-in
copies must be current, and the schema must accept the shipped configs and refuse a typo."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from lbproxy.config import doc

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_schema_is_current() -> None:
    assert (ROOT / "config" / "lbproxy.schema.json").read_text() == doc.schema_text(), (
        "run: python -m lbproxy.config.doc"
    )


def test_readme_reference_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    assert doc.readme_with_reference(text) == text, "run: python -m lbproxy.config.doc"


@pytest.mark.parametrize("name", ["lb.yaml", "full.yaml"])
def test_schema_accepts_the_shipped_configs(name: str) -> None:
    text = (ROOT / "config" / name).read_text()
    assert text.startswith("# yaml-language-server: $schema=./lbproxy.schema.json\n")
    jsonschema.validate(yaml.safe_load(text), doc.schema())


def test_schema_refuses_a_misspelt_key() -> None:
    document = yaml.safe_load((ROOT / "config" / "lb.yaml").read_text())
    document["listeners"][0]["idle_timout"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="idle_timout"):
        jsonschema.validate(document, doc.schema())


def test_schema_takes_friendly_units() -> None:
    document = yaml.safe_load((ROOT / "config" / "lb.yaml").read_text())
    document["listeners"][0]["idle_timeout"] = "30s"
    document["listeners"][0]["max_header_size"] = "64KiB"
    jsonschema.validate(document, doc.schema())
    document["listeners"][0]["idle_timeout"] = "soon"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, doc.schema())
