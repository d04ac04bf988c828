"""The generated docs are current: docs/config-reference.md is what the config Structs say today."""

from pathlib import Path

from zero_all._config._doc import config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_reference_is_current():
    page = (DOCS / "config-reference.md").read_text()
    assert page == config_reference(), (
        "docs/config-reference.md is stale: run `python -m zero_all._config._doc > docs/config-reference.md`")
