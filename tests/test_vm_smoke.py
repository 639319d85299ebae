"""Smoke test of the Vagrant test-host harness on edge-small: pyinfra connects and reads facts,
the host has the size it was given, Docker runs an image brought in over SSH with its memory
limit enforced, the compose plugin answers, the data disk is there, and destroying the host
leaves nothing behind. Runs in the order written; the last test destroys edge-small."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from tests.vm import config, harness

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]
IMAGE = "edgefit-test/busybox:1"
MIB = 1024 * 1024


def busybox_rootfs_tar() -> bytes:
    """A one-binary root file system for `docker import`: Debian's static busybox plus the
    applet links the tests use. No Docker engine is needed on this machine to make it."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "cat", "head", "tail", "sleep", "true"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buffer.getvalue()


# edge-small unless EDGEFIT_SMOKE_HOST names another test host (e.g. edge-medium)
SMOKE_HOST = os.environ.get("EDGEFIT_SMOKE_HOST", "edge-small")


@pytest.fixture(scope="module")
def host(vm_hosts):
    return vm_hosts[SMOKE_HOST]


def test_pyinfra_reads_facts_over_ssh(host, vm_hosts, tmp_path):
    inventory = vm_hosts.write_inventory(tmp_path / "inventory.py", host.name)
    result = subprocess.run(
        [str(REPO / ".venv/bin/pyinfra"), "--json", str(inventory), "fact",
         "server.Os", "server.Hostname", "hardware.Cpus", "hardware.Memory", "server.LinuxDistribution"],
        capture_output=True, text=True, timeout=300, env=vm_hosts.pyinfra_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = {fact: by_host[host.name] for fact, by_host in json.loads(result.stdout).items()}
    spec = config.HOSTS[host.name]
    assert facts["server.Os"] == "Linux"
    assert facts["server.Hostname"] == host.name
    assert facts["hardware.Cpus"] == spec.cpus
    # hardware.Memory is MemTotal in MiB: what the VM has less what the kernel keeps (~5 %)
    assert 0.9 * spec.memory_mib <= facts["hardware.Memory"] <= spec.memory_mib, facts["hardware.Memory"]
    assert facts["server.LinuxDistribution"]["release_meta"]["VERSION_CODENAME"] == "bookworm"


def test_inventory_file_lists_the_host_in_its_size_group(host, vm_hosts):
    result = subprocess.run(
        [str(REPO / ".venv/bin/pyinfra"), str(vm_hosts.inventory()), "--limit", config.HOSTS[host.name].size,
         "exec", "--", "nproc"],
        capture_output=True, text=True, timeout=300, env=vm_hosts.pyinfra_env(), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = f"[{host.name}] {config.HOSTS[host.name].cpus}"
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr


def test_host_has_cgroup_v2_with_memory_controller(host):
    controllers = host.run("cat /sys/fs/cgroup/cgroup.controllers").stdout.split()
    assert "memory" in controllers, controllers
    assert host.run("stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"


def test_docker_runs_an_image_brought_in_over_ssh(host):
    imported = host.run(f"docker import - {IMAGE}", input=busybox_rootfs_tar(), timeout=300)
    assert imported.stdout.strip().startswith(b"sha256:"), imported.stdout
    token = uuid.uuid4().hex
    ran = host.run(f"docker run --rm {IMAGE} echo {token}", timeout=300)
    assert ran.stdout.strip() == token


def test_docker_memory_limit_is_set_and_enforced(host):
    name = f"edgefit-smoke-{uuid.uuid4().hex[:8]}"
    host.run(f"docker run -d --name {name} --memory 64m --memory-swap 64m {IMAGE} sleep 300", timeout=120)
    try:
        inspected = host.run(f"docker inspect -f '{{{{.HostConfig.Memory}}}}' {name}").stdout.strip()
        assert int(inspected) == 64 * MIB
        in_container = host.run(f"docker exec {name} cat /sys/fs/cgroup/memory.max").stdout.strip()
        assert int(in_container) == 64 * MIB
    finally:
        host.run(f"docker rm -f {name}", check=False)
    # tail holds a 200 MiB line without newline in memory: past the limit the kernel kills it
    greedy = host.run(f"docker run --name {name} --memory 64m --memory-swap 64m {IMAGE} "
                      "sh -c 'head -c 200m /dev/zero | tail -n 1 >/dev/null'", check=False, timeout=300)
    try:
        oom_killed = host.run(f"docker inspect -f '{{{{.State.OOMKilled}}}}' {name}").stdout.strip()
        assert greedy.returncode != 0 and oom_killed == "true", (greedy.returncode, oom_killed, greedy.stderr)
    finally:
        host.run(f"docker rm -f {name}", check=False)


def test_compose_plugin_answers(host):
    version = host.run("docker compose version").stdout
    assert "Docker Compose version v2." in version, version


def test_second_disk_is_there_and_unformatted(host):
    size = int(host.run(f"lsblk -bdno SIZE {host['data_disk']}").stdout)
    assert size == config.DATA_DISK_GIB * 1024 * MIB
    assert host.run(f"blkid {host['data_disk']}", check=False).returncode == 2, "no file system on it yet"
    root_source = host.run("findmnt -no SOURCE /").stdout.strip()
    assert root_source != host["data_disk"]


def test_destroy_leaves_nothing_behind(vm_hosts):
    """The session's last test (tests/conftest.py orders it): every host this session booted is
    destroyed, and nothing of them (domains, volumes, QEMU) remains; with nothing else up, the
    daemons and the namespace are gone too."""
    mine = sorted(vm_hosts.booted_here)
    if not mine:
        pytest.skip("every test host was up before this session (scripts/vm up); not destroying someone's host")
    vm_hosts.destroy(*mine)
    assert harness.leftovers(mine) == []
    assert all(harness.qemu_processes(name) == [] for name in mine)
    if not harness.read_hosts():
        from tests.vm import netns

        assert not netns.netns_exists()
        assert netns.daemons_running() == {}
        assert netns.foreign_libvirtd_pids() == [], "a libvirtd of ours outlived the teardown"
