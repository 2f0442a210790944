"""The conda environment and the package pins must stay in step, and the layout must exist."""
import re
import tomllib

import yaml

from conftest import REPO


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, _, version = dep.partition("==")
        assert version, f"pyproject.toml: {dep!r} is not pinned with =="
        pins[name.lower()] = version
    return pins


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for dep in pip_section:
        if dep.startswith("-e"):
            continue
        name, _, version = dep.partition("==")
        pins[name.lower()] = version
    return pins


def test_environment_yml_mirrors_pyproject_pins():
    assert environment_pins() == pyproject_pins()


def test_environment_yml_python_matches_requires_python():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major_minor = python.split("=")[1]
    assert re.search(rf">={re.escape(major_minor)}\b", requires), (python, requires)


def test_torch_pins_respect_the_machine_cap():
    pins = pyproject_pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_layout_contract_exists():
    for path in ["notebooks", "lib/cxrstudy", "params", "results/README.md", "tests",
                 "benchmarks", "environment.yml", "Makefile", "README.md", ".ci/run"]:
        assert (REPO / path).exists(), path
