"""Role "volumes": the data disk mounted by UUID at the data root, and the data directories.

Formatting happens only when `blkid -p` finds no signature on the disk AND
edgefit_data_disk_format is set (checked by the facts role before anything runs). Existing data
is never touched.
"""

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from edgefit.facts import BlockDevice
from edgefit.images import RUN_AS_UID
from edgefit.plan import Plan
from edgefit.settings import DeploySettings

DOCKER_DROP_IN = "/etc/systemd/system/docker.service.d/edgefit-data-disk.conf"

# data directory (under the data root) -> the service whose image owns it
DATA_DIRECTORIES = {
    "postgres": "db",
    "redis": "redis",
    "redis-broker": "redis_broker",
    "storage": "api",
    "sandbox/dependencies": "sandbox",
    "sandbox/conf": "sandbox",
    "plugin_daemon": "plugin_daemon",
    "weaviate": "weaviate",
    "qdrant": "qdrant",
}


def format_command(device: str) -> str:
    """mkfs.ext4, guarded on the host by `blkid -p` once more: exit 2 means its low-level probe
    found no signature at all (no filesystem, LUKS, partition table or RAID member); anything
    else, and the disk is left alone. -E nodiscard: no long TRIM pass on big virtual disks."""
    dev = shlex.quote(device)
    return (f"probe=0; blkid -p {dev} >/dev/null 2>&1 || probe=$?; "
            f"if [ \"$probe\" -eq 2 ]; then mkfs.ext4 -q -L edgefit-data -E nodiscard {dev}; fi")


def mount_command(device: str, data_root: str, format_first: bool) -> str:
    dev, root = shlex.quote(device), shlex.quote(data_root)
    steps = ["set -e"]
    if format_first:
        steps.append(format_command(device))
    steps += [
        f"uuid=$(blkid -o value -s UUID {dev})",
        'test -n "$uuid"',
        f"mkdir -p {root}",
        # nofail: a missing disk must not stop the host from booting (and sshd from starting).
        f"grep -q \"^UUID=$uuid \" /etc/fstab || echo \"UUID=$uuid \"{root}\" ext4 defaults,nofail 0 2\" >> /etc/fstab",
        "systemctl daemon-reload",
        f"mountpoint -q {root} || mount {root}",
        # Refuse to go on if the data root is still the root filesystem.
        f"test \"$(findmnt -n -o SOURCE --target {root})\" = \"$(readlink -f {dev})\"",
    ]
    return "; ".join(steps)


@deploy("Data disk and directories")
def prepare_volumes(plan: Plan, settings: DeploySettings) -> None:
    root = plan.data_root
    if settings.data_disk:
        device = host.get_fact(BlockDevice, path=settings.data_disk)
        if device.get("mountpoint", "") != root:
            server.shell(
                name=f"Mount {settings.data_disk} at {root} by UUID",
                commands=[mount_command(settings.data_disk, root, bool(device.get("empty")))],
            )
        # Docker must not start its containers before the data disk is mounted: Postgres
        # would find an empty directory on the root filesystem and initialise a new, empty
        # cluster there. With this, a missing disk stops Docker instead.
        drop_in = files.put(
            name="Docker waits for the data disk",
            src=StringIO(f"# Rendered by edgefit\n[Unit]\nRequiresMountsFor={root}\n"),
            dest=DOCKER_DROP_IN,
        )
        server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"], _if=drop_in.did_change)
    files.directory(name=f"Data root {root}", path=root, mode="755")
    for relative, service in DATA_DIRECTORIES.items():
        if service not in plan.services:
            continue
        path = f"{root}/{relative}"
        made = files.directory(name=f"Data directory {path}", path=path)
        uid = RUN_AS_UID.get(service, 0)
        if uid:
            server.shell(name=f"Owner of {path}: uid {uid}", commands=[f"chown {uid}:{uid} {shlex.quote(path)}"],
                         _if=made.did_change)
