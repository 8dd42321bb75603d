# Our back-end: tapback against the real xenstored, tap-ctl for the hotplug step, and the
# vbd3/vbd nodes written by a dom0 toolstack script (rig/vbd3.py). Sourced by /init.
export PYTHONPATH=/opt/blktap3
PY=/usr/bin/python3.11
mkdir -p /run/blktap-control
tapback --log-format console --log-file /run/tapback.log \
    --pid-file /run/tapback.pid &
wait_for 60 test -s /run/tapback.pid || die "tapback did not start"
step tapback-up
(tail -n +1 -f /run/tapback.log | while IFS= read -r l; do echo "[tapback] $l"; done) &
attach() { $PY /opt/blktap3/rig/vbd3.py attach "$GUEST" 51712 "$IMG"; }
detach() { $PY /opt/blktap3/rig/vbd3.py detach "$GUEST" 51712; }
cleanup() {
    echo "tap-ctl list after the guest: $(tap-ctl list)"
    kill "$(cat /run/tapback.pid)" 2>/dev/null
    true
}
BACKEND_KIND=vbd3
