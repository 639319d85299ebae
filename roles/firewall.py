"""Role "firewall": nftables lets only SSH, 80 and 443 in, Docker's published ports included.

The ruleset (/etc/edgefit/firewall.nft, one table `inet edgefit`, rendered by edgefit/render.py
from templates/firewall.nft.j2, which explains why Docker cannot bypass it) and its unit
edgefit-firewall.service (loads it at boot, before the network and Docker) are placed by
place_files. This role installs nftables when the host lacks it, and loads the table when the
ruleset changed or the unit is not active: checked first (`nft -c`), refused when sshd listens on
a port the table would close, loaded whole by the unit (`nft -f`: one transaction, only edgefit's
table), and read back after. Established connections are accepted before anything else, so the
deploying SSH session is never cut. With edgefit_firewall = False the unit, the file and the
table are removed. A host at its plan gets no operation.
"""

import shlex

from pyinfra.api import deploy
from pyinfra.operations import apt, server

from edgefit.converge import Changes
from edgefit.plan import Plan
from edgefit.render import FIREWALL_RULES, FIREWALL_UNIT
from roles.host import unit_ready

NFT = "/usr/sbin/nft"
UNIT = FIREWALL_UNIT.rsplit("/", 1)[1]
TABLE = "inet edgefit"


def ssh_guard_command(allowed: list[int]) -> str:
    """Fails (with one sentence) when sshd listens on a TCP port the table would not allow."""
    ports = " ".join(str(port) for port in allowed)
    return ("if command -v ss >/dev/null; then for p in $(ss -Hltnp 2>/dev/null | awk '/\"sshd\"/ {n=split($4,a,\":\"); "
            "print a[n]}' | sort -u); do case \" " + ports + " \" in *\" $p \"*) ;; *) echo \"edgefit: sshd listens "
            "on port $p, which the firewall would close; set ssh_port in host data (or edgefit_firewall = False)\" >&2; "
            "exit 1;; esac; done; fi")


def apply_command(allowed: list[int]) -> str:
    rules = shlex.quote(FIREWALL_RULES)
    return " && ".join([
        f"{NFT} -c -f {rules}",
        ssh_guard_command(allowed),
        f"systemctl enable {UNIT}",
        f"systemctl restart {UNIT}",
        f"{NFT} list table {TABLE} >/dev/null",
    ])


def remove_command() -> str:
    return "; ".join([f"systemctl disable --now {UNIT} 2>/dev/null", f"{NFT} delete table {TABLE} 2>/dev/null",
                      f"rm -f {shlex.quote(FIREWALL_RULES)} {shlex.quote(FIREWALL_UNIT)}", "systemctl daemon-reload",
                      "true"])


@deploy("Host firewall")
def configure_firewall(plan: Plan, changes: Changes, live: dict) -> None:
    if not plan.firewall:
        if FIREWALL_RULES in live["files"] or FIREWALL_UNIT in live["files"]:
            server.shell(name="Remove edgefit's firewall (edgefit_firewall is off)", commands=[remove_command()])
        return
    if NFT not in live["files"]:
        apt.packages(name="nftables", packages=["nftables"], update=True)
    changed = any(f.dest == FIREWALL_RULES for f in changes.upload)
    if changed or not unit_ready(live, UNIT):
        allowed = sorted({22, plan.ssh_port})
        server.shell(name=f"Firewall: only SSH ({', '.join(map(str, allowed))}), 80 and 443 in",
                     commands=[apply_command(allowed)])
