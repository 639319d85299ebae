"""A re-deploy heals what verify reports (issue 11, item 1), on the Vagrant test hosts.

Drift of each kind is made by hand on edge-small, `edgefit verify` names it, one deploy run heals
it, and verify passes afterwards. Then a config placed but never applied (what a deploy killed
between its upload and its restart leaves behind) is applied by the next run.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from edgefit.facts import COMPOSE_PROJECT
from tests.vm_deploy import REPO, DeployedStack, plan_for, run_deploy, started_at

pytestmark = pytest.mark.vm
EDGEFIT = str(REPO / ".venv" / "bin" / "edgefit")


def container(service: str) -> str:
    return f"{COMPOSE_PROJECT}-{service}-1"


def verify_small(stack: DeployedStack, tmp_path, since: str) -> tuple[int, dict]:
    out = tmp_path / f"verify-{time.monotonic_ns()}.json"
    done = subprocess.run([EDGEFIT, "verify", str(stack.inventory), "--limit", "edge-small", "--window", "12",
                           "--since", since, "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    print(done.stdout)
    document = json.loads(out.read_text())
    return done.returncode, document["hosts"][0]


def test_limit_stopped_service_and_redis_policy_drift_are_healed_by_one_deploy(deployed_stack: DeployedStack,
                                                                              tmp_path):
    host = deployed_stack.hosts["edge-small"]
    plan = plan_for(host)
    stopped = "sandbox" if "sandbox" in plan.services else "ssrf_proxy"
    host.run(f"docker update --memory 900m --memory-swap 900m {container('worker')}")
    host.run(f"docker stop {container(stopped)}", timeout=120)
    host.run(f"docker exec {container('redis')} redis-cli -h 127.0.0.1 CONFIG SET maxmemory-policy noeviction")
    code, report = verify_small(deployed_stack, tmp_path, "15s")
    kinds = {(f["kind"], f["service"]) for f in report["findings"] if f["severity"] == "fail"}
    assert code == 1 and {("limit_drift", "worker"), ("redis_drift", "redis")} <= kinds, kinds
    assert any(service == stopped for _, service in kinds), kinds

    started = time.monotonic()
    run = run_deploy(deployed_stack.inventory, "--limit", "edge-small")
    print(f"[heal] one deploy healed the drift in {time.monotonic() - started:.0f}s: {run.changed_operations('edge-small')}")
    assert run.returncode == 0, run.output[-4000:]
    ops = " | ".join(run.changed_operations("edge-small"))
    assert "Recreate worker" in ops and "Restart redis" in ops and "docker compose up -d" in ops, ops

    code, report = verify_small(deployed_stack, tmp_path, "5s")
    assert code == 0, [f["message"] for f in report["findings"] if f["severity"] == "fail"]
    limit = int(host.run(f"docker inspect -f '{{{{.HostConfig.Memory}}}}' {container('worker')}").stdout)
    assert limit == plan.services["worker"].mem_limit_mib * 1024 * 1024
    # and once healed, the next run has nothing to do
    again = run_deploy(deployed_stack.inventory, "--limit", "edge-small")
    assert again.returncode == 0 and again.operations_run("edge-small") == [], again.operations_run("edge-small")


def test_a_config_placed_but_not_applied_is_applied_by_the_next_run(deployed_stack: DeployedStack, tmp_path):
    """A deploy killed after its upload and before its restart leaves the new file on the host,
    newer than the running container, and a compose definition it never brought up: the next
    run restarts exactly that service and runs `docker compose up`."""
    host = deployed_stack.hosts["edge-small"]
    before = started_at(host)
    host.run("touch /opt/edgefit/conf/pgbouncer/pgbouncer.ini /var/lib/edgefit/compose-up-pending")
    run = run_deploy(deployed_stack.inventory, "--limit", "edge-small")
    assert run.returncode == 0, run.output[-4000:]
    ops = " | ".join(run.changed_operations("edge-small"))
    assert "Restart pgbouncer: /opt/edgefit/conf/pgbouncer/pgbouncer.ini is newer than the running container" in ops, ops
    assert "docker compose up -d (a compose definition placed by an interrupted deploy)" in ops, ops
    after = started_at(host)
    assert sorted(s for s in before if after.get(s) != before[s]) == ["pgbouncer"]
    assert host.run("test -e /var/lib/edgefit/compose-up-pending", check=False).returncode == 1
    code, report = verify_small(deployed_stack, tmp_path, "5s")
    assert code == 0, [f["message"] for f in report["findings"] if f["severity"] == "fail"]
