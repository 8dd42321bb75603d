"""A blktap3 toolstack for the rig's dom0 (Xen 4.17's libxl knows no vbd3): runs in dom0
with Debian's python3.11 against the real xenstored.

    python3.11 /opt/blktap3/rig/vbd3.py attach DOMID DEVID IMAGE
    python3.11 /opt/blktap3/rig/vbd3.py detach DOMID DEVID

attach: the back-end directory `backend/vbd3/<domid>/<devid>` (owner dom0, guest read)
and the front-end `device/vbd/<devid>` (owner the guest, dom0 read) in ONE transaction
(blkfront probes as soon as its directory appears, and a probe that misses `backend` is
not retried); then the hotplug step as Xen's block script would run it: `tap-ctl
create`, `tap-ctl list` for the tapdisk's pid, and in one transaction
`physical-device-path=<control dir>/nbd<pid>.<minor>` + `hotplug-status=connected`.
It returns once the back-end is Connected (4), or exits 1 saying what it saw.

detach: as libxl does, `online=0` and `state=5` on the back-end, wait for it to reach
Closed (6), `tap-ctl destroy`, remove both directories.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from blktap3.tapback.tapdisks import device_path, parse_device_path
from blktap3.xenbus import Transaction, VbdPaths, XenStore, owned_by

CONTROL_DIR = "/run/blktap-control"
TAP_CTL = ["tap-ctl"]
TIMEOUT = 60.0


def say(text: str) -> None:
    print(f"vbd3: {text}", flush=True)


def wait_state(xs: XenStore, path: str, want: str, timeout: float = TIMEOUT) -> str | None:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = xs.read_optional(path)
        if value == want:
            return value
        time.sleep(0.1)
    return value


def tap_ctl(*args: str) -> str:
    done = subprocess.run([*TAP_CTL, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"vbd3: tap-ctl {' '.join(args)}: exit {done.returncode}: "
                         f"{done.stderr.strip()}")
    return done.stdout.strip()


def attach(xs: XenStore, paths: VbdPaths, image: str) -> int:
    backend_perms = owned_by(0, readers=[paths.domid])
    frontend_perms = owned_by(paths.domid, readers=[0])
    backend = {"frontend": paths.frontend, "frontend-id": str(paths.domid), "online": "1",
               "params": f"aio:{image}", "mode": "w", "type": "vbd3",
               "device-type": "disk", "removable": "0", "bootable": "1", "dev": "xvda",
               "state": "1"}
    frontend = {"backend": paths.backend, "backend-id": "0",
                "virtual-device": str(paths.devid), "device-type": "disk", "state": "1"}

    def write(tx: Transaction) -> None:
        for path, keys, perms in ((paths.backend, backend, backend_perms),
                                  (paths.frontend, frontend, frontend_perms)):
            tx.write(path, "", perms)
            for key, value in keys.items():
                tx.write(f"{path}/{key}", value, perms)

    xs.transact(write)
    say(f"wrote {paths.backend} and {paths.frontend}")
    # The hotplug step, as a block script would: tap-ctl create, then tell tapback.
    dev = tap_ctl("create", "-a", f"aio:{image}")
    rows = json.loads(tap_ctl("list", "--json"))
    row = next(r for r in rows if str(r["path"]).endswith(image))
    location = device_path(Path(CONTROL_DIR), row["pid"], row["minor"])
    say(f"tap-ctl create -> {dev}; pid {row['pid']} minor {row['minor']}")

    def hotplug(tx: Transaction) -> None:
        tx.write(paths.backend_key("physical-device-path"), location, backend_perms)
        tx.write(paths.backend_key("hotplug-status"), "connected", backend_perms)

    xs.transact(hotplug)
    state = wait_state(xs, paths.backend_key("state"), "4")
    keys = {k: xs.read_optional(paths.backend_key(k)) for k in xs.ls(paths.backend)}
    say("back-end keys: " + " ".join(f"{k}={v}" for k, v in sorted(keys.items())))
    if state != "4":
        say(f"back-end state {state}, front-end state "
            f"{xs.read_optional(paths.frontend_key('state'))}: not connected")
        return 1
    say("connected")
    return 0


def detach(xs: XenStore, paths: VbdPaths) -> int:
    location = xs.read(paths.backend_key("physical-device-path"))
    tapdisk = parse_device_path(location)
    # The counters while the ring is still served (the guest's phase 1 is done).
    stats = tap_ctl("stats", "-p", str(tapdisk.pid), "-m", str(tapdisk.minor))
    print("@@TAPDISK-STATS " + stats.replace("\n", ""), flush=True)

    def closing(tx: Transaction) -> None:
        tx.write(paths.backend_key("online"), "0")
        tx.write(paths.backend_key("state"), "5")

    xs.transact(closing)
    state = wait_state(xs, paths.backend_key("state"), "6")
    say(f"back-end state {state} after online=0; front-end state "
        f"{xs.read_optional(paths.frontend_key('state'))}")
    tap_ctl("destroy", "-p", str(tapdisk.pid), "-m", str(tapdisk.minor))

    def remove(tx: Transaction) -> None:
        tx.rm(paths.frontend)
        tx.rm(paths.backend)

    xs.transact(remove)
    say("detached")
    return 0 if state == "6" else 1


def main(argv: list[str]) -> int:
    op, domid, devid = argv[0], int(argv[1]), int(argv[2])
    paths = VbdPaths(domid, devid, 0, "vbd3")
    with XenStore.open() as xs:
        if op == "attach":
            return attach(xs, paths, argv[3])
        if op == "detach":
            return detach(xs, paths)
    raise SystemExit(f"vbd3: unknown operation {op!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
