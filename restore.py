"""`pyinfra INVENTORY restore.py --data backup_from=DIR`: put a backup onto each host's stack.

DIR is a backup on the control machine (what `edgefit backup` copied back, backups/HOST/STAMP).
Every checksum of it is checked here first: a damaged or mismatching backup stops the run before
any host is touched. Then it is uploaded to /var/backups/edgefit/.incoming-STAMP/ and
edgefit/host_backup.py restores it on the host: the host's current data is kept aside under
DATA_ROOT/.pre-restore-TIME/ (never deleted), each database is restored with pg_restore, then
the files, the broker Redis' data and the secrets file. The host keeps its own plan. The stack
is left stopped: run deploy.py next, which renders the restored secrets and starts it
(`edgefit restore` runs both, then verify).
"""

import os

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.operations import files, server

from edgefit import host_backup

source = host.data.get("backup_from")
if not source:
    raise DeployError(f"{host.name}: restore.py needs --data backup_from=DIR, a backup directory on this "
                      "machine (e.g. backups/HOST/STAMP). Nothing was changed.")
try:
    manifest = host_backup.check_backup(str(source))
except host_backup.BackupError as error:
    raise DeployError(f"{error}. Nothing was changed on any host.") from None

incoming = f"{host_backup.BACKUP_ROOT}/.incoming-{manifest['name']}"
files.directory(name=f"Directory {incoming}", path=incoming, mode="700")
for file_name in [*sorted(manifest["files"]), host_backup.MANIFEST]:
    files.put(name=f"Upload {file_name}", src=os.path.join(str(source), file_name),
              dest=f"{incoming}/{file_name}", mode="600")
files.put(name="edgefit's backup script", src=host_backup.__file__, dest=host_backup.HOST_SCRIPT, mode="644")
server.shell(
    name=f"Restore backup {manifest['name']} of {manifest.get('host')} (the stack stays stopped)",
    commands=[f"python3 {host_backup.HOST_SCRIPT} restore --dir {incoming}"],
)
