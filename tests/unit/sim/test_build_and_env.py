"""Building libxensim, the environment of a process on the machine, host redirects."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from blktap3.sim import xensim
from blktap3.sim.xenlib import EventChannel, GrantShare
from blktap3.sim.xenstored import XenstoredError, xen_bin_dir


def defined_symbols(path: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines()}


def test_library_is_built_and_exports_the_xen_api() -> None:
    symbols = defined_symbols(xensim.library_path())
    # xc_domain_getinfo (Xen 4.17's xenstored) is built only under Xen 4.17's headers.
    for name in ("xc_domain_getinfo_single", "xc_domain_getinfolist", "xc_map_foreign_range",
                 "xc_evtchn_alloc_unbound", "xenevtchn_pending", "xengnttab_grant_copy",
                 "xengnttab_map_domain_grant_refs", "xengntshr_share_page_notify"):
        assert name in symbols
    assert "xs_dom" not in symbols, "internal helpers stay hidden"


@pytest.mark.parametrize("daemon", ["xenstored", "oxenstored"])
def test_every_xen_call_the_daemons_need_is_provided(daemon: str) -> None:
    provided = defined_symbols(xensim.library_path())
    out = subprocess.run(["nm", "-D", "--undefined-only", str(xen_bin_dir() / daemon)],
                         capture_output=True, text=True, check=True).stdout
    wanted = {line.split()[-1].split("@")[0] for line in out.splitlines()}
    # oxenstored links many xc_* calls for its unused domain-building stubs:
    # check the event-channel and grant ones, and the xc_* machine.md lists.
    needed = {s for s in wanted if s.startswith(("xenevtchn_", "xengnttab_"))}
    needed |= {"xc_interface_open", "xc_interface_close"}
    needed |= {s for s in wanted if s in ("xc_domain_getinfo", "xc_domain_getinfo_single",
                                          "xc_domain_getinfolist",
                                          "xc_map_foreign_range", "xc_evtchn_alloc_unbound")}
    assert needed <= provided, needed - provided


def test_the_xen_tools_are_found_newest_first(tmp_path: Path) -> None:
    for version in ("4.9", "4.17", "4.20"):
        (tmp_path / f"xen-{version}/bin").mkdir(parents=True)
        (tmp_path / f"xen-{version}/bin/xenstored").touch()
    (tmp_path / "xen-4.21/bin").mkdir(parents=True)  # no xenstored: a leftover
    assert xen_bin_dir(tmp_path) == tmp_path / "xen-4.20/bin"
    assert (xen_bin_dir() / "xenstored").is_file()


def test_no_xen_tools_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(XenstoredError, match="install xen-utils-<version>"):
        xen_bin_dir(tmp_path)


def test_sanitized_variant_builds() -> None:
    path = xensim.library_path(sanitize=True)
    assert path.is_file() and path != xensim.library_path()
    env = xensim.process_env("/tmp/x", 3, sanitize=True)
    assert "libasan" in env["LD_PRELOAD"].split()[0]


def test_sanitized_library_serves_a_real_program_cleanly(machine: xensim.Machine,
                                                        probe_binary: Path) -> None:
    machine.create_domain(1, 16)
    machine.create_domain(2, 16)
    env = {**os.environ, **xensim.process_env(machine.run_dir, 2, sanitize=True),
           "ASAN_OPTIONS": "exitcode=99", "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}
    with GrantShare(machine.run_dir, 1) as gs, EventChannel(machine.run_dir, 1) as evt:
        share = gs.share_pages(2, 1)
        port = evt.bind_unbound_port(2)
        for args in (["map", 1, share.refs[0], "rw"], ["copy-to", 1, share.refs[0]],
                     ["copy-from", 1, 9999], ["bind", 1, 4000], ["getinfo", 1]):
            result = subprocess.run([str(probe_binary), *map(str, args)], env=env,
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
        backend = subprocess.Popen(
            [str(probe_binary), "pingpong", "1", str(port), "100", str(share.refs[0])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert evt.wait(10.0) == port
            for _ in range(100):
                evt.notify(port)
                assert evt.wait(5.0) == port
            out, err = backend.communicate(timeout=30)
        finally:
            backend.kill()
            backend.wait()
        assert backend.returncode == 0, err
        assert out.strip() == "ok 100"


def test_process_env_names_the_machine_and_domain(tmp_path: Path) -> None:
    env = xensim.process_env(tmp_path / "run", 7)
    assert env == {"LD_PRELOAD": str(xensim.library_path()),
                   "XENSIM_DIR": str((tmp_path / "run").resolve()), "XENSIM_DOMID": "7"}


def test_proc_xen_files_and_rlimit_are_redirected(machine: xensim.Machine) -> None:
    code = textwrap.dedent("""
        import mmap, os, resource
        print(open("/proc/xen/xsd_port").read())
        fd = os.open("/proc/xen/xsd_kva", os.O_RDWR)
        print(len(mmap.mmap(fd, 4096)))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 30, 1 << 30))
        print("clamped")
        # blktap's tapdisk asks for unlimited locked memory (tapdisk_set_resource_limits).
        inf = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
        print("clamped")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **xensim.process_env(machine.run_dir, 0)},
                         check=True, timeout=30).stdout.split()
    assert out == [str(machine.domain(0).xenstore_port), "4096", "clamped", "clamped"]


def test_machine_refuses_a_taken_domid_and_tears_down(machine: xensim.Machine) -> None:
    info = machine.create_domain(3, 32)
    assert Path(info.mem_path).stat().st_size == 32 * xensim.PAGE_SIZE
    with pytest.raises(OSError) as exc:
        machine.create_domain(3, 32)
    assert exc.value.errno == errno.EEXIST
    assert [d.domid for d in machine.domains()] == [0, 3]
    machine.teardown()
    assert not Path(info.mem_path).exists()
    assert not machine.run_dir.exists()


def _load_as_nobody(library: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3",
         "-c", f"import ctypes; ctypes.CDLL({str(library)!r}); print('loaded')"],
        capture_output=True, text=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build as root and load as nobody")
def test_a_library_built_by_root_loads_for_another_user(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: the build was renamed from mkstemp's 0600 file, so only root could
    preload it. Built here as the package would, in a directory every user can reach."""
    base = Path(tempfile.mkdtemp(prefix="xensim-build-", dir="/tmp"))
    try:
        base.chmod(0o755)
        monkeypatch.setattr(xensim, "BUILD_DIR", base / "_build")
        monkeypatch.setattr(xensim, "_PACKAGE_DIR", base)
        library = xensim.library_path()
        assert library.parent == base / "_build"
        assert library.stat().st_mode & 0o777 == 0o755
        assert library.parent.stat().st_mode & 0o777 == 0o755
        done = _load_as_nobody(library)
        assert done.stdout.strip() == "loaded", done.stderr
        # The test can fail: a 0600 library is refused to nobody.
        library.chmod(0o600)
        assert "loaded" not in _load_as_nobody(library).stdout
    finally:
        shutil.rmtree(base)


def test_a_user_who_cannot_write_the_package_builds_into_their_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "package"
    package.mkdir()
    monkeypatch.setattr(xensim, "BUILD_DIR", package / "_build")
    monkeypatch.setattr(xensim, "_PACKAGE_DIR", package)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(xensim.os, "access", lambda path, mode: Path(path) != package)
    assert xensim.build_dir() == tmp_path / "cache" / "blktap3" / "xensim"
