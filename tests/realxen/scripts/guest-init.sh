#!/bin/sh
# /init of the rig's PV guest: the real xen-blkfront against whatever back-end dom0
# attached. Phase 1: size, O_DIRECT pattern, ext4 with files, fsck after a remount.
# Then it waits for dom0 to detach the disk and attach it again, and phase 2 checks the
# files through the new connection, adds more, syncs, and the guest powers off.
# Debian's busybox runs its own applets first: e2fsprogs are called by path.
# Lines "@@G RESULT <check> pass|fail ..." are the verdicts dom0 and the host read.
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /mnt/d
DEV=/dev/xvda
WANT=$(sed -n 's/.*disk_sectors=\([0-9]*\).*/\1/p' /proc/cmdline)
PAT_MB=$((WANT / 2048 - 8))   # the pattern lives in the last 8 MiB, past the filesystem

echo "@@G up"
for m in $(cat /modules/order); do insmod /modules/$m; done
result() { echo "@@G RESULT $*"; }
check() { _name=$1; shift; if "$@"; then result "$_name" pass; else result "$_name" fail; fi; }
wait_dev() {  # wait_dev present|absent <seconds>
    _t=$(($2 * 5))
    while :; do
        if [ "$1" = present ]; then [ -b $DEV ] && return 0; else [ -b $DEV ] || return 0; fi
        _t=$((_t - 1)); [ $_t -le 0 ] && return 1
        sleep 0.2
    done
}
faults() {
    echo "@@G FAULTS-BEGIN"
    dmesg | grep -E 'segfault|traps:|general protection|invalid opcode|Illegal instruction'
    echo "@@G FAULTS-END"
}
fsck_clean() { /usr/sbin/e2fsck -fn $DEV >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; return 1; }; }
verify_files() { mount -t ext4 $DEV /mnt/d && (cd /mnt/d && md5sum -cs MANIFEST); _r=$?
    umount /mnt/d; return $_r; }

if ! wait_dev present 90; then result device fail "no $DEV"; faults; poweroff -f; fi
echo "@@G attached"
dmesg | grep -i blkfront | sed 's/^/@@G BLKFRONT /'
size=$(cat /sys/block/xvda/size)
check size [ "$size" = "$WANT" ]
echo "@@G size $size sectors (published $WANT)"

# O_DIRECT: 8 MiB of random bytes written past the filesystem, read back, compared.
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
echo "@@G PATTERN-AT-MB $PAT_MB"
echo "@@G PATTERN-MD5 $(md5sum </tmp/pat | cut -d' ' -f1)"
dd if=/tmp/pat of=$DEV bs=1M seek=$PAT_MB oflag=direct 2>/dev/null
dd if=$DEV of=/tmp/back bs=1M skip=$PAT_MB count=8 iflag=direct 2>/dev/null
check odirect cmp -s /tmp/pat /tmp/back
rm -f /tmp/back

# ext4 on the first part of the disk, 200 files of varied sizes, sync, remount, fsck.
FS_BLOCKS=$((PAT_MB * 256))
/usr/sbin/mke2fs -q -F -t ext4 -b 4096 $DEV $FS_BLOCKS >/tmp/mkfs.log 2>&1 || cat /tmp/mkfs.log
mount -t ext4 $DEV /mnt/d || result mount fail
i=0
while [ $i -lt 200 ]; do
    dd if=/dev/urandom of=/mnt/d/f$i bs=1k count=$(( (i * 37) % 300 + 1 )) 2>/dev/null
    i=$((i + 1))
done
(cd /mnt/d && md5sum f* > MANIFEST)
sync
umount /mnt/d
check fsck1 fsck_clean
check files1 verify_files
faults
echo "@@G PHASE1-DONE"

# dom0 detaches the disk and attaches it again: the reconnect path of a real blkfront.
check detached wait_dev absent 90
check reattached wait_dev present 90
size=$(cat /sys/block/xvda/size)
check size2 [ "$size" = "$WANT" ]
dmesg | grep -i blkfront | tail -1 | sed 's/^/@@G BLKFRONT /'
check files2 verify_files
mount -t ext4 $DEV /mnt/d
i=0
while [ $i -lt 50 ]; do
    dd if=/dev/urandom of=/mnt/d/g$i bs=4k count=$(( (i * 13) % 64 + 1 )) 2>/dev/null
    i=$((i + 1))
done
(cd /mnt/d && md5sum f* g* > MANIFEST && sync)
echo "@@G MANIFEST-MD5 $(md5sum < /mnt/d/MANIFEST | cut -d' ' -f1)"
umount /mnt/d
check fsck2 fsck_clean

# fio, read-only with O_DIRECT over the whole disk: the host sets these figures beside
# the other back-end's from the same CI run (terse v3: iops field 8, clat p50 in 18-37).
echo "@@G QUEUES $(ls /sys/block/xvda/mq | wc -l)"
FIO_SECS=4  # each job, after 1 s of ramp: short, the rig's time budget is tight
fio_job() {  # fio_job NAME RW BS IODEPTH
    _out=$(fio --name="$1" --filename=$DEV --readonly --direct=1 --ioengine=libaio \
        --rw="$2" --bs="$3" --iodepth="$4" --ramp_time=1 --runtime=$FIO_SECS \
        --time_based --output-format=terse --terse-version=3 2>&1)
    _rc=$?
    _line=$(echo "$_out" | grep "^3;")
    echo "@@G FIO $_line"
    [ $_rc = 0 ] && [ -n "$_line" ] || { echo "$_out" | head -5; return 1; }
}
check fio-4k-randread-qd16 fio_job 4k-randread-qd16 randread 4k 16
check fio-1m-seqread-qd8 fio_job 1m-seqread-qd8 read 1M 8
faults
echo "@@G PHASE2-DONE"
sleep 0.5
poweroff -f
