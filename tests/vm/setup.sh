#!/usr/bin/env bash
# What tests/vm/run.sh boots, provisioned once into $AGENTD_VM_DIR (default
# /var/cache/agentd-vm): Debian's QEMU, its firmware, Debian's kernel (linux-image-amd64's
# current 6.1) with its modules, and a small initramfs of our own (tests/vm/guest/init).
#
# The packages are unpacked (dpkg -x), not installed: installing qemu-system-x86 would remove
# the qemu-utils these machines carry (a newer QEMU that conflicts with it), and
# linux-image-amd64 pulls in initramfs-tools, udev and a systemd upgrade, and Debian's initramfs
# cannot mount an overlay on 9p anyway. Only the libraries the unpacked QEMU links to, and kmod
# (depmod), are installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vm=${AGENTD_VM_DIR:-/var/cache/agentd-vm}
if [ -e "$vm/initramfs.cpio" ] && [ "$vm/initramfs.cpio" -nt "$here/guest/init" ]; then
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "tests/vm/setup.sh: run as root (apt-get)" >&2; exit 1; }
mkdir -p "$vm/debs" "$vm/root"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 kmod cpio >/dev/null
kernel=$(apt-cache depends linux-image-amd64 | grep -o 'linux-image-6[^ ]*-amd64' | head -1)
(cd "$vm/debs" && rm -f ./*.deb && apt-get download -qq -o APT::Sandbox::User=root qemu-system-x86 qemu-system-common \
  qemu-system-data seabios ipxe-qemu "$kernel" busybox-static)
rm -rf "$vm/root" && mkdir -p "$vm/root"
for deb in "$vm"/debs/*.deb; do dpkg -x "$deb" "$vm/root"; done
version=${kernel#linux-image-}
depmod -b "$vm/root" "$version"
# The initramfs: static busybox, /init, and the modules for virtio, 9p and overlayfs (all
# modules in Debian's kernel), in the order they are loaded.
initramfs=$(mktemp -d)
trap 'rm -rf "$initramfs"' EXIT
mkdir -p "$initramfs/bin" "$initramfs/mods"
cp "$vm/root/bin/busybox" "$initramfs/bin/"
install -m 0755 "$here/guest/init" "$initramfs/init"
for module in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet \
  9pnet_virtio netfs fscache 9p overlay; do
  find "$vm/root/lib/modules/$version" -name "$module.ko" -exec cp {} "$initramfs/mods/" \;
  [ -e "$initramfs/mods/$module.ko" ] || { echo "no $module.ko in $kernel" >&2; exit 1; }
done
(cd "$initramfs" && find . | cpio -o -H newc --quiet) >"$vm/initramfs.cpio.new"
mv "$vm/initramfs.cpio.new" "$vm/initramfs.cpio"
echo "tests/vm/setup.sh: $kernel and QEMU $("$vm/root/usr/bin/qemu-system-x86_64" --version | head -1) in $vm"
