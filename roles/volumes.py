"""Role "volumes": the data disk mounted by UUID at the data root, and the data directories.

Formatting happens only when `blkid -p` finds no signature on the disk AND
edgefit_data_disk_format is set (checked by the facts role before anything runs). Existing data
is never touched.
"""

import shlex

from pyinfra.api import deploy
from pyinfra.operations import server

from edgefit.images import RUN_AS_UID
from edgefit.plan import Plan

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


def data_directories(plan: Plan) -> dict[str, int]:
    """path -> the uid that must own it, for every data directory of the planned services."""
    directories = {plan.data_root: 0}
    for relative, service in DATA_DIRECTORIES.items():
        if service in plan.services:
            directories[f"{plan.data_root}/{relative}"] = RUN_AS_UID.get(service, 0)
    return directories


@deploy("Data disk and directories")
def prepare_volumes(plan: Plan, live: dict, facts: dict) -> None:
    root = plan.data_root
    if plan.data_disk:
        device = facts["data_device"]  # BlockDevice, read by check_and_plan before anything changed
        if device.get("mountpoint", "") != root:
            server.shell(
                name=f"Mount {plan.data_disk} at {root} by UUID",
                commands=[mount_command(plan.data_disk, root, bool(device.get("empty")))],
            )
    # Made and owned once; existing data is never touched beyond its top directory's owner.
    wrong = {path: uid for path, uid in data_directories(plan).items() if live["directories"].get(path) != uid}
    if wrong:
        steps = [f"mkdir -p {shlex.quote(path)} && chown {uid}:{uid} {shlex.quote(path)}" for path, uid in wrong.items()]
        server.shell(name=f"Data directories: {', '.join(sorted(wrong))}", commands=[" && ".join(steps)])
