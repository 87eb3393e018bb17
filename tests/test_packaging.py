"""The package list in pyproject.toml covers every subpackage, and the card templates ship with it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["hf_camhd*"]))
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert "hf_camhd.model_cards" in listed


def test_card_templates_resolve():
    from hf_camhd.hub import CARD_TEMPLATES, template_path

    for name in [*CARD_TEMPLATES.values(), "_training.md"]:
        assert template_path(name).read_text().strip()


def test_fused_kernel_source_ships_as_package_data():
    import fnmatch

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    sources = [p.relative_to(ROOT / "hf_camhd" / "optim").as_posix()
               for p in (ROOT / "hf_camhd" / "optim" / "csrc").glob("*")]
    assert sources and all(any(fnmatch.fnmatch(s, pat) for pat in data["hf_camhd.optim"]) for s in sources)
