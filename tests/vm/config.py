"""Where the harness keeps things and which test hosts exist. One place for every number."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VM_DIR = Path(__file__).resolve().parent
BOX_RECIPE_DIR = VM_DIR / "box"
COMPOSE_BINARY = REPO / ".venv/lib/python3.11/site-packages/compose/docker-compose"


@dataclass(frozen=True)
class HostSpec:
    name: str
    size: str  # pyinfra group: small, medium
    cpus: int
    memory_mib: int


# The Vagrantfile defines the same hosts; tests/vm/test_config keeps the two in step.
HOSTS = {
    "edge-small": HostSpec("edge-small", "small", cpus=2, memory_mib=4096),
    "edge-medium": HostSpec("edge-medium", "medium", cpus=4, memory_mib=8192),
}
DATA_DISK_GIB = 8  # second, sparse virtual disk: the external data volume (/dev/vdb)

NETNS = "edgefit-vm"
DOMAIN_PREFIX = "edgefit-"  # libvirt domain = prefix + host name (Vagrantfile default_prefix)
POOL_NAME = "edgefit"
POOL_DIR = Path("/var/lib/libvirt/images/edgefit")
# QEMU runs as libvirt-qemu and cannot read below /root: the kernel it boots lives here.
KERNEL_DIR = Path("/var/lib/libvirt/boot")
MGMT_NETWORK = "edgefit-mgmt"

# Bounds for every wait (seconds). Generous: TCG on 2 shared cores is slow.
BOX_BUILD_TIMEOUT = 1800
DAEMON_START_TIMEOUT = 60
VAGRANT_UP_TIMEOUT = 900
VAGRANT_DESTROY_TIMEOUT = 300
SSH_READY_TIMEOUT = 300
DOCKER_READY_TIMEOUT = 300


def cache_dir() -> Path:
    """Outside the repository, so fresh clones on the same machine reuse the box."""
    return Path(os.environ.get("EDGEFIT_CACHE") or Path.home() / ".cache" / "edgefit")


def state_dir() -> Path:
    return cache_dir() / "vm"


def hosts_file() -> Path:
    """Connection data for inventory/vagrant.py: written by `up`, emptied by `down`."""
    return state_dir() / "hosts.json"


def local_box_file() -> Path:
    """Which local box is current (read by the Vagrantfile when EDGEFIT_BOX=local)."""
    return state_dir() / "local-box.json"


def vagrant_home() -> Path:
    return cache_dir() / "vagrant.d"
