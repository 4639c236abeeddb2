"""pyproject.toml and environment.yml must name the same packages with the same pins, and those pins must be
what the test environment actually runs."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)\s*$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(specs: list[str], where: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        m = _REQ.match(spec)
        assert m, f"{where}: {spec!r} is not an exact pin (name==version)"
        out[_canon(m.group(1))] = m.group(2)
    return out


def pyproject_pins() -> dict[str, str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(proj["dependencies"])
    for extra in proj["optional-dependencies"].values():
        specs += extra
    return _pins(specs, "pyproject.toml")


def environment_pins() -> tuple[dict[str, str], list]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1 and list(pip[0]) == ["pip"], "environment.yml: expected one pip section"
    return _pins(pip[0]["pip"], "environment.yml"), conda


def test_same_packages_and_pins():
    py, (env, conda) = pyproject_pins(), environment_pins()
    assert set(py) == set(env), (f"only in pyproject.toml: {sorted(set(py) - set(env))}; "
                                 f"only in environment.yml: {sorted(set(env) - set(py))}")
    assert {k: py[k] for k in py} == {k: env[k] for k in py}
    assert "python=3.11" in conda


def test_torch_pin_is_the_local_wheel_spec():
    # Any other torch spec makes pip download a multi-GB CUDA build instead of the wheel on local disk.
    assert pyproject_pins()["torch"] == "2.13.0"


def test_python_floor():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["requires-python"] == ">=3.11"
    assert proj["scripts"]["q3lab"] == "q3lab.cli:main"


@pytest.mark.parametrize("name,pin", sorted(pyproject_pins().items()))
def test_pins_match_installed(name: str, pin: str):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name}=={pin} is pinned but not installed in this environment")
    assert installed.split("+")[0] == pin, f"{name}: pinned {pin}, installed {installed}"
