"""Upgrades with a health gate and rollback (issue 13) on the Vagrant test hosts.

The stand-in releases of the api image (tests/images/build.py RELEASES, in the test image
tarball; the box holds release 1 only, so the first upgrade of a host uploads the tarball and
loads them, as an air-gapped operator would): :2 migrates the schema (standin_schema holds 2,
standin_apps gains a column) and serves; :3-broken migrates the same way and then fails its
healthcheck. Both hosts start from the shared deployed stack (release 1, no standin_schema
table) and end on it again. Kept short, in this order: one broken serial rollout over both hosts
(its first host proves the automatic rollback, its second that it was never touched), then
one good upgrade of edge-small, which finds the releases loaded when edge-small went first (one
tarball upload and `docker load` fewer), and its `edgefit rollback`.
"""

from __future__ import annotations

import json
import re
import runpy
import time
from pathlib import Path

import pytest

from tests.test_deploy_vm import _host_state
from tests.test_rebuild_vm import edgefit, marks_present, write_marks
from tests.vm_deploy import REPO, DeployedStack, containers, in_stack, run_deploy, started_at

pytestmark = pytest.mark.vm
PREVIOUS, GOOD, BROKEN = ("edgefit-test/dify-api-standin:1", "edgefit-test/dify-api-standin:2",
                          "edgefit-test/dify-api-standin:3-broken")
API_IMAGE_SERVICES = ("api", "worker", "worker_beat")
STATE = "/var/lib/edgefit/upgrade/state.json"
ALL_KEPT = {"row": True, "file": True, "broker key": True}


def release_inventory(tmp_path: Path, hosts: dict, release: str | None, **data) -> Path:
    """The hosts in group vagrant (group_data/vagrant.py applies) with the api image's release
    (None: the test images as group_data gives them) and any other host data."""
    images = dict(runpy.run_path(str(REPO / "group_data" / "vagrant.py"))["edgefit_images"])
    if release:
        images.update({service: release for service in API_IMAGE_SERVICES})
    entries = [[name, {**host.pyinfra_data(), "edgefit_images": images, **data}] for name, host in hosts.items()]
    tag = (release or "standard").rsplit(":", 1)[-1].replace("-", "_")
    path = tmp_path / f"release_{tag}_{len(entries)}_hosts.py"
    path.write_text(f"import json\nvagrant = [tuple(e) for e in json.loads({json.dumps(json.dumps(entries))})]\n")
    return path


def schema_version(host) -> str | None:
    """What the stand-in's migrations left: None for release 1's schema (no standin_schema table)."""
    result = in_stack(host, "db", "psql -U postgres -d dify -tA -c 'select version from standin_schema'", check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def api_image(host) -> str:
    return containers(host)["api"]["Config"]["Image"]


def print_progress(text: str) -> None:
    """The host script's timestamped progress lines (paths and services, no values): where a
    rollback's minutes went."""
    for line in text.splitlines():
        if re.search(r"\[\d\d:\d\d:\d\d\] ", line):
            print(f"[upgrade-vm] {line.strip()}", flush=True)


def upgrade_state(host) -> dict | None:
    text = host.run(f"cat {STATE} 2>/dev/null || true").stdout.strip()
    return json.loads(text) if text else None


def test_a_broken_release_rolled_out_serially_rolls_back_the_first_host_and_never_touches_the_next(
        deployed_stack: DeployedStack, tmp_path):
    hosts = deployed_stack.hosts
    mark = f"broken{int(time.time())}"
    for host in hosts.values():
        write_marks(host, mark)
    before = {name: (_host_state(host), upgrade_state(host)) for name, host in hosts.items()}
    # The gate waits out the whole timeout for a release that never turns healthy: the shortest
    # the setting allows. :3-broken migrates within seconds of its start, and the api's log lines
    # in the failure message show it did, so the schema found afterwards is the rollback's doing.
    inventory = release_inventory(tmp_path, hosts, BROKEN, edgefit_health_timeout=30)

    run = run_deploy(inventory, "--serial", "--fail-percent", "0")
    print(f"[upgrade-vm] serial rollout of {BROKEN}: {run.seconds:.0f}s")
    print_progress(run.output)
    assert run.returncode != 0, run.output[-6000:]
    touched = [name for name, host in hosts.items() if (_host_state(host), upgrade_state(host)) != before[name]]
    assert len(touched) == 1, f"touched {touched}:\n{run.output[-6000:]}"
    # Either host may go first: on 2026-12-07 a run after the rebuild tests had pyinfra's serial
    # mode start with edge-medium, not the inventory's first host.
    first = touched[0]
    host = hosts[first]
    assert f"{first}: the upgrade failed: api" in run.output, run.output[-6000:]
    assert "it was rolled back" in run.output and "last log lines of api:" in run.output
    assert "migrated the schema to release 3-broken" in run.output, run.output[-6000:]
    assert "/srv/dify/pre-upgrade-backups/" in run.output
    assert api_image(host) == PREVIOUS and schema_version(host) is None
    assert marks_present(host, mark) == ALL_KEPT
    assert upgrade_state(host)["status"] == "rolled-back"
    second = next(name for name in hosts if name != first)
    assert api_image(hosts[second]) == PREVIOUS and marks_present(hosts[second], mark) == ALL_KEPT

    verified = edgefit("verify", str(deployed_stack.inventory), "--window", "10", timeout=300)
    assert verified.returncode == 0, verified.stdout[-3000:]


def test_a_good_release_upgrades_after_a_backup_and_edgefit_rollback_returns(deployed_stack: DeployedStack, tmp_path):
    host = deployed_stack.hosts["edge-small"]
    assert api_image(host) == PREVIOUS and schema_version(host) is None
    mark = f"upgrade{int(time.time())}"
    write_marks(host, mark)
    inventory = release_inventory(tmp_path, {"edge-small": host}, GOOD)

    since = host.run("date +%s").stdout.strip()
    run = run_deploy(inventory)
    print(f"[upgrade-vm] upgrade to {GOOD}: {run.seconds:.0f}s")
    assert run.returncode == 0, run.output[-6000:]
    assert "upgrade passed its health gate" in run.output
    created = host.run(f"docker events --since {since} --until $(date +%s) --filter type=container --filter event=create "
                       "--format '{{index .Actor.Attributes \"com.docker.compose.service\"}}'").stdout.split()
    assert sorted(created) == ["api", "worker"], f"containers made by the upgrade: {created}"
    assert api_image(host) == GOOD and schema_version(host) == "2"
    assert marks_present(host, mark) == ALL_KEPT
    state = upgrade_state(host)
    assert state["status"] == "upgraded" and state["images"]["api"] == PREVIOUS
    assert state["backup"].startswith("/srv/dify/pre-upgrade-backups/")
    assert host.run(f"test -s {state['backup']}/db-dify.dump && stat -c %a {state['backup']}").stdout.strip() == "700"
    verified = edgefit("verify", str(inventory), "--window", "10", timeout=300)
    assert verified.returncode == 0, verified.stdout[-3000:]

    again = run_deploy(inventory)  # at its new plan: the one read, no operation
    assert again.returncode == 0 and again.operations_run("edge-small") == [], again.output[-3000:]
    before = _host_state(host)
    back = run_deploy(release_inventory(tmp_path, {"edge-small": host}, None), timeout=600)
    assert back.returncode != 0 and "refusing a downgrade" in back.output, back.output[-3000:]
    assert "Nothing was changed" in back.output and _host_state(host) == before

    serving = started_at(host)
    rolled = edgefit("rollback", str(inventory), "--yes", timeout=2400)
    print(f"[upgrade-vm] edgefit rollback exit {rolled.returncode}")
    assert rolled.returncode == 0, (rolled.stdout + rolled.stderr)[-6000:]  # verify exit 0 included
    assert started_at(host)["nginx"] == serving["nginx"], "the rollback restarted nginx, which holds no data"
    assert "the inventory still names the newer release" in rolled.stdout
    assert api_image(host) == PREVIOUS and schema_version(host) is None
    assert marks_present(host, mark) == ALL_KEPT
    assert upgrade_state(host)["status"] == "rolled-back"
    standard = run_deploy(deployed_stack.inventory, "--limit", "edge-small")
    assert standard.returncode == 0 and standard.operations_run("edge-small") == [], standard.output[-3000:]
