"""Backup, restore and rebuild without a VM: the manifest and its checksums, a damaged backup
refused before anything runs, staging detection, the rebuild's state file, the CLI's refusals,
and the secrets role's refusal to make new secrets over an existing Postgres cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgefit import facts, host_backup, lifecycle, render
from edgefit.facts import PostgresCluster
from edgefit.host_backup import BackupError, check_backup, complete_backups, to_prune, write_manifest

REPO = Path(__file__).resolve().parents[1]
EDGEFIT = str(Path(sys.executable).with_name("edgefit"))
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
NAME = "20250101T120000Z"


def make_backup(directory: Path, name: str = NAME) -> Path:
    directory.mkdir(parents=True)
    (directory / "db-dify.dump").write_bytes(b"PGDMP" + bytes(range(256)) * 4)
    (directory / "db-dify_plugin.dump").write_bytes(b"PGDMP plugin")
    (directory / "redis-broker.rdb").write_bytes(b"REDIS0010")
    (directory / "secrets.env").write_text("SECRET_KEY=" + "x" * 40 + "\n")
    with tarfile.open(directory / "storage.tar.gz", "w:gz") as archive:
        archive.add(__file__, arcname="storage/privkeys/file.txt")
    kinds = {"db-dify.dump": {"kind": "postgres", "database": "dify"},
             "db-dify_plugin.dump": {"kind": "postgres", "database": "dify_plugin"},
             "redis-broker.rdb": {"kind": "redis"}, "secrets.env": {"kind": "secrets"},
             "storage.tar.gz": {"kind": "directory", "path": "storage"}}
    write_manifest(str(directory), {"host": "edge-small", "name": name, "data_root": "/srv/dify",
                                    "plan_of_record": {}, "images": {}}, kinds)
    return directory


def edgefit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEFIT, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Manifest

def test_a_backup_checks_good_and_records_size_and_sha256(tmp_path):
    backup = make_backup(tmp_path / NAME)
    manifest = check_backup(str(backup))
    entry = manifest["files"]["db-dify.dump"]
    assert entry["size"] == (backup / "db-dify.dump").stat().st_size and len(entry["sha256"]) == 64
    assert oct((backup / "manifest.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("damage, words", [
    (lambda b: _flip_one_byte(b / "db-dify.dump"), ["db-dify.dump", "does not match its checksum"]),
    (lambda b: _flip_one_byte(b / "secrets.env"), ["secrets.env", "does not match its checksum"]),
    (lambda b: (b / "storage.tar.gz").unlink(), ["storage.tar.gz is missing"]),
    (lambda b: (b / "stray.txt").write_text("x"), ["stray.txt", "does not list"]),
    (lambda b: (b / "manifest.json").write_text("{"), ["manifest.json cannot be read"]),
    (lambda b: (b / "manifest.json").unlink(), ["has no manifest.json"]),
])
def test_a_damaged_backup_is_refused_in_one_sentence(tmp_path, damage, words):
    backup = make_backup(tmp_path / NAME)
    damage(backup)
    with pytest.raises(BackupError) as caught:
        check_backup(str(backup))
    assert "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_manifest_cannot_point_outside_the_backup_or_name_an_unsafe_database(tmp_path):
    backup = make_backup(tmp_path / NAME)
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"]["db-dify.dump"]["database"] = 'dify"; drop table x; --'
    (backup / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match="not a plain name"):
        check_backup(str(backup))


def test_pruning_keeps_the_newest_complete_backups_and_ignores_partial_ones(tmp_path):
    for name in ("20250101T000000Z", "20250102T000000Z", "20250103T000000Z", "20250104T000000Z"):
        make_backup(tmp_path / name, name)
    (tmp_path / ".partial-20250105T000000Z").mkdir()
    (tmp_path / "20250106T000000Z").mkdir()  # no manifest: never complete
    assert complete_backups(str(tmp_path)) == ["20250101T000000Z", "20250102T000000Z", "20250103T000000Z",
                                               "20250104T000000Z"]
    assert to_prune(complete_backups(str(tmp_path)), 3) == ["20250101T000000Z"]
    host_backup.prune(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["20250103T000000Z", "20250104T000000Z", "20250106T000000Z"]


def test_a_tarball_with_paths_outside_its_directory_is_not_unpacked(tmp_path):
    tarball = tmp_path / "storage.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(__file__, arcname="storage/../etc/passwd")
    with pytest.raises(BackupError, match="outside storage/"):
        host_backup.unpack(str(tarball), str(tmp_path / "root"), "storage")
    assert not (tmp_path / "root").exists()


def test_the_host_script_names_the_same_paths_as_the_deploy():
    from roles.volumes import DATA_DIRECTORIES

    assert host_backup.PLAN_OF_RECORD == render.PLAN_OF_RECORD and host_backup.STACK_DIR == render.STACK_DIR
    assert host_backup.SECRETS_PATH == facts.SECRETS_PATH and host_backup.PROJECT == facts.COMPOSE_PROJECT
    assert host_backup.ROLES_SQL == render.DB_ROLES_SQL_IN_CONTAINER
    assert set(host_backup.DATA_DIRS) == {path.split("/")[0] for path in DATA_DIRECTORIES}


# ---------------------------------------------------------------------------------------------
# Refused before anything runs: the CLI and the deploy file

def test_restore_refuses_a_one_byte_changed_backup_before_loading_any_host(tmp_path):
    backup = make_backup(tmp_path / "backups" / "edge-small" / NAME)
    _flip_one_byte(backup / "db-dify.dump")
    # The inventory's hosts do not exist: reaching them would fail differently.
    result = edgefit(tmp_path, "restore", str(REPO / "inventory" / "edge.py"), "--from", str(backup), "--yes")
    assert result.returncode == 2
    line = one_line(result)
    assert "db-dify.dump does not match its checksum" in line and "nothing was changed" in line


def test_restore_py_run_by_pyinfra_refuses_a_damaged_backup_before_any_operation(tmp_path):
    backup = make_backup(tmp_path / NAME)
    _flip_one_byte(backup / "redis-broker.rdb")
    result = subprocess.run([PYINFRA, "-y", "@local", "restore.py", "--data", f"backup_from={backup}"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "redis-broker.rdb does not match its checksum" in output and "Nothing was changed on any host" in output
    assert "Starting operation" not in output


@pytest.mark.parametrize("args, words", [
    (["backup", "missing.py"], ["inventory missing.py does not exist"]),
    (["backup", "INVENTORY", "--keep", "0"], ["--keep must be 1 or more"]),
    (["restore", "INVENTORY", "--from", "nowhere"], ["--from nowhere is not a directory"]),
    (["restore", "INVENTORY"], ["the following arguments are required: --from"]),
    (["rebuild", "INVENTORY", "--limit", "no-such-host"], ["no host of", "--limit no-such-host"]),
    (["rebuild", str(REPO / "inventory" / "edge.py"), "--yes"],
     ["vps-fra-1.example.net is not a staging host", "edgefit_role is 'production'", "Nothing was changed"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    inventory = tmp_path / "inv.py"
    inventory.write_text("staging = [('staging-1.lan', {'edgefit_role': 'staging'})]\n")
    args = [str(inventory) if arg == "INVENTORY" else arg for arg in args]
    result = edgefit(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    for word in words:
        assert word in line


def test_rebuild_refuses_every_host_before_any_when_one_is_not_staging(tmp_path):
    inventory = tmp_path / "mixed.py"
    inventory.write_text("staging = [('stage-1.invalid', {})]\nother = [('prod-1.invalid', {})]\n")
    result = edgefit(tmp_path, "rebuild", str(inventory), "--yes")
    assert result.returncode == 2 and "prod-1.invalid is not a staging host" in one_line(result)
    assert not (tmp_path / "backups").exists()


def test_rebuild_asks_first_and_refuses_without_a_terminal(tmp_path):
    inventory = tmp_path / "stage.py"
    inventory.write_text("hosts = [('stage-1.invalid', {'edgefit_role': 'staging'})]\n")
    result = edgefit(tmp_path, "rebuild", str(inventory), "--fresh")
    assert result.returncode == 2 and "pass --yes" in one_line(result)
    assert 'stage-1.invalid (edgefit_role = "staging")' in result.stdout and "DELETE the data" in result.stdout
    assert not (tmp_path / "backups").exists()


def test_a_bad_role_is_refused_by_rebuild(tmp_path):
    inventory = tmp_path / "stage.py"
    inventory.write_text("hosts = [('stage-1.invalid', {'edgefit_role': 'stage'})]\n")
    result = edgefit(tmp_path, "rebuild", str(inventory), "--yes")
    assert result.returncode == 2 and "edgefit_role: 'stage' is not one of production, staging" in one_line(result)


@pytest.mark.parametrize("groups, data, expected", [
    (["staging"], {}, "in the staging group"),
    (["small"], {"edgefit_role": "staging"}, 'edgefit_role = "staging"'),
    (["small"], {"edgefit_role": "production"}, None),
    ([], {}, None),
])
def test_staging_detection(groups, data, expected):
    assert lifecycle.staging_reason("h", groups, data) == expected


# ---------------------------------------------------------------------------------------------
# The rebuild's state file

def test_no_state_means_a_new_backup(tmp_path):
    assert lifecycle.resume_decision(None, tmp_path, fresh=False) == (None, False, "")


@pytest.mark.parametrize("phase", ["backed-up", "torn-down", "deployed"])
def test_an_interrupted_rebuild_reuses_its_complete_backup(tmp_path, phase):
    make_backup(tmp_path / NAME)
    state = {"backup": NAME, "phase": phase, "fresh": False}
    reuse, fresh, note = lifecycle.resume_decision(state, tmp_path, fresh=True)
    assert reuse == NAME and fresh is False  # the interrupted run's choice holds
    assert "reusing backup" in note and "--fresh as in that run" in note


def test_a_missing_backup_before_teardown_means_a_new_one(tmp_path):
    state = {"backup": NAME, "phase": "backed-up", "fresh": False}
    reuse, _, note = lifecycle.resume_decision(state, tmp_path, fresh=False)
    assert reuse is None and "taking a new one" in note


def test_a_damaged_backup_after_teardown_is_refused(tmp_path):
    backup = make_backup(tmp_path / NAME)
    _flip_one_byte(backup / "db-dify.dump")
    with pytest.raises(lifecycle.Refused, match="restore another backup"):
        lifecycle.resume_decision({"backup": NAME, "phase": "torn-down"}, tmp_path, fresh=False)


def test_the_state_file_is_private_and_read_back(tmp_path):
    path = tmp_path / "backups" / "edge-small" / lifecycle.STATE_FILE
    lifecycle.save_state(path, {"backup": NAME, "phase": "backed-up", "fresh": False})
    assert lifecycle.load_state(path)["phase"] == "backed-up"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    path.write_text("{not json")
    with pytest.raises(lifecycle.Refused, match="not readable JSON"):
        lifecycle.load_state(path)
    assert lifecycle.load_state(tmp_path / "absent.json") is None


# ---------------------------------------------------------------------------------------------
# Secrets follow the data

def test_new_secrets_are_refused_over_an_existing_cluster():
    from roles.secrets import refusal

    sentence = refusal("edge-small", None, "/srv/dify/postgres/pgdata/PG_VERSION")
    assert sentence and "\n" not in sentence
    assert "secrets.env is missing" in sentence and "backups/edge-small/STAMP/secrets.env" in sentence
    assert "Nothing was changed" in sentence
    assert refusal("edge-small", None, None) is None  # a bare host: secrets are made
    assert refusal("edge-small", "SECRET_KEY=x\n", "/srv/dify/postgres/pgdata/PG_VERSION") is None  # only missing keys


def test_the_cluster_fact_finds_pg_version_under_the_data_root(tmp_path):
    fact = PostgresCluster()
    (tmp_path / "postgres" / "pgdata").mkdir(parents=True)

    def read() -> str | None:
        run = subprocess.run(["sh", "-c", fact.command(str(tmp_path), None)], capture_output=True, text=True,
                             timeout=30)
        assert run.returncode == 0
        return fact.process(run.stdout.splitlines())

    assert read() is None
    (tmp_path / "postgres" / "pgdata" / "PG_VERSION").write_text("15\n")
    assert read() == f"{tmp_path}/postgres/pgdata/PG_VERSION"
    # A device that does not exist is no cluster and no error.
    run = subprocess.run(["sh", "-c", fact.command("/nonexistent", "/dev/edgefit-none")], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0 and fact.process(run.stdout.splitlines()) is None


@pytest.mark.servers
@pytest.mark.parametrize("appendonly", [True, False])
def test_a_restored_broker_snapshot_is_what_the_broker_redis_loads(tmp_path, appendonly):
    """host_backup.restore_broker with Debian's redis-server (7.0; the stack's is 7.2): a snapshot
    taken by one server is what the next one, started on the restored directory with the
    broker's persistence, holds; with appendonly, writes after it survive a restart too."""
    from tests.servers_helpers import free_port, require_executable, wait_until
    redis_server = require_executable("redis-server", "redis-server")
    from edgefit.plan import HostSize, Options, make_plan
    from edgefit.secrets import Secrets
    rendered = render.render_stack(make_plan(HostSize(2, 4096), Options()), Secrets.generate())
    for conf in (f for f in rendered if f.dest.endswith("redis-broker/redis.conf")):
        assert not {"appenddirname", "appendfilename"} & {line.split()[0] for line in conf.content.splitlines()
                                                       if line.strip() and not line.startswith("#")}

    def serve(directory: Path, aof: bool):
        port = free_port()
        process = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                    "--save", "", "--appendonly", "yes" if aof else "no"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def cli(*command: str) -> str:
            return subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        wait_until(lambda: cli("ping") == "PONG", timeout=20, what="redis-server answering")
        return process, cli

    def stop(process) -> None:
        process.terminate()
        process.wait(timeout=20)

    source = tmp_path / "source"
    source.mkdir()
    process, cli = serve(source, False)
    try:
        cli("rpush", "celery", "task-1", "task-2")
        cli("set", "unacked", "kept")
        assert cli("save") == "OK"
    finally:
        stop(process)
    data_root, kept = tmp_path / "data", tmp_path / "kept"
    data_root.mkdir()
    kept.mkdir()
    host_backup.restore_broker(str(source / "dump.rdb"), str(data_root), {"redis_broker": {"appendonly": appendonly}},
                               str(kept))
    process, cli = serve(data_root / "redis-broker", appendonly)
    try:
        assert cli("lrange", "celery", "0", "-1").split() == ["task-1", "task-2"] and cli("get", "unacked") == "kept"
        cli("set", "after", "restore")
    finally:
        stop(process)
    if appendonly:  # the AOF Redis went on writing holds the base and what came after
        process, cli = serve(data_root / "redis-broker", True)
        try:
            assert cli("mget", "unacked", "after").split() == ["kept", "restore"]
            assert cli("llen", "celery") == "2"
        finally:
            stop(process)
