"""`pyinfra INVENTORY backup.py`: a consistent backup of each host's stack, made on the host.

Under /var/backups/edgefit/STAMP/ (0700, files 0600): a pg_dump -Fc of every database of the
stack's Postgres, the storage and plugin daemon directories, the broker Redis' snapshot, the
secrets file, and manifest.json (the plan of record, image references, sizes and sha256). The
work is edgefit/host_backup.py's, run on the host. Options, as `--data NAME=VALUE`:
backup_name (default: the UTC time, e.g. 20250101T120000Z), backup_keep (complete backups kept
on the host, default 3). `edgefit backup` runs this file and copies the result back.
"""

import shlex

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.operations import files, server

from edgefit import host_backup

name = str(host.data.get("backup_name") or host_backup.stamp_now())
keep = host.data.get("backup_keep") or 3
if not host_backup.STAMP.match(name) or not str(keep).isdigit() or int(keep) < 1:
    raise DeployError(f"{host.name}: backup_name must look like {host_backup.stamp_now()} and backup_keep be "
                      f"a whole number of 1 or more (got {name!r}, {keep!r}). Nothing was changed.")

files.put(name="edgefit's backup script", src=host_backup.__file__, dest=host_backup.HOST_SCRIPT, mode="644")
server.shell(
    name=f"Back up the stack to {host_backup.BACKUP_ROOT}/{name}",
    commands=[f"python3 {host_backup.HOST_SCRIPT} backup --host {shlex.quote(host.name)} --name {name} --keep {int(keep)}"],
)
