"""The box with the test images already loaded: what a first deploy of a test host would
otherwise upload and `docker load` (288 s of the first deploy of both hosts on 2026-12-03, the
two guests loading at once; 139 s for one guest alone).

A copy of the base box's disk is booted once with QEMU on this machine (no libvirt, no
network but a user-mode NIC that only forwards a loopback port to the guest's sshd), the
images of the test tarball are loaded, the tags no service of the default deploy uses (the
upgrade tests' releases) are removed again so those tests still bring their release in as an
air-gapped operator would, the guest's identity (machine id, docker key, journal) is emptied,
and it powers off. The disk is packed as a Vagrant box of its own, cached beside the base box
under the hash of the image recipe. Costs about 4 minutes once per image recipe (244 s).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .proc import CommandFailed, phase, run, say, wait_until
from .ssh import ssh_command

BOOT_TIMEOUT = 600  # first SSH answer of the guest (TCG: about 60-100 s)
LOAD_TIMEOUT = 1200  # docker load of the tarball (139 s on an idle guest)
POWEROFF_TIMEOUT = 180
GUEST_CPUS, GUEST_MEMORY_MIB = 2, 2048


def loaded_dir(base_dir: Path, images_key: str) -> Path:
    return base_dir / f"images-{images_key}"


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ssh(port: int, key: Path, command: str, *, timeout: float, stdin=None) -> subprocess.CompletedProcess:
    # A throwaway guest on a loopback port: its host key is the box's and is never kept.
    guest = {"ssh_key": str(key), "ssh_port": port, "ssh_user": "root", "ssh_hostname": "127.0.0.1",
             "ssh_known_hosts_file": "/dev/null"}
    return subprocess.run(ssh_command(guest, command), stdin=stdin, capture_output=True, timeout=timeout)


def _checked(port: int, key: Path, command: str, what: str, *, timeout: float, stdin=None) -> None:
    try:
        done = _ssh(port, key, command, timeout=timeout, stdin=stdin)
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"preloading the box: {what} took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise CommandFailed(f"preloading the box: {what} failed (exit {done.returncode}): "
                            f"{done.stderr.decode(errors='replace')[-2000:]}")


def build_loaded_box(base_dir: Path, out: Path, tarball: Path, manifest: dict, timings: dict | None) -> None:
    """base_dir: the base box (edgefit.box, vmlinuz, initrd.img, id_rsa); out: where the loaded
    box goes (edgefit.box, complete). Nothing of the guest outlives this call."""
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key = base_dir / "id_rsa"
    keep = sorted(set(manifest["images_by_service"].values()))
    drop = sorted(set(manifest["images"]) - set(keep))
    run(["tar", "-C", str(work), "-xf", str(base_dir / "edgefit.box")], timeout=300, label="tar")
    port = _free_loopback_port()
    console = work / "console.log"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "qemu64",
         "-smp", str(GUEST_CPUS), "-m", str(GUEST_MEMORY_MIB),
         "-display", "none", "-no-reboot", "-serial", f"file:{console}", "-monitor", "none",
         "-kernel", str(base_dir / "vmlinuz"), "-initrd", str(base_dir / "initrd.img"),
         "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.hostname=edgefit-preload",
         "-drive", f"file={work / 'box.img'},if=virtio,format=qcow2,discard=unmap",
         "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with phase("preload: boot the box once", timings):
            def answers() -> bool:
                if qemu.poll() is not None:
                    raise CommandFailed(f"preloading the box: QEMU exited ({qemu.returncode}): "
                                        f"{qemu.stderr.read().decode(errors='replace')[-2000:]}")
                try:
                    return _ssh(port, key, "docker info --format '{{.ServerVersion}}'", timeout=60).returncode == 0
                except subprocess.TimeoutExpired:
                    return False
            wait_until("the preload guest's sshd and dockerd", answers, timeout=BOOT_TIMEOUT, interval=3)
        with phase(f"preload: docker load {tarball.name}", timings), tarball.open("rb") as source:
            _checked(port, key, "docker load -q", "docker load", timeout=LOAD_TIMEOUT, stdin=source)
        refs = " ".join(keep)
        steps = [f"docker image inspect {refs} > /dev/null"]
        if drop:  # a tag only: the layer stays, shared with the images kept
            steps.append(f"docker rmi {' '.join(drop)} > /dev/null")
        steps += [
            "systemctl stop docker.socket docker.service containerd.service",
            # Every host made from this box must be a machine of its own.
            "rm -f /etc/docker/key.json", "rm -rf /var/log/journal/* /var/tmp/* /tmp/*", ": > /etc/machine-id",
            "fstrim -a || true", "sync",
        ]
        _checked(port, key, " && ".join(steps), "keeping release 1's images and emptying the guest's identity",
                 timeout=300)
        say(f"preload: kept {len(keep)} images, untagged {len(drop)} ({', '.join(drop) or 'none'})")
        _ssh(port, key, "systemctl poweroff", timeout=60)
        with phase("preload: power off", timings):
            wait_until("the preload guest to power off", lambda: qemu.poll() is not None,
                       timeout=POWEROFF_TIMEOUT, interval=1)
    finally:
        if qemu.poll() is None:  # only ours: the process this call started, by its handle
            qemu.kill()
            qemu.wait(timeout=30)
    run(["tar", "-C", str(work), "-cf", str(out / "edgefit.box.partial"), "metadata.json", "box.img"],
        timeout=600, label="tar")
    (out / "edgefit.box.partial").rename(out / "edgefit.box")
    (out / "images.json").write_text(json.dumps({"tarball": tarball.name, "kept": keep, "untagged": drop,
                                                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
