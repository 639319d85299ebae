"""`edgefit backup`, `restore` and `rebuild` end to end on the Vagrant test hosts (issue 11).

Data is written the way the app writes it (rows through PgBouncer, a file in storage from the
api container, a key in the broker Redis) and must be there afterwards. edge-small is marked
staging by a temporary inventory (edgefit_role = "staging"); the shared inventory leaves both
hosts production. Every wait is bounded and every phase prints its time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_deploy_vm import _host_state
from tests.vm_deploy import REPO, DeployedStack, in_stack, started_at

pytestmark = pytest.mark.vm
EDGEFIT = str(REPO / ".venv" / "bin" / "edgefit")
REBUILD_TIMEOUT_S = 3600  # backup + deploy from scratch + restore + deploy + verify, software-emulated


def edgefit(*args: str, timeout: float = REBUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([EDGEFIT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    print(f"[rebuild-vm] edgefit {args[0]}: exit {result.returncode} in {time.monotonic() - started:.0f}s",
          file=sys.stderr, flush=True)
    return result


def staging_inventory(tmp_path: Path, host) -> Path:
    """edge-small in group vagrant (so group_data/vagrant.py applies), marked staging."""
    inventory = tmp_path / "staging_small.py"
    data = {**host.pyinfra_data(), "edgefit_role": "staging"}
    inventory.write_text(f"import json\nvagrant = [('edge-small', json.loads({json.dumps(json.dumps(data))}))]\n")
    return inventory


def write_marks(host, mark: str) -> None:
    in_stack(host, "db", "PGPASSWORD=$DB_PASSWORD psql -h pgbouncer -p 6432 -U postgres -d dify -v ON_ERROR_STOP=1 "
                         "-c 'create table if not exists edgefit_rebuild (v text)' "
                         f"-c \"insert into edgefit_rebuild values ('{mark}')\"")
    in_stack(host, "api", f"echo {mark} > /app/api/storage/edgefit-rebuild-{mark}.txt")
    in_stack(host, "redis_broker", f"REDISCLI_AUTH=$REDIS_BROKER_PASSWORD redis-cli set edgefit:rebuild:{mark} {mark}")


def marks_present(host, mark: str) -> dict[str, bool]:
    rows = in_stack(host, "db", "PGPASSWORD=$DB_PASSWORD psql -h pgbouncer -p 6432 -U postgres -d dify -tA "
                                "-c 'select v from edgefit_rebuild'", check=False).stdout.split()
    stored = in_stack(host, "api", f"cat /app/api/storage/edgefit-rebuild-{mark}.txt", check=False).stdout.strip()
    key = in_stack(host, "redis_broker", f"REDISCLI_AUTH=$REDIS_BROKER_PASSWORD redis-cli get edgefit:rebuild:{mark}",
                   check=False).stdout.strip()
    return {"row": mark in rows, "file": stored == mark, "broker key": key == mark}


def latest_backup(to_dir: Path, name: str) -> Path:
    backups = sorted(p for p in (to_dir / name).iterdir() if p.is_dir() and not p.name.startswith("."))
    assert backups, f"no backup of {name} in {to_dir}"
    return backups[-1]


def test_rebuild_of_a_non_staging_host_is_refused_and_touches_nothing(deployed_stack: DeployedStack, tmp_path):
    host = deployed_stack.hosts["edge-small"]
    before = _host_state(host)
    result = edgefit("rebuild", str(deployed_stack.inventory), "--limit", "edge-small", "--yes",
                     "--to", str(tmp_path / "backups"), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "edge-small is not a staging host" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _host_state(host) == before, "a refused rebuild changed the host"
    assert not (tmp_path / "backups").exists()


def test_a_backup_of_edge_small_restored_onto_edge_medium_gives_the_same_data(deployed_stack: DeployedStack, tmp_path):
    small, medium = deployed_stack.hosts["edge-small"], deployed_stack.hosts["edge-medium"]
    mark = f"moved{int(time.time())}"
    write_marks(small, mark)
    to_dir = tmp_path / "backups"
    result = edgefit("backup", str(deployed_stack.inventory), "--limit", "edge-small", "--to", str(to_dir))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    backup = latest_backup(to_dir, "edge-small")
    medium_plan = medium.run("cat /etc/edgefit/plan.json").stdout
    before = started_at(medium)
    result = edgefit("restore", str(deployed_stack.inventory), "--limit", "edge-medium", "--from", str(backup), "--yes")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    after = started_at(medium)
    # only what holds data was stopped: Postgres and Dify started again, nginx and the SSRF proxy
    # (nothing of theirs is in a backup or its secrets) served on
    assert [s for s in ("db", "api", "worker") if after.get(s) == before.get(s)] == [], "restore left data services running"
    assert [s for s in ("nginx", "ssrf_proxy") if after.get(s) != before.get(s)] == [], \
        "restore stopped services that hold no data"
    assert marks_present(medium, mark) == {"row": True, "file": True, "broker key": True}
    assert json.loads(medium.run("cat /etc/edgefit/plan.json").stdout)["plan"] == json.loads(medium_plan)["plan"], \
        "edge-medium lost its own plan"
    kept = medium.run("ls -d /srv/dify/.pre-restore-*").stdout.split()
    assert kept, "edge-medium's own data was not kept aside"


def test_a_corrupted_backup_is_refused_before_anything_is_stopped(deployed_stack: DeployedStack, tmp_path):
    host = deployed_stack.hosts["edge-small"]
    to_dir = tmp_path / "backups"
    result = edgefit("backup", str(deployed_stack.inventory), "--limit", "edge-small", "--to", str(to_dir))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    backup = latest_backup(to_dir, "edge-small")
    dump = backup / "db-dify.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    before = _host_state(host)
    result = edgefit("restore", str(deployed_stack.inventory), "--limit", "edge-small", "--from", str(backup),
                     "--yes", timeout=120)
    assert result.returncode == 2 and "does not match its checksum" in result.stderr, result.stderr
    assert _host_state(host) == before, "the host changed although the backup was refused"


# vm_long (outside CI's run, `scripts/test -m vm_long` runs it): on 2026-12-03 this machine ran the
# VM tier about 1.4x slower than the day before (first deploy of both hosts 873 s against 632 s,
# the cross-host restore 605 s against 399 s), and this test alone, a fresh boot, a deploy from
# bare and a restore, took over 20 minutes: with it CI's run came to about its 90 minutes.
@pytest.mark.vm_long
def test_a_rebuild_killed_after_its_backup_is_rerun_on_the_host_reinstalled_from_bare_with_the_data_kept(
        deployed_stack: DeployedStack, vm_hosts, tmp_path):
    """Issue 11's interrupted run and rebuild from bare metal in one flow, as for a cloud VPS: the
    rebuild is killed right after its backup reached this machine; edge-small is then destroyed and
    booted fresh from the box (a reinstalled OS: no stack, no secrets, an empty data disk); the same
    `edgefit rebuild`, re-run, reuses the backup, deploys from scratch, restores and verifies.
    One rebuild to the end also proves the data, the backup's modes and that no secret is printed
    (a separate uninterrupted rebuild cost the VM tier another 5-11 minutes)."""
    host = deployed_stack.hosts["edge-small"]
    mark = f"killed{int(time.time())}"
    write_marks(host, mark)
    to_dir = tmp_path / "backups"
    started = time.monotonic()
    process = subprocess.Popen([EDGEFIT, "rebuild", str(staging_inventory(tmp_path, host)), "--yes", "--to", str(to_dir)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    seen = []
    try:
        for line in process.stdout:  # bounded by the backup's own bounds; checked below
            seen.append(line)
            if "[rebuild edge-small] backed-up" in line:
                os.killpg(process.pid, signal.SIGKILL)
                break
            assert time.monotonic() - started < 1800, "no backup within 1800s"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    print(f"[rebuild-vm] killed after the backup at {time.monotonic() - started:.0f}s", file=sys.stderr)
    assert any("backed-up" in line for line in seen), "".join(seen)[-3000:]
    if "edge-small" in vm_hosts.booted_here:
        started = time.monotonic()
        vm_hosts.destroy("edge-small")
        host = deployed_stack.hosts["edge-small"] = vm_hosts["edge-small"]  # the later tests use this one
        print(f"[rebuild-vm] edge-small destroyed and booted fresh in {time.monotonic() - started:.0f}s",
              file=sys.stderr)
        assert host.run("test -e /etc/edgefit/secrets.env || test -e /opt/edgefit", check=False).returncode == 1
        assert host.run(f"blkid {host['data_disk']}", check=False).returncode == 2, "a fresh, empty data disk"
    else:  # someone's host from `scripts/vm up`: not ours to destroy; the rerun goes to it as it is
        print("[rebuild-vm] edge-small was up before this session: rerun without the reinstall", file=sys.stderr)
    inventory = staging_inventory(tmp_path, host)  # its new SSH port
    state = json.loads((to_dir / "edge-small" / "rebuild-state.json").read_text())
    result = edgefit("rebuild", str(inventory), "--yes", "--to", str(to_dir))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert f"reusing backup {to_dir / 'edge-small' / state['backup']}" in result.stdout
    assert "verify exit 0" in result.stdout
    assert marks_present(host, mark) == {"row": True, "file": True, "broker key": True}
    backup = latest_backup(to_dir, "edge-small")
    assert oct(backup.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in backup.iterdir())
    assert not (to_dir / "edge-small" / "rebuild-state.json").exists(), "a finished rebuild leaves no state"
    secret_values = [line.partition("=")[2] for line in (backup / "secrets.env").read_text().splitlines()]
    printed = "".join(seen) + result.stdout + result.stderr
    assert not any(value and value in printed for value in secret_values), "a secret was printed"
    shutil.rmtree(to_dir, ignore_errors=True)
