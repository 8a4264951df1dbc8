"""The packaging configuration builds without setuptools warnings (a first `pip install -e .` used to print
~200 lines of them): `project.license` is an SPDX string, and every folder setuptools would see as an importable
package under a listed one is itself listed (data folders like agents/samples included)."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_applies_without_warnings_and_lists_every_package_folder() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [str(w.message) for w in caught if "setuptools" in type(w.message).__module__], caught

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(config["packages"]), config["package-dir"]
    missing = []
    for package in sorted(listed):
        base = next(p for p in sorted(dirs, key=len, reverse=True) if package == p or package.startswith(p + "."))
        folder = ROOT / dirs[base] / package[len(base):].lstrip(".").replace(".", "/")
        for sub in folder.iterdir():
            name = f"{package}.{sub.name}"
            if (sub.is_dir() and sub.name.isidentifier() and name not in listed and any(sub.iterdir())
                    and sub.name != "__pycache__"):
                missing.append(name)
    assert not missing, f"importable folders setuptools warns about (list them in packages): {missing}"
