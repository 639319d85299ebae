"""Role "host": kernel and system settings the stack needs, persisted across reboots."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server, systemd

from edgefit.plan import Plan
from edgefit.render import JOURNALD_CONF, SYSCTL_CONF, THP_UNIT, StackFile, file_at
from roles.common import any_changed, upload

SWAP_FILE = "/swapfile.edgefit"


@deploy("Tune the host")
def tune_host(plan: Plan, files: list[StackFile], facts: dict) -> None:
    sysctl = upload(file_at(files, SYSCTL_CONF))
    server.shell(name="Apply sysctl settings", commands=["sysctl -q --system"], _if=sysctl.did_change)

    thp = upload(file_at(files, THP_UNIT))
    # Reload only when the unit changed: an unconditional reload would be a change on every run.
    server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"], _if=thp.did_change)
    systemd.service(name="Transparent huge pages off, now and at boot", service="edgefit-thp.service",
                    running=True, enabled=True)

    journald = upload(file_at(files, JOURNALD_CONF))
    systemd.service(name="Restart journald with its size limits", service="systemd-journald",
                    restarted=True, _if=any_changed(journald))

    # The plan sizes the swap file (plan.swap_mib); a host that already has swap keeps its own.
    # It is not made when it would take more than half of the root disk's free space.
    swap_mib = plan.swap_mib
    if facts["swap_mib"] == 0 and swap_mib and facts["root_free_mib"] < 2 * swap_mib:
        host.noop(f"no swap file: {facts['root_free_mib']} MiB free on / is too little for {swap_mib} MiB of swap")
    elif facts["swap_mib"] == 0 and swap_mib:
        server.shell(
            name=f"Swap file of {swap_mib} MiB",
            commands=[
                f"test -e {SWAP_FILE} || (fallocate -l {swap_mib}M {SWAP_FILE} && chmod 600 {SWAP_FILE} && mkswap -q {SWAP_FILE})",
                f"swapon {SWAP_FILE}",
                f"grep -q '^{SWAP_FILE} ' /etc/fstab || echo '{SWAP_FILE} none swap sw 0 0' >> /etc/fstab",
            ],
        )
