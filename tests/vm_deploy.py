"""Deploying to the Vagrant test hosts, shared by the VM tests of deploy and verify.

`deployed_stack` (session scope) boots edge-small and edge-medium, builds the test images, and
runs `pyinfra -y --json inventory/vagrant.py deploy.py` once for both (pyinfra runs the hosts
in parallel). tests/conftest.py loads it as a plugin: importing the fixture into a test module would
make a second, module-level fixture and a second deploy.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefit.facts import COMPOSE_PROJECT, BlockDevice, HostSizeFacts
from edgefit.host_plan import check_and_plan
from edgefit.plan import Plan
from edgefit.settings import read_settings

REPO = Path(__file__).resolve().parents[1]
PYINFRA = REPO / ".venv" / "bin" / "pyinfra"
DEPLOY_TIMEOUT_S = 2400  # both hosts, software-emulated, from bare (images in the box): first starts


@dataclass
class DeployRun:
    returncode: int
    output: str  # stderr + stdout (pyinfra logs to stderr)
    results: dict | None  # pyinfra's --json payload, when it got that far
    seconds: float

    @property
    def changed(self) -> int:
        return self.results["results"]["totals"]["success"] if self.results and self.results.get("results") else -1

    def operations_run(self, host: str) -> list[str]:
        """Every operation pyinfra ran on host, changed or not."""
        ops = (self.results or {}).get("results", {}).get("operations", [])
        return [op["name"] for op in ops if host in op.get("success", []) + op.get("error", []) + op.get("no_change", [])]

    def commands_run(self, host: str) -> int:
        """SSH commands pyinfra ran on host: one "Running command on HOST:" line each under
        --debug (pyinfra's SSH connector logs every command it executes, facts included)."""
        return self.output.count(f"Running command on {host}:")

    def changed_operations(self, host: str) -> list[str]:
        ops = (self.results or {}).get("results", {}).get("operations", [])
        return [op["name"] for op in ops if host in op["success"]]


def run_deploy(inventory: Path, *extra: str, timeout: float = DEPLOY_TIMEOUT_S) -> DeployRun:
    """pyinfra -y --json; each operation it starts is shown as it starts (long waits stay visible)."""
    started = time.monotonic()
    process = subprocess.Popen(
        [str(PYINFRA), "-y", "--json", str(inventory), "deploy.py", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []

    def follow() -> None:
        for line in process.stderr:
            log.append(line)
            if "Starting operation" in line or ("error" in line.lower() and "--debug" not in extra):
                print(f"[deploy] {time.strftime('%H:%M:%S')} {line.strip()}", file=sys.stderr, flush=True)

    out: list[str] = []
    readers = [threading.Thread(target=follow, daemon=True),
               threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"deploy did not finish within {timeout:.0f}s; last output:\n{''.join(log)[-3000:]}")
    for reader in readers:
        reader.join(timeout=30)
    stdout = "".join(out)
    results = None
    start = stdout.find("{")
    if start >= 0:
        try:
            results = json.loads(stdout[start:])
        except json.JSONDecodeError:
            results = None
    return DeployRun(process.returncode, "".join(log) + stdout, results, time.monotonic() - started)


def fact_on(host, fact_class, **kwargs):
    """Run one of edgefit's pyinfra facts over SSH with its own command and parser, so the
    tests read the host exactly as the deploy does."""
    fact = fact_class()
    output = host.run(fact.command(**kwargs)).stdout.splitlines()
    return fact.process(output)


def plan_for(host) -> Plan:
    """The plan the deploy made for this host, from its plan of record (/etc/edgefit/plan.json)."""
    record = json.loads(host.run("cat /etc/edgefit/plan.json").stdout)
    return Plan.from_dict(record["plan"])


def plan_from_live_facts(host) -> Plan:
    """The plan edgefit.host_plan makes from this host's live facts and group_data/vagrant.py:
    the one facts -> plan path the deploy uses, run here against the same facts."""
    import runpy

    data = {k: v for k, v in runpy.run_path(str(REPO / "group_data" / "vagrant.py")).items() if k.startswith("edgefit_")}
    settings = read_settings({**data, **host.pyinfra_data()})  # the host's own data (ssh_port) as the inventory gives it
    facts = fact_on(host, HostSizeFacts)
    device = fact_on(host, BlockDevice, path=settings.options.data_disk)
    return check_and_plan(settings, facts, device, docker_installed=True)


def _manifest_path() -> Path:
    from tests.images.build import cache_root, recipe_hash
    return cache_root() / f"edgefit-test-images-{recipe_hash()[:16]}.json"


def containers(host) -> dict[str, dict]:
    """service -> `docker inspect` of the stack's containers on the host."""
    ids = host.run(f"docker ps -aq --filter label=com.docker.compose.project={COMPOSE_PROJECT}").stdout.split()
    if not ids:
        return {}
    inspected = json.loads(host.run(f"docker inspect {' '.join(ids)}").stdout)
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}


def started_at(host) -> dict[str, str]:
    return {service: c["State"]["StartedAt"] for service, c in containers(host).items()}


def in_stack(host, service: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a shell command inside one service's container, with the host's secrets in its
    environment (read on the host; never passed through the test's output)."""
    inner = shlex.quote(command)
    return host.run(
        f"set -a; . /etc/edgefit/secrets.env; set +a; "
        f"docker exec -e DB_PASSWORD -e REDIS_PASSWORD -e REDIS_BROKER_PASSWORD "
        f"{COMPOSE_PROJECT}-{service}-1 sh -c {inner}",
        check=check,
    )


@dataclass
class DeployedStack:
    hosts: dict  # name -> VMHost
    inventory: Path
    first_run: DeployRun


@pytest.fixture(scope="session")
def deployed_stack(vm_hosts) -> DeployedStack:
    from tests.images.build import build_images

    started = time.monotonic()
    build_images()
    print(f"\n[deploy] test images ready in {time.monotonic() - started:.0f}s")
    hosts = vm_hosts("edge-small", "edge-medium")
    inventory = vm_hosts.inventory()
    run = run_deploy(inventory)
    print(f"[deploy] first deploy of both hosts: {run.seconds:.0f}s, {run.changed} changed operations")
    assert run.returncode == 0, f"first deploy failed:\n{run.output[-6000:]}"
    return DeployedStack(hosts={name: hosts[name] for name in ("edge-small", "edge-medium")},
                         inventory=inventory, first_run=run)


def reboot_and_wait(host, timeout_s: float = 900) -> float:
    """Reboot the guest and wait (bounded) until it answers SSH with a new boot id."""
    before = host.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    started = time.monotonic()
    host.run("systemctl reboot", check=False, timeout=30)
    while time.monotonic() - started < timeout_s:
        time.sleep(5)
        try:
            now = host.run("cat /proc/sys/kernel/random/boot_id", check=False, timeout=20)
        except subprocess.TimeoutExpired:
            continue
        if now.returncode == 0 and now.stdout.strip() not in ("", before):
            return time.monotonic() - started
    pytest.fail(f"{host.name} did not come back within {timeout_s:.0f}s of a reboot")
