"""The distribution: licence, pins, the package list, console scripts, the wheel itself."""

from __future__ import annotations

import email.parser
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# Debian's copy of the licence texts (package base-files).
COMMON_LICENSES = Path("/usr/share/common-licenses")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


# -- licence ---------------------------------------------------------------------------

def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = _pyproject()["project"]
    license_ = project["license"]
    assert isinstance(license_, str), "PEP 639: `license` is an SPDX string, not a table"
    assert canonicalize_license_expression(license_) == license_
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert f"SPDX-License-Identifier: {license_}\n" in text


def test_license_file_carries_the_full_text_it_names() -> None:
    license_ = _pyproject()["project"]["license"]
    assert license_ == "LGPL-2.1-or-later", "a new licence wants its own text in LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert "either version 2.1 of the License, or (at your option) any later version" in text
    debian = COMMON_LICENSES / "LGPL-2.1"
    if not debian.exists():
        pytest.skip(f"{debian} missing (base-files)")
    # The terms, not the whole file: Debian 13's copy is the FSF's later revision (a web
    # address for the postal one, another signature in the how-to-apply example).
    assert _terms(text) == _terms(debian.read_text())


def _terms(license_text: str) -> str:
    start = license_text.index("TERMS AND CONDITIONS FOR COPYING")
    return license_text[start:license_text.index("END OF TERMS AND CONDITIONS", start)]


# -- pins ------------------------------------------------------------------------------

def _requirements(pyproject: dict[str, Any]) -> list[str]:
    reqs = [*pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"]]
    for group in pyproject["project"].get("optional-dependencies", {}).values():
        reqs += group
    return reqs


def _unexplained_pins(text: str) -> list[str]:
    """The exact pins (==, ===, a direct URL) of `text`, a pyproject.toml, that have no
    comment on their own line or on the line before."""
    lines = text.splitlines()
    found = []
    for req in _requirements(tomllib.loads(text)):
        parsed = Requirement(req)
        if not (parsed.url or any(s.operator in ("==", "===") for s in parsed.specifier)):
            continue
        quoted = f'"{req}"'
        for i, line in enumerate(lines):
            if quoted not in line:
                continue
            same_line = "#" in line.split(quoted, 1)[1]
            line_before = i > 0 and lines[i - 1].lstrip().startswith("#")
            if not (same_line or line_before):
                found.append(f"pyproject.toml:{i + 1}: {req}")
    return found


def test_every_exact_pin_says_why() -> None:
    assert _unexplained_pins(PYPROJECT.read_text()) == []


def test_an_exact_pin_without_a_comment_is_found() -> None:
    head = '[build-system]\nrequires = ["setuptools>=77"]\n[project]\n'
    bare = head + 'dependencies = [\n    "pyxs==0.4.1",\n    "cffi>=1.16",\n]\n'
    said = head + 'dependencies = [\n    # why\n    "pyxs==0.4.1",\n]\n'
    inline = head + 'dependencies = ["pyxs===0.4.1"]  # why\n'
    assert _unexplained_pins(bare) == ["pyproject.toml:5: pyxs==0.4.1"]
    assert _unexplained_pins(said) == []
    assert _unexplained_pins(inline) == []


# -- the package list ------------------------------------------------------------------

def _source_dir(package: str, package_dir: dict[str, str]) -> Path:
    for prefix in sorted(package_dir, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix):].lstrip(".")
            return ROOT / package_dir[prefix] / rest.replace(".", "/")
    return ROOT / package.replace(".", "/")


def _shipped_patterns(setuptools: dict[str, Any]) -> list[str]:
    # setuptools ships these beside the package-data globs: modules, stubs, the marker.
    return ["*.py", "*.pyi", "py.typed", *setuptools["package-data"]["*"]]


def _ships(path: Path, patterns: list[str]) -> bool:
    return path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns)


def test_every_directory_with_shipped_files_is_a_listed_package() -> None:
    """A directory setuptools is not told of is left out of the wheel (a module) or
    warned about (data): the list in pyproject.toml and the tree agree."""
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    patterns = _shipped_patterns(setuptools)
    roots = {"blktap3": "blktap3", **setuptools["package-dir"]}
    found = set()
    for package, top in roots.items():
        for directory in [ROOT / top, *(ROOT / top).rglob("*")]:
            if not directory.is_dir() or "__pycache__" in directory.parts:
                continue
            if any(_ships(f, patterns) for f in directory.iterdir()):
                rel = directory.relative_to(ROOT / top)
                found.add(".".join([package, *rel.parts]))
    assert found == listed
    assert all(_source_dir(p, setuptools["package-dir"]).is_dir() for p in listed)


# -- console scripts -------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(_pyproject()["project"]["scripts"]))
def test_console_script_answers_help(script: str) -> None:
    module, func = _pyproject()["project"]["scripts"][script].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = {script!r}; {func}()"
    result = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


# -- the wheel -------------------------------------------------------------------------

# Not in the wheel, on purpose: the sanitizer build is run from a checkout.
NOT_SHIPPED = {"blktap3/datapath/sanitize.sh"}
# What a checkout holds that a build must not see (build output, caches, local venvs).
BUILD_IGNORES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o", "_build",
    ".*_cache", ".hypothesis", "_out",
)


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    # The machine's pip configuration and warning filters are not the project's: the
    # build is judged on its own output. PYTHONDONTWRITEBYTECODE makes distutils say
    # "warning: byte-compiling is disabled".
    for name in ("PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel built from a copy of the checkout (without its build output), and
    pip's verbose output."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=BUILD_IGNORES)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, env=_build_env(), timeout=300, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (built,) = (tmp / "dist").glob("*.whl")
    return built, output


def test_wheel_builds_without_warnings(wheel: tuple[Path, str]) -> None:
    _, output = wheel
    assert [line for line in output.splitlines() if re.search("warn|deprecat", line, re.I)] == []


def test_wheel_is_abi3_with_abi3_extensions(wheel: tuple[Path, str]) -> None:
    built, _ = wheel
    assert re.fullmatch(r"blktap3-[^-]+-cp311-abi3-linux_\w+\.whl", built.name), built.name
    with zipfile.ZipFile(built) as z:
        extensions = sorted(n for n in z.namelist() if n.endswith(".so"))
    assert extensions == ["blktap3/datapath/_datapath.abi3.so",
                          "blktap3/sim/guestdrv/_guestdrv.abi3.so"]


def test_wheel_carries_the_license_in_its_metadata(wheel: tuple[Path, str]) -> None:
    built, _ = wheel
    with zipfile.ZipFile(built) as z:
        (dist_info,) = {n.split("/")[0] for n in z.namelist() if ".dist-info/" in n}
        shipped = z.read(f"{dist_info}/licenses/LICENSE")
        metadata = email.parser.BytesParser().parsebytes(z.read(f"{dist_info}/METADATA"))
    assert shipped == (ROOT / "LICENSE").read_bytes()
    assert metadata["License-Expression"] == _pyproject()["project"]["license"]
    assert metadata.get_all("License-File") == ["LICENSE"]


def test_wheel_holds_every_file_of_the_listed_packages(wheel: tuple[Path, str]) -> None:
    """Among them the spec files and the C sources xensim is compiled from on first use."""
    built, _ = wheel
    setuptools = _pyproject()["tool"]["setuptools"]
    expected = set()
    for package in setuptools["packages"]:
        source = _source_dir(package, setuptools["package-dir"])
        for f in source.iterdir():
            if f.is_file() and f.suffix not in (".so", ".o", ".pyc"):
                expected.add(f"{package.replace('.', '/')}/{f.name}")
    with zipfile.ZipFile(built) as z:
        names = set(z.namelist())
    assert expected - NOT_SHIPPED - names == set()
    assert NOT_SHIPPED & names == set()
    assert {"blktap3/specs/backend_vbd.toml", "blktap3/specs/personalities/linux.toml",
            "blktap3/sim/csrc/xensim/xensim.h"} <= names


def test_wheel_extensions_import_and_xensim_builds(wheel: tuple[Path, str],
                                                    tmp_path: Path) -> None:
    """Unpacked elsewhere, the wheel's own extensions load (they link the Xen libraries)
    and xensim compiles from the sources it ships."""
    built, _ = wheel
    with zipfile.ZipFile(built) as z:
        z.extractall(tmp_path)
    code = (
        "import blktap3.datapath._datapath as d, blktap3.sim.guestdrv._guestdrv as g\n"
        "from blktap3.sim import xensim\n"
        "print(d.__file__); print(g.__file__); print(xensim.library_path())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 3 and all(p.is_relative_to(tmp_path) for p in paths), paths
    assert paths[2].is_file()
