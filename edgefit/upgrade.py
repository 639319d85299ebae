"""Upgrades with a health gate and rollback: the decisions and the sentences. Pure: no I/O.

A deploy is an upgrade when the image of a service in UPGRADED_SERVICES differs from the image
the plan of record (/etc/edgefit/plan.json, the last deploy that succeeded) holds. Then the
deploy (roles/upgrade.py) first takes the pre-upgrade backup on the host and keeps the previous
compose definition and plan of record beside it (edgefit/host_backup.py `pre-upgrade`), upgrades,
and gates: every healthcheck within edgefit_health_timeout, then verify's checks for the upgraded
services. A failed gate rolls back by itself (host_backup.py `rollback`: the previous compose
definition, the database and files of the backup, health waited for again) unless
edgefit_rollback = False. Migrations only go forward, so a release older than the one running is
refused unless edgefit_allow_downgrade = True.
"""

from __future__ import annotations

import re

from edgefit.host_backup import ROLLBACK_FROM

# Dify's own images: the ones whose release changes the database (api runs the migrations).
UPGRADED_SERVICES = ("api", "worker", "worker_beat", "web", "plugin_daemon", "sandbox")
BACKUP_SUBDIR = "pre-upgrade-backups"  # under the data root: on the data disk when there is one
BACKUPS_KEPT = 2
GATE_WINDOW_S = 10  # verify's sampling window for the upgraded services, once they are healthy
LOG_LINES = 20
# A rollback restores the database with Dify's services, the database and the broker stopped
# (host_backup.DATA_SERVICES), so they start again as on a first deploy: its health wait gets
# at least the default edgefit_health_timeout.
ROLLBACK_HEALTH_MIN_S = 900


def rollback_wait_s(health_timeout_s: int) -> int:
    return max(health_timeout_s, ROLLBACK_HEALTH_MIN_S)

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)")


class UpgradeRefused(ValueError):
    """An upgrade that must not start (a downgrade not asked for): one sentence."""


def image_changes(previous: dict[str, str] | None, planned: dict[str, str]) -> dict[str, tuple[str, str]]:
    """service -> (previous image, planned image) for the upgraded services whose image changes.
    previous: the plan of record's images (None: no record, a first deploy, never an upgrade)."""
    if not previous:
        return {}
    return {service: (previous[service], planned[service]) for service in UPGRADED_SERVICES
            if service in planned and service in previous and previous[service] != planned[service]}


def version_of(ref: str) -> tuple[int, ...] | None:
    """The release a reference's tag names (1.13.3 -> (1, 13, 3), v0.5.3-local -> (0, 5, 3)),
    None when the tag names none (or there is no tag)."""
    last = ref.split("@", 1)[0].rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    match = _VERSION.match(last.rsplit(":", 1)[1])
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _image_name(ref: str) -> str:
    """The image's own name without registry or tag: a mirror of dify-api is still dify-api."""
    return ref.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


def downgrades(changes: dict[str, tuple[str, str]]) -> list[str]:
    """One phrase per service whose new image is an older release of the same image (from any
    registry or mirror)."""
    found = []
    for service, (old, new) in sorted(changes.items()):
        old_version, new_version = version_of(old), version_of(new)
        if _image_name(old) == _image_name(new) and old_version and new_version and new_version < old_version:
            found.append(f"{service} {old} -> {new}")
    return found


def check_not_downgrade(changes: dict[str, tuple[str, str]], allowed: bool) -> None:
    found = downgrades(changes)
    if found and not allowed:
        raise UpgradeRefused(
            f"refusing a downgrade ({'; '.join(found)}): Dify's migrations only go forward, so an older "
            "release may not read the database the newer one left; to go back to the release before an "
            "upgrade use `edgefit rollback` (it restores the pre-upgrade backup), or set "
            "edgefit_allow_downgrade = True if you are sure")


BACKED_UP_FROM = ("db", "redis_broker")  # the pre-upgrade backup dumps and saves these live


def check_can_back_up(changes: dict[str, tuple[str, str]], down: list[str]) -> None:
    """An upgrade starts with a backup of the running database and broker: refused when they are down."""
    blocked = [service for service in BACKED_UP_FROM if service in down]
    if changes and blocked:
        raise UpgradeRefused(
            f"the upgrade ({upgrade_summary(changes)}) starts with a backup of the running database, but "
            f"{' and '.join(blocked)} {'is' if len(blocked) == 1 else 'are'} not running; deploy the current "
            "release first (that starts the stack), then upgrade")


def gate_failures(report: dict, services) -> list[dict]:
    """verify's failing findings (judge.evaluate's report) that name one of the upgraded services."""
    wanted = set(services)
    return [finding for finding in report.get("findings") or []
            if finding.get("severity") == "fail" and finding.get("service") in wanted]


def failing_services(health_output: list[str], services) -> list[str]:
    """The services the bounded health wait named as not healthy (roles/stack.py prints
    'SERVICE STATE HEALTH' lines after 'not healthy and stable'); the upgraded ones first."""
    named, seen = [], False
    for line in health_output:
        if line.startswith("not healthy and stable"):
            seen = True
            continue
        if line.startswith(("--- last log lines", "fix the service above")):
            break
        words = line.split()
        if seen and len(words) >= 2 and not words[1].startswith("restarts="):
            if words[0] not in named:
                named.append(words[0])
    wanted = set(services)
    return sorted(named, key=lambda name: name not in wanted)


def upgrade_summary(changes: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{service} {old} -> {new}" for service, (old, new) in sorted(changes.items()))


def failure_message(host: str, what: str, service: str | None, logs: list[str], backup: str,
                    rolled_back: bool | None) -> str:
    """The deploy's last words on a failed upgrade. rolled_back: True done, False tried and
    failed, None not tried (edgefit_rollback = False)."""
    head = f"{host}: the upgrade failed: {what}"
    tail = [f"last log lines of {service}:", *logs[-LOG_LINES:]] if service and logs else []
    if rolled_back:
        verdict = (f"it was rolled back: the previous images, and the database and files of the pre-upgrade "
                   f"backup {backup}, are running and healthy; fix or skip the release, then deploy again")
    elif rolled_back is False:
        verdict = (f"the automatic rollback failed too (above); the pre-upgrade backup is {backup}: "
                   "run `edgefit rollback INVENTORY --limit HOST` once the cause is fixed, or restore it by hand")
    else:
        verdict = (f"edgefit_rollback = False, so it was not rolled back; the pre-upgrade backup is {backup}: "
                   "`edgefit rollback INVENTORY --limit HOST` returns the host to the previous images and that data")
    return "\n".join([f"{head}; {verdict}", *tail])


def rollback_target(host: str, state: dict | None) -> str:
    """What `edgefit rollback` will do on a host (from its upgrade state.json), one line; UpgradeRefused
    when it has no upgrade to roll back."""
    if not state or state.get("status") not in ROLLBACK_FROM:
        done = state and state.get("status") == "rolled-back"
        raise UpgradeRefused(f"{host} has no upgrade to roll back"
                             + (f" (the last one, {state.get('upgrade')}, was rolled back already)" if done else "")
                             + ". Nothing was changed")
    return (f"{host}: undo {state.get('upgrade')} ({state.get('status')}, backed up at {state.get('at')}): "
            f"the previous images, and the data of {state.get('backup')}")
