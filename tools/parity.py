"""Side by side with blktap: the same tap-ctl steps in the four pairings of
{blktap's, our} tap-ctl x {blktap's, our} tapdisk, and a table of what differs.

    BLKTAP_BUILD=/opt/blktap python -m blktap3.tools.parity [--markdown] [--json FILE]

`BLKTAP_BUILD` (or `--blktap`) is the install prefix of a blktap build (`configure
--prefix=P`, `make install` in control/ and drivers/): `P/sbin/tap-ctl` and the tapdisk it
spawns, `P/libexec/tapdisk`. Nothing here builds blktap; without a build the command says
so and exits 0 (a skip). `--ours PYTHON` picks the Python whose `blktap3` is "ours" (to
measure another checkout, e.g. main's venv).

blktap's binaries have `/run/blktap-control` compiled in, so the run happens in a private
mount namespace (`unshare --mount`, root) with a tmpfs on /run: nothing of the host's
runtime is seen or touched. blktap's tap-ctl spawns `P/libexec/tapdisk`; to make it spawn
ours, our tapdisk is bind-mounted over that path inside the namespace. Our tap-ctl spawns
`$BLKTAP_TAPDISK`, set to blktap's tapdisk for that pairing.

Each step is one tap-ctl command line; the pairing runs the steps in order (state carries
over: minors, tapdisks, open images). Outputs are compared after replacing pids (named
in the order the outputs first show them) and the scratch directory with names. Three
comparisons are printed, each against blktap with blktap: our tap-ctl (driving blktap's
tapdisk), our tapdisk (driven by blktap's tap-ctl), and ours with ours. A difference is
"deliberate" when `DELIBERATE` names the step for that side (the README's table of
differences says why), "pending" when `PENDING` says where its fix belongs; the command
exits 1 when any other difference is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

NS_ENV = "BLKTAP3_PARITY_NS"  # set inside the private mount namespace
RUN_ROOT = Path("/run/blktap-control")  # blktap's compiled-in runtime root
UNKNOWN_PID = "999999"
MiB = 1 << 20


@dataclass(frozen=True)
class Step:
    """One tap-ctl command line. Words may name `{pid}`, `{pid2}`, `{img}`, `{img2}`,
    `{big}`, `{dir}`, `{devpid}` (captured earlier). `capture` stores the first group of
    `pattern` in stdout under that name; `kill` SIGKILLs a captured pid instead of running
    tap-ctl; `usage`: only the form is compared (which stream holds "usage", the last line
    of stderr, the exit status), not our wording."""

    name: str
    argv: tuple[str, ...] = ()
    stdin: bytes = b""
    capture: str | None = None
    pattern: str = r"(\d+)"
    tty: bool = False
    usage: bool = False
    kill: str | None = None


def S(name: str, *argv: str, stdin: bytes = b"", capture: str | None = None,
      pattern: str = r"(\d+)", tty: bool = False, usage: bool = False,
      kill: str | None = None) -> Step:
    """A step, written as a table row."""
    return Step(name, tuple(argv), stdin, capture, pattern, tty, usage, kill)


KEY = b"k" * 32  # a 256-bit key, what `open -E` reads from stdin

STEPS: tuple[Step, ...] = (
    # -- no runtime directory yet ----------------------------------------------------
    S("no command", usage=True),
    S("unknown command", "frobnicate", usage=True),
    S("--debug before the command", "--debug", "list"),
    S("list, nothing running", "list"),
    S("list -h", "list", "-h", usage=True),
    S("list, unknown option", "list", "-x", usage=True),
    S("free, unknown minor", "free", "-m", "7"),
    S("free without -m", "free", usage=True),
    S("close, no such tapdisk", "close", "-p", UNKNOWN_PID, "-m", "0"),
    S("attach, no such tapdisk", "attach", "-p", UNKNOWN_PID, "-m", "0"),
    S("stats, no such tapdisk", "stats", "-p", UNKNOWN_PID, "-m", "0"),
    S("list -p, no such tapdisk", "list", "-p", UNKNOWN_PID),
    S("check", "check"),
    S("major", "major"),
    *(S(f"{cmd} -h", cmd, "-h", usage=True) for cmd in (
        "allocate", "free", "create", "destroy", "spawn", "attach", "detach", "open",
        "close", "pause", "unpause", "stats")),
    # -- minors ------------------------------------------------------------------------
    S("allocate", "allocate"),
    S("allocate again", "allocate"),
    S("allocate, unknown option", "allocate", "-q", usage=True),
    S("list, two minors", "list"),
    S("free", "free", "-m", "1"),
    S("free again", "free", "-m", "1"),
    # -- one tapdisk, step by step ------------------------------------------------------
    S("spawn", "spawn", capture="pid"),
    S("list, idle tapdisk and a minor", "list"),
    S("list -p, idle tapdisk", "list", "-p", "{pid}"),
    S("attach", "attach", "-p", "{pid}", "-m", "0"),
    S("attach again", "attach", "-p", "{pid}", "-m", "0"),
    S("attach, minor not allocated", "attach", "-p", "{pid}", "-m", "5"),
    S("attach without -m", "attach", "-p", "{pid}", usage=True),
    S("list, attached", "list"),
    S("stats, attached not open", "stats", "-p", "{pid}", "-m", "0"),
    S("open, minor not attached", "open", "-p", "{pid}", "-m", "3", "-a", "aio:{img}"),
    S("open", "open", "-p", "{pid}", "-m", "0", "-a", "aio:{img}"),
    S("open again", "open", "-p", "{pid}", "-m", "0", "-a", "aio:{img}"),
    S("open without -a", "open", "-p", "{pid}", "-m", "0", usage=True),
    S("list, open", "list"),
    S("list on a terminal", "list", tty=True),
    S("list -m", "list", "-m", "0"),
    S("list -m, other minor", "list", "-m", "9"),
    S("list -t aio", "list", "-t", "aio"),
    S("list -t vhd", "list", "-t", "vhd"),
    S("list -f", "list", "-f", "{img}"),
    S("list -p", "list", "-p", "{pid}"),
    S("stats", "stats", "-p", "{pid}", "-m", "0"),
    S("stats, unknown minor", "stats", "-p", "{pid}", "-m", "9"),
    S("stats without -m", "stats", "-p", "{pid}", usage=True),
    S("pause", "pause", "-p", "{pid}", "-m", "0"),
    S("pause again", "pause", "-p", "{pid}", "-m", "0"),
    S("list, paused", "list"),
    S("stats, paused", "stats", "-p", "{pid}", "-m", "0"),
    S("unpause", "unpause", "-p", "{pid}", "-m", "0"),
    S("unpause, not paused", "unpause", "-p", "{pid}", "-m", "0"),
    S("pause -t", "pause", "-p", "{pid}", "-m", "0", "-t", "5"),
    S("pause, after pause -t", "pause", "-p", "{pid}", "-m", "0"),
    S("unpause -a, other image", "unpause", "-p", "{pid}", "-m", "0", "-a", "aio:{img2}"),
    S("list, swapped image", "list"),
    S("pause, to swap back", "pause", "-p", "{pid}", "-m", "0"),
    S("unpause -a, other size", "unpause", "-p", "{pid}", "-m", "0", "-a", "aio:{big}"),
    S("list, refused swap", "list"),
    S("unpause -a, missing file", "unpause", "-p", "{pid}", "-m", "0", "-a",
      "aio:{dir}/missing"),
    S("unpause -a, first image", "unpause", "-p", "{pid}", "-m", "0", "-a", "aio:{img}"),
    S("list, after the swaps", "list"),
    S("close, unknown minor", "close", "-p", "{pid}", "-m", "9"),
    S("pause, unknown minor", "pause", "-p", "{pid}", "-m", "9"),
    S("unpause, unknown minor", "unpause", "-p", "{pid}", "-m", "9"),
    S("detach, open minor", "detach", "-p", "{pid}", "-m", "0"),
    S("detach, unknown minor", "detach", "-p", "{pid}", "-m", "9"),
    S("close", "close", "-p", "{pid}", "-m", "0"),
    S("close again", "close", "-p", "{pid}", "-m", "0"),
    S("list, closed", "list"),
    S("stats, closed", "stats", "-p", "{pid}", "-m", "0"),
    S("open, missing file", "open", "-p", "{pid}", "-m", "0", "-a", "aio:{dir}/missing"),
    S("open, unknown type", "open", "-p", "{pid}", "-m", "0", "-a", "qcow9:{img}"),
    S("open, no type", "open", "-p", "{pid}", "-m", "0", "-a", "{img}"),
    S("open, empty path", "open", "-p", "{pid}", "-m", "0", "-a", "aio:"),
    S("open -R", "open", "-p", "{pid}", "-m", "0", "-R", "-a", "aio:{img}"),
    S("list, read-only", "list"),
    S("close, read-only", "close", "-p", "{pid}", "-m", "0"),
    S("open -D", "open", "-p", "{pid}", "-m", "0", "-D", "-a", "aio:{img}"),
    S("close -f", "close", "-p", "{pid}", "-m", "0", "-f"),
    S("open -t", "open", "-p", "{pid}", "-m", "0", "-t", "30", "-a", "aio:{img}"),
    S("close -t", "close", "-p", "{pid}", "-m", "0", "-t", "10"),
    # Each open variant is closed again, so that one refused or accepted does not
    # decide what the next one meets.
    *(step for name, words, stdin in (
        ("open -e (parent minor)", ("-e", "0"), b""),
        ("open -C (changed-block log)", ("-C", "{dir}/cbt.log"), b""),
        ("open -E (key on stdin)", ("-E",), KEY),
        ("open -E, short key", ("-E",), b"short"),
        ("open -2 (secondary)", ("-2", "aio:{img2}"), b""),
        ("open -s (standby)", ("-s",), b""),
        ("open -r (local cache)", ("-r",), b""),
    ) for step in (
        S(name, "open", "-p", "{pid}", "-m", "0", *words, "-a", "aio:{img}", stdin=stdin),
        S(f"close after {name}", "close", "-p", "{pid}", "-m", "0"),
    )),
    S("list, after the open variants", "list"),
    S("allocate minor 1", "allocate"),
    S("attach minor 1", "attach", "-p", "{pid}", "-m", "1"),
    S("pause, attached not open", "pause", "-p", "{pid}", "-m", "1"),
    S("list, two VBDs", "list"),
    S("unpause, attached not open", "unpause", "-p", "{pid}", "-m", "1"),
    S("close, attached not open", "close", "-p", "{pid}", "-m", "1"),
    S("detach minor 1", "detach", "-p", "{pid}", "-m", "1"),
    S("free minor 1", "free", "-m", "1"),
    S("free, minor held by a tapdisk", "free", "-m", "0"),
    S("detach", "detach", "-p", "{pid}", "-m", "0"),
    S("list, last VBD detached", "list"),
    S("free after detach", "free", "-m", "0"),
    # -- create / destroy ----------------------------------------------------------------
    S("create", "create", "-a", "aio:{img}"),
    S("list, created", "list", capture="devpid", pattern=r"pid=(\d+)"),
    S("create, missing file", "create", "-a", "aio:{dir}/missing"),
    S("list, after a failed create", "list"),
    S("create without -a", "create", usage=True),
    S("create -d", "create", "-d", f"{RUN_ROOT}/tapdisk/tapdisk-7", "-a", "aio:{img2}",
      capture="minor2", pattern=r"tapdisk-(\d+)$"),
    S("list, create -d", "list"),
    S("destroy, unknown minor", "destroy", "-p", "{devpid}", "-m", "9"),
    S("destroy without -m", "destroy", "-p", "{devpid}", usage=True),
    S("destroy", "destroy", "-p", "{devpid}", "-m", "0"),
    S("list, one destroyed", "list", capture="pid2", pattern=r"pid=(\d+)"),
    S("stats --debug", "stats", "-p", "{pid2}", "-m", "{minor2}", "--debug"),
    S("destroy -t", "destroy", "-p", "{pid2}", "-m", "{minor2}", "-t", "10"),
    S("list, all destroyed", "list"),
    # -- several tapdisks ------------------------------------------------------------------
    S("create, first of two", "create", "-a", "aio:{img}"),
    S("create, second of two", "create", "-a", "aio:{img2}"),
    S("spawn on a terminal", "spawn", tty=True, capture="idle"),
    S("list, two tapdisks and an idle one", "list", capture="victim",
      pattern=r"pid=(\d+) minor=1 "),
    S("kill a tapdisk", kill="victim"),
    S("list, a dead tapdisk", "list"),
    S("free, dead tapdisk's minor", "free", "-m", "1"),
    S("list, at the end", "list"),
)

# Steps where a side differs from blktap on purpose, with the reason (README's table).
# "ctl": our tap-ctl (against blktap's tapdisk); "tapdisk": ours (under blktap's tap-ctl).
DELIBERATE: dict[str, dict[str, str]] = {
    "ctl": {
        "--debug before the command": "--debug is taken anywhere on the line "
                                      "(blktap: only after the command, else usage)",
        "check": "blktap 3.x's `check` (v4.0.8 has none): 'ok', exit 0",
        "major": "blktap 3.x's `major` (v4.0.8 has none): no tapdev major, ENODEV",
        "allocate, unknown option": "`allocate -d` is ours; other options as blktap",
        "pause -t": "blktap's pause treats -t as a usage error (a missing break); "
                    "ours waits that long",
        "open -E, short key": "same exit status and stream, our wording",
    },
    "tapdisk": {
        **{name: "driver reqs.max: blktap's aio request pool (352); ours the ring's "
                 "slots, 0 until a ring connects" for name in ("stats", "stats --debug")},
        "list, refused swap": "after a refused swap LIST names the image still open "
                              "(blktap: the refused one)",
        **{name: "refused (EOPNOTSUPP) until the feature exists; blktap runs it or "
                 "fails deeper" for name in (
            "open -e (parent minor)", "open -C (changed-block log)",
            "open -E (key on stdin)", "open -2 (secondary)", "open -s (standby)",
            "open -r (local cache)")},
    },
}

# Differences known and not yet fixed, with where the fix belongs: reported, not failed.
PENDING: dict[str, str] = {}


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@dataclass
class Pairing:
    """Which tap-ctl drives which tapdisk, and what each step gave."""

    ctl: str  # "blktap" | "ours"
    tapdisk: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class Runner:
    """Runs the steps of one pairing inside the namespace."""

    def __init__(self, blktap: Path, ours_python: str, scratch: Path) -> None:
        self.blktap = blktap
        self.ours_python = ours_python
        self.scratch = scratch
        self.blktap_tapdisk = blktap / "libexec" / "tapdisk"

    def ctl_command(self, ctl: str) -> list[str]:
        if ctl == "blktap":
            return [str(self.blktap / "sbin" / "tap-ctl")]
        return [self.ours_python, "-m", "blktap3.ctl.cli"]

    @contextlib.contextmanager
    def tapdisk_of(self, tapdisk: str) -> Iterator[dict[str, str]]:
        """The environment that makes either tap-ctl spawn `tapdisk`."""
        env = {k: v for k, v in os.environ.items() if k != "BLKTAP_TAPDISK"}
        env["BLKTAP_CONTROL_DIR"] = str(RUN_ROOT)
        if tapdisk == "blktap":
            env["BLKTAP_TAPDISK"] = str(self.blktap_tapdisk)
            yield env
            return
        env["BLKTAP_TAPDISK"] = f"{self.ours_python} -m blktap3.tapdisk"
        wrapper = self.scratch / "our-tapdisk"
        wrapper.write_text(f"#!/bin/sh\nexec {self.ours_python} -m blktap3.tapdisk \"$@\"\n")
        wrapper.chmod(0o755)
        subprocess.run(["mount", "--bind", str(wrapper), str(self.blktap_tapdisk)], check=True)
        try:
            yield env
        finally:
            subprocess.run(["umount", str(self.blktap_tapdisk)], check=False)

    def run(self, ctl: str, tapdisk: str) -> Pairing:
        pairing = Pairing(ctl, tapdisk)
        values = {"img": str(self.scratch / "a.img"), "img2": str(self.scratch / "b.img"),
                  "big": str(self.scratch / "big.img"), "dir": str(self.scratch)}
        for name, size in (("a.img", 16 * MiB), ("b.img", 16 * MiB), ("big.img", 32 * MiB)):
            with open(self.scratch / name, "wb") as image:
                image.truncate(size)
        seen: list[int] = []  # tapdisk pids in the order they appeared
        with self.tapdisk_of(tapdisk) as env:
            try:
                for step in STEPS:
                    pairing.outcomes[step.name] = self.step(ctl, step, values, env)
                    seen += [pid for pid in socket_pids() if pid not in seen]
            finally:
                clean_runtime()
        names = pid_names(pairing, seen)
        for outcome in pairing.outcomes.values():
            for attr in ("out", "err"):
                setattr(outcome, attr, normalize(getattr(outcome, attr), names, self.scratch))
        return pairing

    def step(self, ctl: str, step: Step, values: dict[str, str],
             env: dict[str, str]) -> Outcome:
        if step.kill is not None:
            pid = values.get(step.kill)
            if pid is None:
                return Outcome(-1, "", f"nothing captured as {step.kill}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
            wait_gone(int(pid))
            return Outcome(0, "", "")
        argv = [word.format(**{k: values.get(k, "0") for k in
                               ("pid", "pid2", "devpid", "minor2", "img", "img2", "big",
                                "dir")})
                for word in step.argv]
        # A neutral working directory: `python -m` would import a blktap3 found there.
        outcome = run_command(self.ctl_command(ctl) + argv, step.stdin, env, step.tty,
                              cwd=self.scratch)
        if step.capture:
            match = re.search(step.pattern, outcome.out)
            if match:
                values[step.capture] = match.group(1)
        return outcome


def run_command(argv: list[str], stdin: bytes, env: dict[str, str], tty: bool,
                cwd: Path, timeout: float = 120) -> Outcome:
    if not tty:
        done = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=cwd,
                              timeout=timeout, check=False)
        return Outcome(done.returncode, done.stdout.decode(errors="replace"),
                       done.stderr.decode(errors="replace"))
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=follower,
                                stderr=subprocess.PIPE, env=env, cwd=cwd)
        os.close(follower)
        follower = -1
        _, err = proc.communicate(stdin, timeout=timeout)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        return Outcome(proc.returncode, out, err.decode(errors="replace"))
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def pid_names(pairing: Pairing, tapdisks: list[int]) -> dict[str, str]:
    """Names for the tapdisks' pids in the order the outputs first show them (a tapdisk
    that exits as its command returns may or may not have been seen running, so the
    order they ran in would not name them alike in two runs)."""
    names: dict[str, str] = {}
    known = {str(pid) for pid in tapdisks}
    for step in STEPS:
        outcome = pairing.outcomes[step.name]
        for number in re.findall(r"\d+", outcome.out + outcome.err):
            if number in known and number not in names:
                names[number] = f"<tapdisk{len(names) + 1}>"
    return names


def normalize(text: str, names: dict[str, str], scratch: Path) -> str:
    text = text.replace(str(scratch), "<dir>")
    for value, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<!\d){re.escape(value)}(?!\d)", name, text)
    return text


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def socket_pids() -> list[int]:
    """The pids of the `ctl<pid>` sockets in the runtime root, ascending."""
    if not RUN_ROOT.is_dir():
        return []
    found = (re.fullmatch(r"ctl(\d+)", entry.name) for entry in RUN_ROOT.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def clean_runtime() -> None:
    """Kill every tapdisk of the namespace's runtime root and empty it."""
    pids = socket_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_gone(pid)
        shutil.rmtree(f"/dev/shm/td3-{pid}", ignore_errors=True)
    shutil.rmtree(RUN_ROOT, ignore_errors=True)


# -- comparing --------------------------------------------------------------------------


def usage_form(outcome: Outcome) -> tuple[int, str, str]:
    """What a usage step is compared on: exit status, the stream holding the usage,
    and for a failure the last line of stderr (`strerror`)."""
    stream = ("out" if "usage" in outcome.out.lower()
              else "err" if "usage" in outcome.err.lower() else "none")
    last = outcome.err.rstrip("\n").rpartition("\n")[2] if outcome.code else ""
    return outcome.code, stream, last


def same(step: Step, a: Outcome, b: Outcome) -> bool:
    if step.usage:
        return usage_form(a) == usage_form(b)
    return (a.code, a.out, a.err) == (b.code, b.out, b.err)


@dataclass
class Row:
    step: str
    blktap: Outcome
    ours: Outcome
    verdict: str  # "same" | "deliberate: why" | "DIFFERENT"


def compare(reference: Pairing, other: Pairing, side: str | None) -> list[Row]:
    rows = []
    for step in STEPS:
        ref, got = reference.outcomes[step.name], other.outcomes[step.name]
        if same(step, ref, got):
            verdict = "same" + (" (usage wording ours)" if step.usage and ref != got else "")
        else:
            sides = [side] if side else ["ctl", "tapdisk"]
            why = [DELIBERATE[s][step.name] for s in sides if step.name in DELIBERATE[s]]
            if why:
                verdict = f"deliberate: {'; '.join(why)}"
            elif step.name in PENDING and side != "ctl":
                verdict = f"pending: {PENDING[step.name]}"
            else:
                verdict = "DIFFERENT"
        rows.append(Row(step.name, ref, got, verdict))
    return rows


def show(outcome: Outcome, width: int) -> str:
    parts = [f"exit {outcome.code}"]
    if outcome.out:
        parts.append("out " + json.dumps(outcome.out))
    if outcome.err:
        parts.append("err " + json.dumps(outcome.err))
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def render(title: str, rows: list[Row], markdown: bool, width: int = 70) -> str:
    counts = {"same": 0, "deliberate": 0, "pending": 0, "DIFFERENT": 0}
    for row in rows:
        counts[row.verdict.split(":")[0].split(" ")[0]] += 1
    lines = [f"## {title}", "",
             f"{len(rows)} steps: {counts['same']} same, {counts['deliberate']} deliberately "
             f"different, {counts['pending']} pending, {counts['DIFFERENT']} different", ""]
    if markdown:
        lines += ["| step | blktap | ours | same/different (why) |", "|---|---|---|---|"]
        for row in rows:
            cells = [row.step, show(row.blktap, width), show(row.ours, width), row.verdict]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    else:
        for row in rows:
            mark = "  " if row.verdict.startswith("same") else "* "
            lines.append(f"{mark}{row.step}: {row.verdict}")
            if not row.verdict.startswith("same"):
                lines.append(f"      blktap: {show(row.blktap, 400)}")
                lines.append(f"      ours:   {show(row.ours, 400)}")
    return "\n".join(lines) + "\n"


COMPARISONS = (
    ("our tap-ctl -> blktap's tapdisk, against blktap's tap-ctl", ("ours", "blktap"), "ctl"),
    ("blktap's tap-ctl -> our tapdisk, against blktap's tapdisk", ("blktap", "ours"),
     "tapdisk"),
    ("our tap-ctl -> our tapdisk, against blktap's pair", ("ours", "ours"), None),
)


def run_all(blktap: Path, ours_python: str) -> dict[str, list[Row]]:
    scratch = Path(tempfile.mkdtemp(prefix="parity-", dir="/var/tmp"))
    try:
        runner = Runner(blktap, ours_python, scratch)
        pairings = {(c, t): runner.run(c, t) for c in ("blktap", "ours")
                    for t in ("blktap", "ours")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = pairings[("blktap", "blktap")]
    return {title: compare(reference, pairings[pair], side)
            for title, pair, side in COMPARISONS}


def _inside(args: argparse.Namespace) -> int:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
    results = run_all(Path(args.blktap), args.ours)
    for title, rows in results.items():
        sys.stdout.write(render(title, rows, args.markdown) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {title: [asdict(r) for r in rows] for title, rows in results.items()}, indent=1))
    unexplained = sum(r.verdict == "DIFFERENT" for rows in results.values() for r in rows)
    return 1 if unexplained else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    parser.add_argument("--blktap", default=os.environ.get("BLKTAP_BUILD"),
                        help="blktap's install prefix (default $BLKTAP_BUILD)")
    parser.add_argument("--ours", default=sys.executable,
                        help="the Python whose blktap3 is ours (default this one)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if not args.blktap:
        print("parity: no blktap build given (BLKTAP_BUILD or --blktap): skipped")
        return 0
    prefix = Path(args.blktap)
    for needed in (prefix / "sbin" / "tap-ctl", prefix / "libexec" / "tapdisk"):
        if not os.access(needed, os.X_OK):
            print(f"parity: {needed} is not an executable: not a blktap install prefix",
                  file=sys.stderr)
            return 2
    if os.environ.get(NS_ENV) == "1":
        return _inside(args)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("parity: needs root and unshare(1) for a private /run", file=sys.stderr)
        return 2
    words = ["--blktap", str(prefix.absolute()), "--ours", args.ours]
    words += ["--markdown"] if args.markdown else []
    words += ["--json", str(Path(args.json).absolute())] if args.json else []
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
         "blktap3.tools.parity", *words], env={**os.environ, NS_ENV: "1"}, check=False)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
