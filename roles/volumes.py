"""Role "volumes": the data disk mounted by UUID at the data root, and the data directories.

Formatting happens only when the disk holds no filesystem AND edgefit_data_disk_format is set
(checked by the facts role before anything runs). Existing data is never touched.
"""

import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from edgefit.facts import BlockDevice
from edgefit.images import RUN_AS_UID
from edgefit.plan import Plan
from edgefit.render import DOCKER_DATA_DISK_DROP_IN, StackFile, file_at
from roles.common import upload

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


def mount_command(device: str, data_root: str, format_first: bool) -> str:
    dev, root = shlex.quote(device), shlex.quote(data_root)
    steps = ["set -e"]
    if format_first:
        # -E nodiscard: no long TRIM pass on big virtual disks; blkid re-checks emptiness first.
        steps.append(f"test -z \"$(blkid -o value -s TYPE {dev})\" && mkfs.ext4 -q -L edgefit-data -E nodiscard {dev}")
    steps += [
        f"uuid=$(blkid -o value -s UUID {dev})",
        'test -n "$uuid"',
        f"mkdir -p {root}",
        # nofail: a missing disk must not stop the host from booting (and sshd from starting).
        f"grep -q \"^UUID=$uuid \" /etc/fstab || echo \"UUID=$uuid {data_root} ext4 defaults,nofail 0 2\" >> /etc/fstab",
        "systemctl daemon-reload",
        f"mountpoint -q {root} || mount {root}",
        # Refuse to go on if the data root is still the root filesystem.
        f"test \"$(findmnt -n -o SOURCE --target {root})\" = \"$(readlink -f {dev})\"",
    ]
    return "; ".join(steps)


@deploy("Data disk and directories")
def prepare_volumes(plan: Plan, rendered: list[StackFile]) -> None:
    root = plan.data_root
    if plan.data_disk:
        device = host.get_fact(BlockDevice, path=plan.data_disk)
        if device.get("mountpoint", "") != root:
            server.shell(
                name=f"Mount {plan.data_disk} at {root} by UUID",
                commands=[mount_command(plan.data_disk, root, device.get("fstype") is None)],
            )
        # Docker waits for the disk's mount (render.py says why).
        drop_in = upload(file_at(rendered, DOCKER_DATA_DISK_DROP_IN))
        server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"], _if=drop_in.did_change)
    files.directory(name=f"Data root {root}", path=root, mode="755")
    for relative, service in DATA_DIRECTORIES.items():
        if service not in plan.services:
            continue
        path = f"{root}/{relative}"
        made = files.directory(name=f"Data directory {path}", path=path)
        uid = RUN_AS_UID.get(service, 0)
        if uid:
            server.shell(name=f"Owner of {path}: uid {uid}", commands=[f"chown {uid}:{uid} {path}"],
                         _if=made.did_change)
