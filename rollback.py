"""`pyinfra INVENTORY rollback.py`: each host back to before its last upgrade.

The host's upgrade state (/var/lib/edgefit/upgrade/state.json, written by the deploy's
pre-upgrade step) names the backup taken before the upgrade; edgefit/host_backup.py `rollback`
restores it (the current data kept aside under DATA_ROOT/.pre-restore-TIME/, as any restore),
puts back the compose definition and plan of record the upgrade replaced, and starts the stack;
then the deploy's own bounded health wait runs. A host with no upgrade to roll back fails with
that sentence and is not changed. The inventory still names the newer release: change it before
the next deploy, which would otherwise upgrade again. `edgefit rollback` runs this file, asking
first, then verify.
"""

from pyinfra import host
from pyinfra.operations import files, server

from edgefit import host_backup
from edgefit.settings import read_settings
from edgefit.upgrade import rollback_wait_s
from roles.stack import wait_healthy_command

settings = read_settings(host.data)
files.put(name="edgefit's backup script", src=host_backup.__file__, dest=host_backup.HOST_SCRIPT, mode="644")
server.shell(name="Roll back the last upgrade (previous images, the pre-upgrade backup's data)",
             commands=[f"python3 {host_backup.HOST_SCRIPT} rollback"])
server.shell(name="Wait until every service is healthy", commands=[wait_healthy_command(rollback_wait_s(settings.health_timeout_s))])
