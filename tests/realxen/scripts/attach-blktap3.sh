# Our back-end: tapback against the real xenstored, and the installed blktap3-vbd3 as the
# toolstack (Xen 4.17's libxl makes no vbd3 disks): libxl's nodes, then Xen's block-tap
# steps with our tap-ctl. Sourced by /init.
export PYTHONPATH=/opt/blktap3
mkdir -p /run/blktap-control
# Started as blktap's own unit starts its tapback (`tapback -p PIDFILE`, Type=forking):
# the command daemonizes and returns once the daemon watches XenStore. The log options
# are ours (blktap's logs to syslog).
tapback -p /run/tapback.pid --log-format console --log-file /run/tapback.log \
    || die "tapback did not start"
wait_for 60 test -s /run/tapback.pid || die "tapback wrote no pid file"
step tapback-up
(tail -n +1 -f /run/tapback.log | while IFS= read -r l; do echo "[tapback] $l"; done) &
attach() { blktap3-vbd3 attach "$GUEST" 51712 "$IMG"; }
# The counters while the ring is still served (the guest's phase 1 is done), then detach.
detach() {
    echo "@@TAPDISK-STATS $(tap-ctl stats -p "$(xenstore-read "$BACKEND/pid")" \
        -m "$(xenstore-read "$BACKEND/minor")" | tr -d '\n')"
    blktap3-vbd3 detach "$GUEST" 51712
}
# Evidence that the tapdisk serving the ring runs on the real Xen libraries and devices.
evidence() {
    pid=$(xenstore-read "$BACKEND/kthread-pid")
    echo "@@TAPDISK-MAPS $pid $(grep -o '/[^ ]*\(xen\|sim\)[^ ]*' /proc/$pid/maps | sort -u | tr '\n' ' ')"
    echo "@@TAPDISK-FDS $pid $(for fd in /proc/$pid/fd/*; do readlink $fd; done | grep /dev/ | sort -u | tr '\n' ' ')"
}
# After the guest is gone the VBD stays in its tapdisk (blktap leaves that to the
# toolstack): show its counters, then destroy it as a toolstack would.
cleanup() {
    tap-ctl list | while read -r pid minor rest; do
        pid=${pid#pid=}; minor=${minor#minor=}
        echo "@@TAPDISK-STATS $(tap-ctl stats -p "$pid" -m "$minor" | tr -d '\n')"
        tap-ctl destroy -p "$pid" -m "$minor" || echo "tap-ctl destroy -p $pid -m $minor failed"
    done
    echo "tap-ctl list after destroy: $(tap-ctl list)"
    for f in /run/blktap-control/log/*.log; do sed "s|^|[tapdisk] |" "$f"; done
    kill "$(cat /run/tapback.pid)" 2>/dev/null
    true
}
BACKEND_KIND=vbd3
