#!/bin/sh
# Builds the busybox test initramfs used by the ignored real-QEMU tests in tests/real_qemu.rs.
#
# usage: make-test-initramfs.sh <extracted linux-image-*-cloud-amd64 root> <output.cpio>
#   e.g. apt-get download linux-image-6.1.0-56-cloud-amd64 && dpkg-deb -x linux-image-*.deb root
#    or: make-test-initramfs.sh <a kiln image's initramfs.cpio> <output.cpio>
#   (its lib/modules/*.ko: the modules kiln puts in every image's initramfs, for its vmlinuz;
#   this is how tests/real_qemu.rs builds it from $KILN_E2E_HOME/images/base)
#
# /init prints KILN-MARKER-INIT, answers kiln.probe=1 with KILN-PROBE-OK + poweroff, else loads
# the virtio modules, lists the virtio devices and ports (KILN-MARKER-DONE) and powers off,
# or, with kiln.test=sleep, stays up printing "kiln-tick N" every second until killed.
set -eu
root=$1
out=$2
busybox=${BUSYBOX:-/bin/busybox}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/lib/modules" "$work/proc" "$work/sys" "$work/dev"
cp "$busybox" "$work/bin/busybox"
# Dependencies first.
mods="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio
      drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev
      drivers/virtio/virtio_pci drivers/char/virtio_console drivers/block/virtio_blk
      drivers/char/hw_random/virtio-rng"
if [ -f "$root" ]; then
    # A kiln initramfs: flat lib/modules/NAME.ko, with '-' in names written as '_'.
    from=$(mktemp -d)
    trap 'rm -rf "$work" "$from"' EXIT
    (cd "$from" && cpio -i -d --quiet 'lib/modules/*.ko' < "$root")
    for m in $mods; do
        name=$(basename "$m")
        cp "$from/lib/modules/$(echo "$name" | tr - _).ko" "$work/lib/modules/$name.ko"
    done
else
    kdir=$(echo "$root"/lib/modules/*/kernel)
    [ -d "$kdir" ] || { echo "no lib/modules/*/kernel under $root" >&2; exit 1; }
    for m in $mods; do
        cp "$kdir/$m.ko" "$work/lib/modules/"
    done
fi
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
echo KILN-MARKER-INIT
if $B grep -q kiln.probe=1 /proc/cmdline; then echo KILN-PROBE-OK; $B poweroff -f; fi
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console virtio_blk virtio-rng; do
    $B insmod /lib/modules/$m.ko
done
i=0
while [ $i -lt 100 ] && ! $B cat /sys/class/virtio-ports/*/name >/dev/null 2>&1; do $B usleep 20000; i=$((i+1)); done
for d in /sys/bus/virtio/devices/*; do echo "virtio-device $($B basename $d) id=$($B cat $d/device)"; done
for p in /sys/class/virtio-ports/*; do echo "virtio-port $($B basename $p) name=$($B cat $p/name)"; done
echo "block: $($B ls /sys/block | $B tr '\n' ' ')"
echo "uptime: $($B cat /proc/uptime)"
echo KILN-MARKER-DONE
if $B grep -q kiln.test=sleep /proc/cmdline; then n=0; while :; do echo "kiln-tick $n"; n=$((n+1)); $B sleep 1; done; fi
$B poweroff -f
INIT
chmod +x "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet) > "$out"
