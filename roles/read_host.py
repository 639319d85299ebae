"""Role "read_host": one read of everything the deploy compares, and the decision what to change.

One command (edgefit.facts.HostState) reads the placed files' hashes, the containers, images,
units and live settings; edgefit/converge.py turns that into the host's Changes. The roles after
this one only carry those changes out, so a host at its plan costs this one read and nothing else.
"""

from pyinfra import host
from pyinfra.api import DeployError, deploy

from edgefit.converge import COMPOSE_UP_PENDING, RELOADED_IN_PLACE, Changes, decide, reload_marker, sysctl_keys
from edgefit.facts import HostState
from edgefit.plan import Plan
from edgefit.render import (ACME_ISSUED, FIREWALL_RULES, FIREWALL_UNIT, SYSCTL_CONF, THP_UNIT, VERIFY_SERVICE,
                            VERIFY_TIMER, StackFile, file_at)
from edgefit.settings import DeploySettings
from edgefit.upgrade import UpgradeRefused, check_can_back_up, check_not_downgrade, upgrade_summary
from roles.firewall import NFT, UNIT as FIREWALL_SERVICE
from roles.tls import ACME_CERT, ACME_KEY, SELF_SIGNED_CERT, SELF_SIGNED_KEY
from roles.volumes import data_directories

UNITS = ("docker.service", THP_UNIT.rsplit("/", 1)[1], VERIFY_TIMER.rsplit("/", 1)[1], FIREWALL_SERVICE)


@deploy("Read the host")
def read_host_and_decide(plan: Plan, rendered: list[StackFile], settings: DeploySettings) -> tuple[dict, Changes]:
    paths = sorted({f.dest for f in rendered} | {VERIFY_SERVICE, VERIFY_TIMER, COMPOSE_UP_PENDING,
                                                 SELF_SIGNED_CERT, SELF_SIGNED_KEY, ACME_CERT, ACME_KEY, ACME_ISSUED,
                                                 FIREWALL_RULES, FIREWALL_UNIT, NFT}
                   | {reload_marker(service) for service in RELOADED_IN_PLACE})
    live = host.get_fact(HostState, paths=tuple(paths), directories=tuple(data_directories(plan)),
                         refs=tuple(sorted({s.image for s in plan.services.values()})), units=UNITS,
                         sysctl_keys=sysctl_keys(file_at(rendered, SYSCTL_CONF).content))
    changes = decide(plan, rendered, live)
    try:
        check_not_downgrade(changes.upgrade, settings.allow_downgrade)
        check_can_back_up(changes.upgrade, changes.down)
    except UpgradeRefused as error:
        raise DeployError(f"{host.name}: {error}. Nothing was changed on any host.") from None
    if changes.upgrade:
        host.noop(f"upgrade: {upgrade_summary(changes.upgrade)} (backup first, then a health gate"
                  + (", rolled back on failure)" if settings.rollback else "; edgefit_rollback = False)"))
    for service, why in {**changes.recreate, **changes.restart, **changes.reload}.items():
        host.noop(f"{service}: {why}")
    return live, changes
