"""The committed man pages are the ones the argument parsers make, and man reads them."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from blktap3.tools import manpages

ROOT = Path(__file__).parents[3]
MAN_DIR = ROOT / "contrib" / "man"


def test_every_console_script_has_a_page() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # The installed metadata is what the tool reads: stale when pyproject changed.
    assert manpages.scripts() == declared, "reinstall: ./run test --co"
    missing = set(declared) - set(manpages.PAGES)
    assert not missing, f"add {missing} to blktap3.tools.manpages.PAGES (and build_parser)"


def test_the_committed_pages_match_the_parsers() -> None:
    for file, text in manpages.pages().items():
        path = MAN_DIR / file
        assert path.exists() and path.read_text() == text, (
            f"{path} is stale: python -m blktap3.tools.manpages")
    committed = {p.name for p in MAN_DIR.iterdir()}
    assert committed == set(manpages.pages()), "a page without its command"


def test_every_tap_ctl_option_is_described() -> None:
    letters = list(manpages.tap_ctl_letters())
    assert ("create", "t") in letters and ("list", "json") in letters
    for command, letter in letters:
        assert manpages.tap_ctl_option_text(command, letter)


def test_every_parser_option_and_its_default_is_on_the_page() -> None:
    from blktap3.tapdisk import main as tapdisk

    text = manpages.pages()["tapdisk.8"]
    for action in tapdisk.build_parser()._actions:
        for option in action.option_strings:
            assert option.replace("-", "\\-") in text
    assert "(default 30)" in text  # --drain-timeout's


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
@pytest.mark.parametrize("file", sorted(manpages.pages()))
def test_man_reads_each_page_without_a_warning(file: str) -> None:
    done = subprocess.run(["man", "--warnings", "-l", str(MAN_DIR / file)],
                          capture_output=True, text=True, env={"MANWIDTH": "80",
                                                                "PATH": "/usr/bin:/bin"},
                          check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    name = file.rpartition(".")[0]
    assert done.stdout.startswith(name.upper()) and "EXIT STATUS" in done.stdout
