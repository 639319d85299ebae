"""Role "host": kernel and system settings the stack needs, persisted across reboots."""

from pyinfra.api import deploy
from pyinfra.operations import server, systemd

from edgefit.plan import Plan
from edgefit.render import StackFile
from roles.common import any_changed, host_file, upload

SWAP_FILE = "/swapfile.edgefit"
MIN_SWAP_MIB = 256


@deploy("Tune the host")
def tune_host(plan: Plan, files: list[StackFile], facts: dict) -> None:
    sysctl = upload(host_file(files, "sysctl.d/90-edgefit.conf"))
    server.shell(name="Apply sysctl settings", commands=["sysctl -q --system"], _if=sysctl.did_change)

    thp = upload(host_file(files, "system/edgefit-thp.service"))
    # Reload only when the unit changed: an unconditional reload would be a change on every run.
    server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"], _if=thp.did_change)
    systemd.service(name="Transparent huge pages off, now and at boot", service="edgefit-thp.service",
                    running=True, enabled=True)

    journald = upload(host_file(files, "journald.conf.d/90-edgefit.conf"))
    systemd.service(name="Restart journald with its size limits", service="systemd-journald",
                    restarted=True, _if=any_changed(journald))

    # Swap for the host's own daemons on small hosts; containers cannot use it (memswap_limit).
    # Never more than a quarter of the free root disk.
    swap_mib = min(plan.swap_mib, facts["root_free_mib"] // 4)
    if facts["swap_mib"] == 0 and swap_mib >= MIN_SWAP_MIB:
        server.shell(
            name=f"Swap file of {swap_mib} MiB",
            commands=[
                f"test -e {SWAP_FILE} || (fallocate -l {swap_mib}M {SWAP_FILE} && chmod 600 {SWAP_FILE} && mkswap -q {SWAP_FILE})",
                f"swapon {SWAP_FILE}",
                f"grep -q '^{SWAP_FILE} ' /etc/fstab || echo '{SWAP_FILE} none swap sw 0 0' >> /etc/fstab",
            ],
        )
