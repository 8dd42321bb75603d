#!/bin/sh
# /init of the rig's dom0: brings up the Xen tools, starts the guest, attaches its disk
# with the back-end named by `rigmode=` on the kernel command line (control: Linux's
# xen-blkback through xl; blktap3: our tap-ctl + back-end), detaches and re-attaches it
# when the guest asks, then checks the image once the guest is gone. `rigdist=` names
# the Debian release whose Xen runs (bookworm: 4.17, trixie: 4.20); a release may have
# its own attach script (attach-MODE-DIST.sh).
# Lines "@@STEP <name>" mark steps (the host times them), "@@RESULT <check> pass|fail ..."
# carry verdicts, "[guest] ..." relays the guest's console.
export PATH=/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin:/usr/lib/xen-4.20/bin
export HOME=/root LANG=C
IMG=/srv/disk.img
GLOG=/var/log/xen/console/guest-guest.log
DISK_MB=96

step() { echo "@@STEP $*"; }
result() { echo "@@RESULT $*"; }
die() { echo "@@FAIL $*"; finish; }
finish() {
    echo "@@DOM0-FAULTS-BEGIN"
    dmesg | grep -E 'segfault|traps:|general protection|invalid opcode|Illegal instruction'
    echo "@@DOM0-FAULTS-END"
    sleep 0.5  # let the guest relay flush
    step end
    poweroff -f
}
# wait_for <seconds> <command...>: poll until the command succeeds
wait_for() {
    _t=$(( $1 * 5 )); shift
    while ! "$@" >/dev/null 2>&1; do
        _t=$((_t - 1)); [ $_t -le 0 ] && return 1
        sleep 0.2
    done
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /var/log/xen/console /var/lib/xen /var/lib/xenstored /var/lock
mount -t devpts devpts /dev/pts
mount -t tmpfs run /run
mount -t tmpfs shm /dev/shm
# Xen's hotplug locking and bash's redirections need these links.
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
ln -s /run /var/run
mkdir -p /run/xen /run/xenstored /run/xen-hotplug
MODE=$(sed -n 's/.*rigmode=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
DIST=$(sed -n 's/.*rigdist=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
step modules
for m in $(cat /modules/order); do
    case $m in
        brd.ko) args="rd_nr=1 rd_size=262144" ;;  # a 256 MiB RAM disk for the image's fs
        *) args= ;;
    esac
    insmod /modules/$m $args || die "insmod $m"
done
mount -t xenfs xenfs /proc/xen || die "mount xenfs"

step xenstored
xenstored --pid-file /run/xenstored.pid || die xenstored
wait_for 10 xenstore-exists / || die "xenstored does not answer"
xen-init-dom0 || die xen-init-dom0
xenconsoled --log=guest --log-dir=/var/log/xen/console || die xenconsoled

step image
# The image lives on ext4 (a RAM disk): tapdisk opens it with O_DIRECT, which dom0's
# tmpfs (Linux 6.1) refuses.
mkdir -p /srv
/usr/sbin/mke2fs -q -F -t ext4 /dev/ram0 >/dev/null || die "mkfs /srv"
mount -t ext4 /dev/ram0 /srv || die "mount /srv"
dd if=/dev/zero of=$IMG bs=1M count=0 seek=$DISK_MB 2>/dev/null
if [ "$MODE" = control ]; then
    losetup /dev/loop0 $IMG || die losetup
fi

# What the attach script may redefine: how the guest is created and how its end is
# awaited (attach, detach, evidence, cleanup and BACKEND_KIND it must define).
create_guest() { xl create /etc/xen/guest.cfg; }
guest_end() { wait_for 60 sh -c "! xl domid guest"; }
if [ -f /etc/rig/attach-$MODE-$DIST.sh ]; then
    . /etc/rig/attach-$MODE-$DIST.sh
else
    . /etc/rig/attach-$MODE.sh
fi

step guest-create
create_guest || die "xl create"
GUEST=$(xl domid guest)
# Relay the guest's console to ours as it is written.
(wait_for 30 test -f $GLOG; tail -n +1 -f $GLOG | while IFS= read -r l; do
    echo "[guest] $l"; done) &

# The back-end's keys as the guest saw them at connection: the host compares the
# features advertised there with blkfront's line.
backend_keys() {
    wait_for 60 sh -c "[ \"\$(xenstore-read $BACKEND/state)\" = 4 ]" ||
        echo "back-end $BACKEND not Connected: state $(xenstore-read $BACKEND/state)"
    echo "@@BACKEND-KEYS $(xenstore-ls -f "$BACKEND" | sed 's|^.*/\([^/ ]*\) = "\(.*\)"$|\1=\2|' | tr '\n' ' ')"
}
step attach
attach || die attach
BACKEND=/local/domain/0/backend/$BACKEND_KIND/$GUEST/51712
backend_keys
evidence
step guest-phase1
wait_for 150 grep -q '@@G PHASE1-DONE' $GLOG || die "guest phase 1 did not finish"
grep -q '@@G RESULT .* fail' $GLOG && die "guest phase 1 failed"
step detach
detach || die detach
step reattach
sleep 1
attach || die re-attach
backend_keys
evidence
step guest-phase2
wait_for 150 grep -q '@@G PHASE2-DONE' $GLOG || die "guest phase 2 did not finish"
step guest-shutdown
guest_end || die "guest did not shut down"
cleanup

step image-check
# Every byte the guest synced: its files (its manifest, checked by md5sum) and the
# O_DIRECT pattern (the md5 the guest printed) must be in the image.
losetup /dev/loop1 $IMG || die "losetup check"
mkdir -p /mnt/img
mount -t ext4 -o ro /dev/loop1 /mnt/img || die "mount image"
want=$(sed -n 's/.*@@G MANIFEST-MD5 \([0-9a-f]*\).*/\1/p' $GLOG | tail -1)
got=$(md5sum /mnt/img/MANIFEST | cut -d' ' -f1)
if [ -n "$want" ] && [ "$want" = "$got" ] && (cd /mnt/img && md5sum -cs MANIFEST); then
    result image-files pass "$(wc -l < /mnt/img/MANIFEST) files"
else
    result image-files fail "manifest want=$want got=$got"
fi
umount /mnt/img
want=$(sed -n 's/.*@@G PATTERN-MD5 \([0-9a-f]*\).*/\1/p' $GLOG | tail -1)
skip=$(sed -n 's/.*@@G PATTERN-AT-MB \([0-9]*\).*/\1/p' $GLOG | tail -1)
got=$(dd if=/dev/loop1 bs=1M skip=${skip:-0} count=8 2>/dev/null | md5sum | cut -d' ' -f1)
if [ -n "$want" ] && [ "$want" = "$got" ]; then
    result image-pattern pass
else
    result image-pattern fail "want=$want got=$got"
fi
losetup -d /dev/loop1
finish
