"""What a toolstack does for a vbd3 disk, on a real Xen host and on the simulated one.

- `disk`: names (domids, `xvdX`), the image (`aio:/path`), and the back-end and
  front-end directories exactly as libxl writes them;
- `blocktap`: Xen's `block-tap` hotplug script (the tap-ctl steps) re-implemented;
- `cli`: `blktap3-vbd3 attach|detach|list`, for hosts whose libxl cannot make vbd3
  devices (Xen < 4.19, e.g. Debian 12's 4.17).

Imports xenbus only (and runs the `tap-ctl` command): no simulated host, so it runs in a
real dom0 (the real-Xen rig bundles it).
"""
