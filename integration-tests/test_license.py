"""Every distribution carries the repository's Apache-2.0 LICENSE: each package folder (what a
wheel is built from) holds an identical copy and names it in license-files."""

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [*sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml")), ROOT / "kernels"]


def test_root_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.parametrize("folder", PACKAGES, ids=lambda p: p.name)
def test_package_ships_the_same_license_and_says_so(folder):
    assert (folder / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    urls = project["urls"]
    assert set(urls) == {"Homepage", "Repository", "Documentation", "Issues"}
    doc = urls["Documentation"].rsplit("/docs/", 1)[1]
    assert (ROOT / "docs" / doc).is_file(), f"{urls['Documentation']} names no page under docs/"
