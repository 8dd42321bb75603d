# Our back-end on Xen 4.20, attached by xl alone: libxl writes the vbd3 nodes and runs
# Xen's own block-tap hotplug script, which drives our tap-ctl (list, allocate, spawn,
# attach, open; destroy on removal). tapback serves libxl's order (--toolstack libxl).
# Nothing of ours writes XenStore on this path. Sourced by /init.
export PYTHONPATH=/opt/blktap3
mkdir -p /run/blktap-control
tapback -p /run/tapback.pid --toolstack libxl --log-format console \
    --log-file /run/tapback.log || die "tapback did not start"
wait_for 60 test -s /run/tapback.pid || die "tapback wrote no pid file"
step tapback-up
(tail -n +1 -f /run/tapback.log | while IFS= read -r l; do echo "[tapback] $l"; done) &
# libxl takes format=raw (it refuses aio) and writes params=aio:PATH for block-tap.
DISK="vdev=xvda,backendtype=tap,format=raw,target=$IMG"
# The first connection comes with the guest (xl create with the disk in its config);
# the guest is kept when it powers off, so that `xl destroy` is what tears it down.
create_guest() {
    xl create /etc/xen/guest.cfg "disk=[\"$DISK\"]" 'on_poweroff="preserve"'
}
ATTACHED=0
attach() {
    ATTACHED=$((ATTACHED + 1))
    [ $ATTACHED = 1 ] && return 0
    xl block-attach guest "$DISK"
}
tapdisks() { tap-ctl list; pgrep -l tapdisk; }
# While the guest's phase-1 I/O is done and the VBD still live: xentop's view of the
# VBD, and dom0 reading the guest's pattern through the VBD's NBD export. Then detach.
detach() {
    echo "@@TAPDISK-STATS $(tap-ctl stats -p "$(xenstore-read "$BACKEND/pid")" \
        -m "$(xenstore-read "$BACKEND/minor")" | tr -d '\n')"
    xentop -b -i 1 -x 2>&1 | sed 's/^/@@XENTOP /'
    nbd_check
    xl block-detach guest xvda || return 1
    if wait_for 60 sh -c '[ -z "$(tap-ctl list)" ]'; then
        result xl-detach-no-tapdisk pass
    else
        result xl-detach-no-tapdisk fail "$(tapdisks | tr '\n' ' ')"
    fi
}
# md5 of the guest's O_DIRECT pattern read over NBD from the live VBD, against the md5
# the guest printed (the socket path is what block-tap published).
nbd_check() {
    sock=$(xenstore-read "$BACKEND/physical-device-path")
    at=$(sed -n 's/.*@@G PATTERN-AT-MB \([0-9]*\).*/\1/p' $GLOG | tail -1)
    want=$(sed -n 's/.*@@G PATTERN-MD5 \([0-9a-f]*\).*/\1/p' $GLOG | tail -1)
    got=$(python3 /etc/rig/nbd-read.py "$sock" $((at * 1048576)) 8388608 2>&1)
    if [ -n "$want" ] && [ "$got" = "$want" ]; then
        result nbd-live-read pass "$sock"
    else
        result nbd-live-read fail "socket=$sock want=$want got=$got"
    fi
}
evidence() {
    pid=$(xenstore-read "$BACKEND/kthread-pid")
    echo "@@TAPDISK-MAPS $pid $(grep -o '/[^ ]*\(xen\|sim\)[^ ]*' /proc/$pid/maps | sort -u | tr '\n' ' ')"
    echo "@@TAPDISK-FDS $pid $(for fd in /proc/$pid/fd/*; do readlink $fd; done | grep /dev/ | sort -u | tr '\n' ' ')"
}
# The guest powered off (kept by on_poweroff=preserve): `xl destroy` removes its
# devices, libxl runs block-tap remove, which must leave no tapdisk behind.
guest_end() {
    # `xl list`'s State column (the fifth) has an "s" once the guest has shut down.
    wait_for 90 sh -c "xl list guest | awk 'NR == 2 { print \$5 }' | grep -q s" || return 1
    xl destroy guest || return 1
    wait_for 30 sh -c "! xl domid guest" || return 1
    if wait_for 60 sh -c '[ -z "$(tap-ctl list)" ] && ! pgrep tapdisk'; then
        result xl-destroy-no-tapdisk pass
    else
        result xl-destroy-no-tapdisk fail "$(tapdisks | tr '\n' ' ')"
    fi
}
cleanup() {
    for f in /run/blktap-control/log/*.log; do sed "s|^|[tapdisk] |" "$f"; done
    kill "$(cat /run/tapback.pid)" 2>/dev/null
    true
}
BACKEND_KIND=vbd3
