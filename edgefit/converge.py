"""What a deploy must do to bring a host to its plan: the rendered files and the host's live
state in (one read, edgefit.facts.HostState), a list of changes out. Pure: no I/O.

Drift is judged by the same functions verify uses (edgefit/judge.py: limit_drift, redis_drift,
postgres_drift), so a host verify passes is a host the deploy leaves alone, and a host verify
fails on drift is one the deploy heals. A restart does not depend on a file changing in the same
run: a service whose config file is newer than its container's start is restarted, so a deploy
interrupted between an upload and its restart is finished by the next run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from edgefit.expectations import expectations
from edgefit.judge import limit_drift, parse_docker_time, postgres_drift, redis_drift
from edgefit.plan import Plan
from edgefit.render import (DAEMON_JSON, DB_ROLES_SQL, JOURNALD_CONF, PLAN_OF_RECORD, STACK_DIR, SYSCTL_CONF,
                            StackFile)
from edgefit.upgrade import image_changes

COMPOSE_DEFINITION = (f"{STACK_DIR}/docker-compose.yml", f"{STACK_DIR}/.env")
# Left by the step that places a new compose definition, removed once `docker compose up` ran:
# a deploy interrupted in between finishes the job on the next run.
COMPOSE_UP_PENDING = "/var/lib/edgefit/compose-up-pending"
# Written (epoch seconds) by the step that runs `docker compose up`, just before it: a container
# started after it was started with every file of this run in place, so it needs no restart of
# its own (roles/stack.py). On the test hosts a restore's compose up recreated redis and the
# restart that followed took 22 s more, for nothing.
COMPOSE_UP_STARTED = "/var/lib/edgefit/compose-up-started"
# Services that re-read their files in place. nginx checks the new files (`nginx -t`) and then
# re-reads them on a HUP: a changed nginx.conf or certificate drops no connection, and the
# container, its health and its published ports stay as they are (a restart re-attaches the
# container to its networks and waits for its first probe, 30 s, before the deploy goes on).
# The marker's mtime is when it last re-read them, so a deploy interrupted between an upload
# and the reload is finished by the next run, as a restart is.
RELOADED_IN_PLACE = ("nginx",)


def reload_marker(service: str) -> str:
    return f"/var/lib/edgefit/reloaded-{service}"


@dataclass
class Changes:
    """Everything the deploy will do on one host; empty means a host at its plan."""

    upload: list[StackFile] = field(default_factory=list)  # changed or missing files (not the record)
    record: StackFile | None = None  # the plan of record, when it differs (written last)
    reload_systemd: bool = False
    apply_sysctl: bool = False
    restart_journald: bool = False
    restart_docker: bool = False  # daemon.json changed: dockerd must read it
    recreate_all: bool = False  # ... and every container must be made again to pick it up
    compose_up: bool = False  # the compose definition changed, or services are missing / stopped
    recreate: dict[str, str] = field(default_factory=dict)  # service -> why (limits or image drifted)
    restart: dict[str, str] = field(default_factory=dict)  # service -> why (config file or live setting)
    reload: dict[str, str] = field(default_factory=dict)  # service -> why (its files changed; RELOADED_IN_PLACE)
    reasons: list[str] = field(default_factory=list)  # for the operation names: why compose up
    images_missing: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)  # running but unhealthy or still starting
    # service -> (image of the plan of record, planned image) for Dify's own images: an upgrade,
    # gated and rolled back on failure (roles/upgrade.py)
    upgrade: dict[str, tuple[str, str]] = field(default_factory=dict)
    down: list[str] = field(default_factory=list)  # planned services missing or not running
    db_roles: bool = False  # apply roles.sql: Dify's and the plugin daemon's Postgres roles and passwords

    @property
    def touches_containers(self) -> bool:
        return bool(self.recreate_all or self.compose_up or self.recreate or self.restart or self.reload)

    @property
    def wait_healthy(self) -> bool:
        return self.touches_containers or bool(self.unsettled)

    def upload_names(self) -> str:
        names = [f.dest for f in self.upload]
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def changed_files(rendered: list[StackFile], live_files: dict) -> list[StackFile]:
    """Files whose content, mode or owner on the host is not the rendered one (or that are missing).
    live_files: dest -> {"sha256", "mode", "uid"} or None for a missing file."""
    changed = []
    for stack_file in rendered:
        live = live_files.get(stack_file.dest)
        if (live is None or live.get("sha256") != sha256(stack_file.content)
                or live.get("mode") != stack_file.mode or live.get("uid") != (stack_file.owner_uid or 0)):
            changed.append(stack_file)
    return changed


def _container_views(snapshot: dict | None) -> dict[str, dict]:
    """service -> the sampler's view of its (running first) container."""
    views: dict[str, dict] = {}
    for record in (snapshot or {}).get("containers") or []:
        view = record.get("end") or record.get("start") or {}
        service = view.get("service")
        if service and (service not in views or view.get("running")):
            views[service] = {**view, "cgroup_max": (record.get("cgroup_end") or record.get("cgroup_start") or {}).get("max")}
    return views


def decide(plan: Plan, rendered: list[StackFile], live: dict) -> Changes:
    """live: edgefit.facts.HostState's result."""
    changes = Changes()
    files = [f for f in rendered if f.dest != PLAN_OF_RECORD]
    record = next(f for f in rendered if f.dest == PLAN_OF_RECORD)
    changes.upload = changed_files(files, live["files"])
    if changed_files([record], live["files"]):
        changes.record = record
    uploaded = {f.dest for f in changes.upload}

    changes.reload_systemd = any(f.systemd_unit for f in changes.upload) or bool(live.get("units_need_reload"))
    sysctl = next(f for f in rendered if f.dest == SYSCTL_CONF)
    changes.apply_sysctl = SYSCTL_CONF in uploaded or _sysctl_differs(sysctl.content, live.get("sysctl") or {})
    changes.restart_journald = JOURNALD_CONF in uploaded

    views = _container_views(live.get("snapshot"))
    created = [parse_docker_time(v.get("created")) for v in views.values()]
    oldest_container = min((t for t in created if t is not None), default=None)
    daemon_mtime = (live["files"].get(DAEMON_JSON) or {}).get("mtime")
    changes.restart_docker = DAEMON_JSON in uploaded
    # A daemon.json newer than the oldest container: it was changed after they were made (this run,
    # or a run interrupted before it recreated them); live-restore keeps old containers as they were.
    changes.recreate_all = bool(views) and (changes.restart_docker or (
        daemon_mtime is not None and oldest_container is not None and daemon_mtime > oldest_container))

    if any(d in uploaded for d in COMPOSE_DEFINITION):
        changes.reasons.append("compose definition changed")
    elif COMPOSE_UP_PENDING in live["files"]:
        changes.reasons.append("a compose definition placed by an interrupted deploy")
    missing = [s for s in plan.services if s not in views]
    stopped = [s for s in plan.services if s in views and not views[s].get("running")]
    orphans = [s for s in views if s not in plan.services]
    changes.down = sorted(missing + stopped)
    for label, names in (("missing", missing), ("not running", stopped), ("not in the plan", orphans)):
        if names:
            changes.reasons.append(f"{label}: {', '.join(sorted(names))}")
    changes.images_missing = missing_images([service.image for service in plan.services.values()], live["images"])
    if changes.images_missing:
        changes.reasons.append(f"{len(changes.images_missing)} image(s) missing")
    changes.compose_up = bool(changes.reasons) and not changes.recreate_all
    # The roles' passwords are in .env; a cluster made, restored or restarted by this run may lack
    # them (a restore brings tables the superuser made): roles.sql runs again, as it is idempotent.
    changes.db_roles = bool(uploaded & {DB_ROLES_SQL, f"{STACK_DIR}/.env"}) or changes.compose_up or changes.recreate_all
    changes.upgrade = image_changes(live.get("record_images"),
                                    {name: service.image for name, service in plan.services.items()})

    expected = expectations(plan, [])
    for service, view in views.items():
        if service not in plan.services or not view.get("running") or changes.recreate_all:
            continue
        limit = view.get("cgroup_max") if view.get("cgroup_max") is not None else (view.get("memory_bytes") or "max")
        drift = [message for _, _, message in limit_drift(service, expected["services"][service], limit, view.get("nano_cpus"))]
        if view.get("image") != plan.services[service].image:
            drift.append(f"{service} runs {view.get('image')}, the plan says {plan.services[service].image}")
        if drift:
            changes.recreate[service] = "; ".join(drift)
            continue
        if (view.get("health") or {}).get("status") in ("unhealthy", "starting"):
            changes.unsettled.append(service)
        reason = _restart_reason(service, files, uploaded, live, view, expected)
        if reason:
            (changes.reload if service in RELOADED_IN_PLACE else changes.restart)[service] = reason
    return changes


def _restart_reason(service: str, files: list[StackFile], uploaded: set, live: dict, view: dict,
                    expected: dict) -> str | None:
    own = [f for f in files if service in f.services]
    changed = [f.dest for f in own if f.dest in uploaded]
    if changed:
        return f"{', '.join(changed)} changed"
    started = parse_docker_time(view.get("started_at"))
    reloaded = (live["files"].get(reload_marker(service)) or {}).get("mtime")
    if service in RELOADED_IN_PLACE and started is not None and reloaded is not None:
        started = max(started, reloaded)
    stale = [f.dest for f in own if started is not None and ((live["files"].get(f.dest) or {}).get("mtime") or 0) > started]
    if stale:
        return f"{', '.join(stale)} is newer than the running container"
    checks = (live.get("snapshot") or {}).get("checks") or {}
    if service in expected["redis"]:
        got = (checks.get("redis") or {}).get(service) or {}
        drift = redis_drift(service, expected["redis"][service], got.get("config") or {}, got.get("info") or {})
        if drift:
            return "; ".join(message for _, message in drift)
    if service == "db":
        drift = postgres_drift(expected["postgres"], (checks.get("postgres") or {}).get("settings") or {})
        if drift:
            return "; ".join(drift)
    return None


def missing_images(refs: list[str], present: list[str]) -> list[str]:
    """Planned image references the host does not have (docker images lists name:tag and
    name@digest; a name:tag@digest reference is present when its digest is)."""
    have = set(present)
    missing = []
    for ref in sorted(set(refs)):
        name_tag, _, digest = ref.partition("@")
        candidates = {ref} if not digest else {f"{name_tag.rsplit(':', 1)[0] if ':' in name_tag.rsplit('/', 1)[-1] else name_tag}@{digest}"}
        if not candidates & have:
            missing.append(ref)
    return missing


def _sysctl_differs(content: str, live: dict[str, str]) -> bool:
    for line in content.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and live.get(key.strip()) != value.strip():
            return True
    return False


def sysctl_keys(content: str) -> tuple[str, ...]:
    return tuple(line.partition("=")[0].strip() for line in content.splitlines()
                 if "=" in line and not line.lstrip().startswith("#"))
