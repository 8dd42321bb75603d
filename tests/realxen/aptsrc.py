"""apt-get with a source list of its own: Debian's source packages (deb-src) and other
suites than the host's (trixie on a bookworm host), with their lists and downloads kept
in the rig's cache and nothing of the host's apt state touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCES = """Types: {types}
URIs: http://deb.debian.org/debian
Suites: {suite}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class PrivateApt:
    """apt-get over `suite` (`types` "deb" or "deb-src"), its state under `base`."""

    def __init__(self, base: Path, suite: str, types: str = "deb") -> None:
        self.base = base
        for sub in ("lists/partial", "cache/archives/partial", "sources"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "sources" / f"{suite}.sources").write_text(
            SOURCES.format(types=types, suite=suite))
        self.options = [
            "-o", "Dir::Etc::sourcelist=/dev/null",
            "-o", f"Dir::Etc::sourceparts={base / 'sources'}",
            "-o", f"Dir::State::Lists={base / 'lists'}",
            "-o", f"Dir::Cache={base / 'cache'}",
            # Its own lists: no lock on the host's, and no clash with the host's apt.
            "-o", "Debug::NoLocking=1", "-qq",
        ]
        self._updated = False

    def run(self, *args: str, cwd: Path | None = None) -> str:
        if not self._updated and not any((self.base / "lists").glob("*_Packages*")) and \
                not any((self.base / "lists").glob("*_Sources*")):
            self.update()
        done = subprocess.run(["apt-get", *self.options, *args], cwd=cwd, text=True,
                              capture_output=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def update(self) -> None:
        self._updated = True
        subprocess.run(["apt-get", *self.options, "update"], check=True,
                       capture_output=True, timeout=600)

    def cache(self, *args: str) -> str:
        return subprocess.run(["apt-cache", *self.options, *args], check=True, text=True,
                              capture_output=True, timeout=120).stdout
