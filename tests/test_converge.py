"""edgefit/converge.py: what a deploy does to a host, decided from one read of it. A host at its
plan gets nothing; each kind of drift verify reports gets the one change that heals it."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import pytest

from edgefit.converge import COMPOSE_UP_PENDING, decide, missing_images, reload_marker, sha256, sysctl_keys
from edgefit.expectations import expectations
from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import PLAN_OF_RECORD, render_stack
from edgefit.secrets import Secrets

MIB = 1024 * 1024
FILES_AT, CONTAINERS_AT = 1_000_000.0, 2_000_000.0  # files placed, then containers started


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


@pytest.fixture(scope="module")
def plan():
    return make_plan(HostSize(2, 4096, 40, 16), Options(data_disk="/dev/vdb"))


@pytest.fixture(scope="module")
def rendered(plan):
    return render_stack(plan, Secrets.generate())


def at_plan(plan, rendered) -> dict:
    """The HostState of a host exactly at its plan."""
    expected = expectations(plan, rendered)
    files = {f.dest: {"sha256": sha256(f.content), "mode": f.mode, "uid": f.owner_uid or 0, "mtime": FILES_AT}
             for f in rendered}
    containers = []
    for service, planned in plan.services.items():
        view = {"service": service, "running": True, "image": planned.image, "created": stamp(CONTAINERS_AT),
                "started_at": stamp(CONTAINERS_AT), "memory_bytes": planned.mem_limit_mib * MIB,
                "nano_cpus": int(planned.cpus * 1e9), "health": {"status": "healthy"}}
        containers.append({"start": view, "end": view, "cgroup_end": {"max": planned.mem_limit_mib * MIB}})
    redis = {service: {"config": {"maxmemory": str(want["maxmemory_bytes"]), "maxmemory-policy": want["policy"]},
                       "info": {}} for service, want in expected["redis"].items()}
    units = {"kB": "kB", "8kB": "8kB", "MB": "MB", "ms": "ms"}
    settings = {}
    for name, value in expected["postgres"].items():
        if isinstance(value, int) and name.endswith(("_mem", "_buffers", "_size", "cache_size")):
            settings[name] = {"setting": str(value // 1024), "unit": units["kB"]}
        elif name == "idle_in_transaction_session_timeout":
            settings[name] = {"setting": str(value), "unit": "ms"}
        else:
            settings[name] = {"setting": str(value), "unit": ""}
    sysctl = next(f for f in rendered if f.dest.endswith("90-edgefit.conf") and "sysctl" in f.dest).content
    return {
        "files": files, "directories": {},
        "units": {u: {"enabled": "enabled", "active": "active", "need_reload": False}
                  for u in ("docker.service", "edgefit-thp.service")},
        "units_need_reload": [],
        "sysctl": {key: line.partition("=")[2].strip() for key, line in
                   zip(sysctl_keys(sysctl), [l for l in sysctl.splitlines() if "=" in l and not l.startswith("#")])},
        "images": sorted({s.image for s in plan.services.values()}), "compose_version": "2.40.3",
        "snapshot": {"containers": containers, "checks": {"redis": redis, "postgres": {"settings": settings}}},
    }


def container(live: dict, service: str) -> dict:
    return next(r["end"] for r in live["snapshot"]["containers"] if r["end"]["service"] == service)


def nothing_to_do(changes) -> bool:
    return not (changes.upload or changes.record or changes.reload_systemd or changes.apply_sysctl
                or changes.restart_journald or changes.restart_docker or changes.wait_healthy or changes.images_missing)


def test_a_host_at_its_plan_gets_no_change(plan, rendered):
    assert nothing_to_do(decide(plan, rendered, at_plan(plan, rendered)))


def test_a_bare_host_gets_every_file_docker_restarted_and_the_stack_started(plan, rendered):
    live = {"files": {}, "directories": {}, "units": {}, "units_need_reload": [], "sysctl": {}, "images": [],
            "compose_version": None, "snapshot": None}
    changes = decide(plan, rendered, live)
    assert {f.dest for f in changes.upload} == {f.dest for f in rendered} - {PLAN_OF_RECORD}
    assert changes.record and changes.restart_docker and changes.compose_up and changes.reload_systemd
    assert not changes.recreate_all and changes.wait_healthy and changes.apply_sysctl
    assert len(changes.images_missing) == len({s.image for s in plan.services.values()})


def test_one_changed_config_restarts_only_its_service(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/conf/pgbouncer/pgbouncer.ini"]["sha256"] = "0" * 64
    changes = decide(plan, rendered, live)
    assert [f.dest for f in changes.upload] == ["/opt/edgefit/conf/pgbouncer/pgbouncer.ini"]
    assert list(changes.restart) == ["pgbouncer"] and not changes.compose_up and not changes.recreate
    assert not changes.reload and changes.wait_healthy


def test_a_changed_nginx_conf_is_reloaded_in_place_not_restarted(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/conf/nginx/nginx.conf"]["sha256"] = "0" * 64
    changes = decide(plan, rendered, live)
    assert [f.dest for f in changes.upload] == ["/opt/edgefit/conf/nginx/nginx.conf"]
    assert list(changes.reload) == ["nginx"] and not changes.restart and not changes.compose_up
    assert changes.wait_healthy


def test_a_reload_counts_as_applying_the_files_and_an_interrupted_one_is_finished(plan, rendered):
    """nginx's container keeps its start time across a reload: the reload's marker says when it
    last read its files, so a file placed before it is applied and one placed after is not."""
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/conf/nginx/nginx.conf"]["mtime"] = CONTAINERS_AT + 60
    changes = decide(plan, rendered, live)
    assert list(changes.reload) == ["nginx"] and "newer than the running container" in changes.reload["nginx"]
    live["files"][reload_marker("nginx")] = {"sha256": sha256(""), "mode": 0o644, "uid": 0, "mtime": CONTAINERS_AT + 61}
    assert nothing_to_do(decide(plan, rendered, live))
    live["files"]["/opt/edgefit/conf/nginx/nginx.conf"]["mtime"] = CONTAINERS_AT + 62
    assert list(decide(plan, rendered, live).reload) == ["nginx"]
    live = at_plan(plan, rendered)  # another service's marker would not count: only nginx reloads
    live["files"]["/opt/edgefit/conf/pgbouncer/pgbouncer.ini"]["mtime"] = CONTAINERS_AT + 60
    live["files"][reload_marker("pgbouncer")] = {"sha256": sha256(""), "mode": 0o644, "uid": 0, "mtime": CONTAINERS_AT + 61}
    assert list(decide(plan, rendered, live).restart) == ["pgbouncer"]


def test_a_changed_environment_is_compose_ups_job(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/.env"]["sha256"] = "0" * 64
    changes = decide(plan, rendered, live)
    assert changes.compose_up and changes.reasons == ["compose definition changed"] and not changes.restart


def test_a_mode_or_owner_changed_by_hand_is_put_back(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/.env"]["mode"] = 0o644
    live["files"]["/opt/edgefit/conf/redis/redis.conf"]["uid"] = 0
    assert {f.dest for f in decide(plan, rendered, live).upload} == {"/opt/edgefit/.env", "/opt/edgefit/conf/redis/redis.conf"}


def test_a_deploy_interrupted_between_upload_and_restart_is_finished(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/conf/pgbouncer/pgbouncer.ini"]["mtime"] = CONTAINERS_AT + 60  # placed, not applied
    changes = decide(plan, rendered, live)
    assert not changes.upload and list(changes.restart) == ["pgbouncer"]
    assert "newer than the running container" in changes.restart["pgbouncer"]
    live = at_plan(plan, rendered)
    live["files"][COMPOSE_UP_PENDING] = {"sha256": sha256(""), "mode": 0o644, "uid": 0, "mtime": CONTAINERS_AT + 60}
    assert decide(plan, rendered, live).compose_up


def test_limits_changed_with_docker_update_recreate_that_container(plan, rendered):
    live = at_plan(plan, rendered)
    worker = next(r for r in live["snapshot"]["containers"] if r["end"]["service"] == "worker")
    worker["cgroup_end"]["max"] = 900 * MIB
    container(live, "api")["nano_cpus"] = int(0.5e9)
    changes = decide(plan, rendered, live)
    assert sorted(changes.recreate) == ["api", "worker"]
    assert "900 MiB" in changes.recreate["worker"] and "CPU ceiling" in changes.recreate["api"]


def test_a_stopped_service_is_started(plan, rendered):
    live = at_plan(plan, rendered)
    container(live, "sandbox")["running"] = False
    changes = decide(plan, rendered, live)
    assert changes.compose_up and changes.reasons == ["not running: sandbox"]


def test_redis_and_postgres_settings_changed_live_restart_them(plan, rendered):
    live = at_plan(plan, rendered)
    live["snapshot"]["checks"]["redis"]["redis"]["config"]["maxmemory-policy"] = "noeviction"
    live["snapshot"]["checks"]["postgres"]["settings"]["max_connections"]["setting"] = "500"
    changes = decide(plan, rendered, live)
    assert sorted(changes.restart) == ["db", "redis"]
    assert "maxmemory-policy is noeviction" in changes.restart["redis"]


def test_a_daemon_json_newer_than_the_containers_recreates_them_all(plan, rendered):
    live = at_plan(plan, rendered)
    live["files"]["/etc/docker/daemon.json"]["mtime"] = CONTAINERS_AT + 5
    changes = decide(plan, rendered, live)
    assert changes.recreate_all and not changes.compose_up and not changes.restart_docker


def test_host_settings_drift_is_applied(plan, rendered):
    live = at_plan(plan, rendered)
    live["sysctl"]["vm.swappiness"] = "60"
    live["units_need_reload"] = ["docker.service"]
    changes = decide(plan, rendered, live)
    assert changes.apply_sysctl and changes.reload_systemd and not changes.upload


def test_an_unhealthy_service_is_waited_for(plan, rendered):
    live = at_plan(plan, rendered)
    container(live, "api")["health"] = {"status": "unhealthy"}
    changes = decide(plan, rendered, live)
    assert changes.unsettled == ["api"] and changes.wait_healthy and not changes.touches_containers


def test_images_are_found_by_tag_or_digest():
    digest = "sha256:" + "a" * 64
    present = ["redis:7.2.7-alpine", f"registry.lan:5000/pgvector@{digest}"]
    refs = ["redis:7.2.7-alpine", f"registry.lan:5000/pgvector:0.8.0@{digest}", "nginx:1.27.5-alpine"]
    assert missing_images(refs, present) == ["nginx:1.27.5-alpine"]


def test_the_plan_of_record_alone_changing_is_only_a_record(plan, rendered):
    live = copy.deepcopy(at_plan(plan, rendered))
    live["files"][PLAN_OF_RECORD]["sha256"] = "0" * 64
    changes = decide(plan, rendered, live)
    assert changes.record and not changes.upload and not changes.wait_healthy


def test_changed_files_go_up_in_one_archive_with_their_modes_and_owners(plan, rendered):
    import io
    import tarfile

    from roles.place_files import archive

    chosen = [f for f in rendered if f.dest.endswith(("redis/redis.conf", "nginx.conf", "/.env"))]
    payload = archive(chosen)
    assert payload == archive(list(reversed(chosen)))  # deterministic: same files, same bytes
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {f.dest.lstrip("/") for f in chosen}
        for f in chosen:
            member = members[f.dest.lstrip("/")]
            assert member.mode == f.mode and member.uid == (f.owner_uid or 0) and member.isfile()
            assert tar.extractfile(member).read().decode() == f.content


def test_the_postgres_roles_are_applied_when_the_cluster_or_their_passwords_may_be_new(plan, rendered):
    """roles.sql runs when its file or .env (the passwords) changed, or the stack comes up (a new
    or restored cluster); never on a host at its plan."""
    assert not decide(plan, rendered, at_plan(plan, rendered)).db_roles
    for changed in ("/opt/edgefit/.env", "/opt/edgefit/conf/postgres/roles.sql"):
        live = at_plan(plan, rendered)
        live["files"][changed]["sha256"] = "0" * 64
        assert decide(plan, rendered, live).db_roles, changed
    live = at_plan(plan, rendered)
    container(live, "db")["running"] = False  # e.g. left stopped by a restore
    assert decide(plan, rendered, live).db_roles
    live = at_plan(plan, rendered)
    live["files"]["/opt/edgefit/conf/nginx/nginx.conf"]["sha256"] = "0" * 64
    assert not decide(plan, rendered, live).db_roles, "a reload of nginx leaves the roles alone"
