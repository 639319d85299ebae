"""Role "host": kernel and system settings the stack needs, persisted across reboots.

The files themselves (sysctl, journald, the THP unit, drop-ins) are placed by place_files; this
role applies what changed: systemd reloads, sysctl values, journald, transparent huge pages off,
and the swap file the plan sizes. Each step only when the host's state asks for it.
"""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from edgefit.converge import Changes
from edgefit.plan import Plan
from edgefit.render import THP_UNIT

SWAP_FILE = "/swapfile.edgefit"
THP_SERVICE = THP_UNIT.rsplit("/", 1)[1]


def unit_ready(live: dict, unit: str) -> bool:
    state = live["units"].get(unit) or {}
    return state.get("enabled") == "enabled" and state.get("active") == "active"


@deploy("Tune the host")
def tune_host(plan: Plan, changes: Changes, live: dict, facts: dict) -> None:
    if changes.reload_systemd:
        server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"])
    if changes.apply_sysctl:
        server.shell(name="Apply sysctl settings", commands=["sysctl -q --system"])
    thp_changed = any(f.dest == THP_UNIT for f in changes.upload)
    if thp_changed or not unit_ready(live, THP_SERVICE):
        server.shell(name="Transparent huge pages off, now and at boot",
                     commands=[f"systemctl enable {THP_SERVICE} && systemctl restart {THP_SERVICE}"])
    if changes.restart_journald:
        server.shell(name="Restart journald with its size limits", commands=["systemctl restart systemd-journald"])

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
