"""What a backup holds and how it is checked, and the host side of backup, restore and teardown.

Standard library only: backup.py and restore.py upload this file to the host and run it there
with python3 as root (`edgefit rebuild` sends it on stdin for its teardown step), and the
control machine imports the same module to check a backup's manifest, so a backup's layout and
its checks are written once.

    python3 host_backup.py backup --host NAME --name STAMP --keep N
    python3 host_backup.py restore --dir DIR
    python3 host_backup.py teardown --data-root DIR [--fresh]
    python3 host_backup.py pre-upgrade --host NAME --name STAMP --root DIR --keep N --upgrade TEXT
    python3 host_backup.py upgraded
    python3 host_backup.py rollback

A backup is a directory of files plus manifest.json (host, time, the plan of record, image
references, each file's size and sha256). It is written under a temporary name and renamed when
complete, so an interrupted backup never looks like one. Restore moves the host's current data
aside (never deletes it) before it puts the backup's in place. Progress goes to stdout, one
line per step; errors are one sentence on stderr (exit 1). No secret value is ever printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

BACKUP_ROOT = "/var/backups/edgefit"
PLAN_OF_RECORD = "/etc/edgefit/plan.json"  # edgefit/render.py's PLAN_OF_RECORD (a test keeps them equal)
SECRETS_PATH = "/etc/edgefit/secrets.env"  # edgefit/facts.py's SECRETS_PATH
STACK_DIR = "/opt/edgefit"  # edgefit/render.py's STACK_DIR
PROJECT = "edgefit-dify"  # edgefit/facts.py's COMPOSE_PROJECT
ROLES_SQL = "/etc/postgresql/roles.sql"  # edgefit/render.py's DB_ROLES_SQL_IN_CONTAINER, in the db container
HOST_SCRIPT = "/usr/local/lib/edgefit/host_backup.py"  # where backup.py and restore.py put this file
MANIFEST = "manifest.json"
SCHEMA = 1
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
STAMP = re.compile(r"^\d{8}T\d{6}Z$")
DB_NAME = re.compile(r"^[A-Za-z0-9_]+$")
SECRETS_FILE = "secrets.env"
BROKER_FILE = "redis-broker.rdb"
# Directories under the data root whose contents are backed up as tarballs (when present).
FILE_TREES = ("storage", "plugin_daemon")
# The services that write what a backup holds (Postgres, the file trees, the broker's queue) or
# hold the database open: a restore stops these and only these. nginx, web, the cache Redis,
# PgBouncer (its server connections are ended by the drop, and it reconnects), the sandbox, the
# SSRF proxy and an external vector store keep running: on the slow test hosts stopping and
# starting all 12 containers was about 4 of a rollback's 4.5 minutes.
DATA_SERVICES = ("api", "worker", "worker_beat", "plugin_daemon", "db", "redis_broker")
# Every top-level data directory the stack uses (roles/volumes.py DATA_DIRECTORIES; a test keeps
# them equal): what `rebuild --fresh` removes, after the backup reached the control machine.
DATA_DIRS = ("postgres", "redis", "redis-broker", "storage", "sandbox", "plugin_daemon", "weaviate", "qdrant")
# An upgrade's state (edgefit/upgrade.py reads these names from here): state.json says which
# backup was taken before it and where it stands (upgrading, upgraded, rolled-back); previous/
# holds the compose definition and plan of record it replaced, as the deploy before rendered them.
UPGRADE_DIR = "/var/lib/edgefit/upgrade"
UPGRADE_STATE = f"{UPGRADE_DIR}/state.json"
UPGRADE_PREVIOUS = f"{UPGRADE_DIR}/previous"
UPGRADE_KEPT = (f"{STACK_DIR}/docker-compose.yml", f"{STACK_DIR}/.env", PLAN_OF_RECORD)
ROLLBACK_FROM = ("upgrading", "upgraded")  # the states an upgrade can be rolled back from
COMMAND_TIMEOUT = 3600  # any single dump, copy or tar
WAIT_TIMEOUT = 300  # a service to come up or stop


class BackupError(Exception):
    """One sentence: what is wrong and what to do."""


def stamp_now() -> str:
    return time.strftime(STAMP_FORMAT, time.gmtime())


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The manifest: one definition, used on the host and on the control machine

def digest(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in blocks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise BackupError(f"{directory} is not a backup: it has no {MANIFEST}") from None
    except (OSError, ValueError) as error:
        raise BackupError(f"{path} cannot be read ({error}); the backup is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict):
        raise BackupError(f"{path} is not a manifest this edgefit reads (schema {SCHEMA})")
    return manifest


def check_backup(directory: str) -> dict:
    """Every file of the manifest present with its size and sha256, nothing else beside it, and
    the parts a restore needs there. Returns the manifest; raises BackupError naming the first
    problem. Reads the files only: nothing is changed."""
    manifest = read_manifest(directory)
    files = manifest["files"]
    if not STAMP.match(str(manifest.get("name", ""))):
        raise BackupError(f"the manifest of {directory} has no backup name such as {stamp_now()}")
    if SECRETS_FILE not in files or not any(entry.get("kind") == "postgres" for entry in files.values()):
        raise BackupError(f"the manifest of {directory} lists no {SECRETS_FILE} or no database dump; "
                          "it is not a complete backup")
    for name, entry in sorted(files.items()):
        if "/" in name or name.startswith(".") or name == MANIFEST:
            raise BackupError(f"the manifest of {directory} names a file {name!r} outside the backup")
        if entry.get("kind") == "postgres" and not DB_NAME.match(str(entry.get("database", ""))):
            raise BackupError(f"the manifest of {directory} names a database {entry.get('database')!r} "
                              "that is not a plain name")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise BackupError(f"{path} is missing; the backup is incomplete")
        size, sha = digest(path)
        if size != entry.get("size") or sha != entry.get("sha256"):
            raise BackupError(f"{path} does not match its checksum in {MANIFEST} (the backup is corrupted); "
                              "nothing was changed, use another backup")
    extra = sorted(set(os.listdir(directory)) - set(files) - {MANIFEST})
    if extra:
        raise BackupError(f"{directory} holds {', '.join(extra)}, which its manifest does not list")
    return manifest


def write_manifest(directory: str, info: dict, kinds: dict[str, dict]) -> dict:
    """kinds: file name -> what it is ({"kind": ...}); sizes and checksums are read here."""
    files = {}
    for name, entry in sorted(kinds.items()):
        size, sha = digest(os.path.join(directory, name))
        files[name] = {**entry, "size": size, "sha256": sha}
    manifest = {"schema": SCHEMA, **info, "files": files}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.chmod(path, 0o600)
    return manifest


def complete_backups(root: str) -> list[str]:
    """Names of the complete backups under root, oldest first (partial ones start with a dot)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if STAMP.match(name) and os.path.isfile(os.path.join(root, name, MANIFEST)))


def to_prune(names: list[str], keep: int) -> list[str]:
    """The complete backups beyond the newest `keep` (names sort by time)."""
    return sorted(names)[:-keep] if keep > 0 else sorted(names)


# ---------------------------------------------------------------------------------------------
# Running things on the host

def run(command: list[str], *, stdin=None, stdout=None, timeout: float = COMMAND_TIMEOUT, what: str = "",
        input: bytes | None = None, secret: bool = False) -> str:
    """Run a command, bounded; the last line of its stderr becomes the sentence of a failure
    (not with secret: a message that may quote its input). Returns its stdout as text unless
    stdout goes to a file. stdin: a file; input: bytes."""
    feed = {"input": input} if input is not None else {"stdin": stdin}
    try:
        result = subprocess.run(command, stdout=stdout if stdout is not None else subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout, **feed)
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what or command[0]} did not finish within {timeout:g}s") from None
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed on this host") from None
    if result.returncode != 0:
        if secret:
            raise BackupError(f"{what or command[0]} failed (its message is not shown: it may quote a secret)")
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise BackupError(f"{what or command[0]} failed: {last[:300]}")
    return result.stdout.decode(errors="replace") if stdout is None else ""


def container(service: str) -> str:
    return f"{PROJECT}-{service}-1"


def compose(*arguments: str, timeout: float = WAIT_TIMEOUT, what: str = "") -> str:
    if not os.path.isfile(os.path.join(STACK_DIR, "docker-compose.yml")):
        raise BackupError(f"no stack is deployed here ({STACK_DIR}/docker-compose.yml is missing); deploy first")
    return run(["docker", "compose", "--project-directory", STACK_DIR, "-f", f"{STACK_DIR}/docker-compose.yml",
                *arguments], timeout=timeout, what=what or f"docker compose {' '.join(arguments)}")


def running(service: str) -> bool:
    result = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container(service)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode == 0 and result.stdout.strip() == "true"


PSQL = ("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1")


def psql(sql: str, database: str = "postgres") -> str:
    """SQL as postgres over the container's local socket."""
    return run(["docker", "exec", "-i", "-u", "postgres", container("db"), *PSQL, "-d", database, "-tA", "-c", sql],
               what="psql")


def read_plan_of_record() -> dict:
    try:
        with open(PLAN_OF_RECORD) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise BackupError(f"this host has no plan of record ({PLAN_OF_RECORD}): no stack was deployed here; "
                          "deploy first") from None


def secrets_values(path: str) -> dict[str, str]:
    values = {}
    with open(path) as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return values


# ---------------------------------------------------------------------------------------------
# backup

def backup(host: str, name: str, keep: int, root: str = BACKUP_ROOT) -> str:
    started = time.monotonic()
    record = read_plan_of_record()
    plan = record["plan"]
    data_root = plan["data_root"]
    for service in ("db", "redis_broker"):
        if not running(service):
            raise BackupError(f"{container(service)} is not running, so no consistent backup can be made; "
                              "start the stack (re-run the deploy) first")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    partial = os.path.join(root, f".partial-{name}")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier attempt of this same name never completed
    os.makedirs(partial, mode=0o700)
    old_umask = os.umask(0o077)
    kinds: dict[str, dict] = {}
    try:
        databases = [line.strip() for line in psql(
            "select datname from pg_database where not datistemplate and datname <> 'postgres' order by 1"
        ).splitlines() if line.strip()]
        for database in databases:
            if not DB_NAME.match(database):
                raise BackupError(f"database {database!r} has a name this backup cannot quote safely")
            target = f"db-{database}.dump"
            progress(f"pg_dump -Fc {database} ...")
            with open(os.path.join(partial, target), "wb") as out:
                run(["docker", "exec", "-u", "postgres", container("db"), "pg_dump", "-Fc", "-d", database],
                    stdout=out, what=f"pg_dump of {database}")
            kinds[target] = {"kind": "postgres", "database": database}
            progress(f"  {database}: {os.path.getsize(os.path.join(partial, target)) // 1024} KiB")

        progress("broker Redis: SAVE, then copy its snapshot ...")
        answer = run(["docker", "exec", container("redis_broker"), "redis-cli", "SAVE"], what="redis-cli SAVE").strip()
        if answer != "OK":
            raise BackupError(f"the broker Redis refused SAVE ({answer[:200]})")
        shutil.copyfile(os.path.join(data_root, "redis-broker", "dump.rdb"), os.path.join(partial, BROKER_FILE))
        kinds[BROKER_FILE] = {"kind": "redis", "service": "redis_broker"}

        for tree in FILE_TREES:
            if not os.path.isdir(os.path.join(data_root, tree)):
                continue
            target = f"{tree}.tar.gz"
            progress(f"tar {data_root}/{tree} ...")
            # GNU tar exits 1 when a file changed while it was read (a live upload): still a
            # usable copy of everything else, so only exit 2 is a failure.
            result = subprocess.run(["tar", "--numeric-owner", "-C", data_root, "-czf",
                                     os.path.join(partial, target), tree],
                                    capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            if result.returncode not in (0, 1):
                raise BackupError(f"tar of {tree} failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:300]}")
            kinds[target] = {"kind": "directory", "path": tree}

        shutil.copyfile(SECRETS_PATH, os.path.join(partial, SECRETS_FILE))
        kinds[SECRETS_FILE] = {"kind": "secrets"}
        for entry in os.listdir(partial):
            os.chmod(os.path.join(partial, entry), 0o600)
        info = {"host": host, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "data_root": data_root, "databases": databases, "plan_of_record": record,
                "images": {service: entry["image"] for service, entry in sorted(plan["services"].items())}}
        manifest = write_manifest(partial, info, kinds)
        os.sync()
        final = os.path.join(root, name)
        if os.path.exists(final):
            raise BackupError(f"{final} exists already; give another name")
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.umask(old_umask)
    total = sum(entry["size"] for entry in manifest["files"].values())
    progress(f"backup {final}: {len(kinds)} files, {total / 2**20:.1f} MiB, {time.monotonic() - started:.0f}s")
    prune(root, keep)
    return final


def prune(root: str, keep: int) -> None:
    for name in to_prune(complete_backups(root), keep):
        shutil.rmtree(os.path.join(root, name))
        progress(f"pruned old backup {root}/{name} (keeping the newest {keep})")
    for name in os.listdir(root):
        if name.startswith(".partial-"):  # an interrupted backup: never complete, never used
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# restore

def restore(directory: str, rollback: bool = False) -> str:
    """Put the backup in `directory` onto this host; returns where the host's own data was kept.
    The services that hold data (DATA_SERVICES) are left stopped: the deploy renders the
    restored secrets and starts them. rollback (the backup's secrets and the compose definitions
    of the database and the broker are the ones they run with): both start again as soon as
    their data is back, the broker before the pg_restore, so their first health probes, which
    every Dify service's start waits for (compose's service_healthy; Docker 20.10 probes first
    one interval after a start), pass while the rest is restored; the compose up that follows
    leaves them running."""
    manifest = check_backup(directory)  # before anything is touched
    plan = read_plan_of_record()["plan"]  # this host's own plan stays
    stopping = [name for name in DATA_SERVICES if name in plan.get("services", {})]
    data_root = plan["data_root"]
    files = manifest["files"]
    dumps = {entry["database"]: name for name, entry in sorted(files.items()) if entry.get("kind") == "postgres"}
    kept = os.path.join(data_root, f".pre-restore-{stamp_now()}")
    progress(f"backup {manifest.get('name')} of {manifest.get('host')}: checksums good")

    progress(f"stopping {', '.join(stopping)} ...")
    compose("stop", *stopping, timeout=WAIT_TIMEOUT + 120)
    os.makedirs(kept, mode=0o700)
    progress(f"keeping this host's current data in {kept} (never deleted by edgefit) ...")
    if os.path.exists(SECRETS_PATH):
        shutil.copy2(SECRETS_PATH, os.path.join(kept, SECRETS_FILE))
    run(["cp", "-a", os.path.join(data_root, "postgres"), os.path.join(kept, "postgres")],
        what="copying the Postgres cluster aside")
    for tree in (*FILE_TREES, "redis-broker"):
        if os.path.exists(os.path.join(data_root, tree)):
            os.rename(os.path.join(data_root, tree), os.path.join(kept, tree))

    broker_first = rollback and "redis_broker" in stopping
    started = ["db", "redis_broker"] if broker_first else ["db"]
    if broker_first:
        restore_broker(os.path.join(directory, BROKER_FILE), data_root, plan, kept)
    progress(f"starting {' and '.join(started)} ...")
    compose("start", *started)
    roles_then_sql("".join(f'drop database if exists "{database}" with (force);\ncreate database "{database}";\n'
                           for database in dumps), what="emptying the databases", wait_ready=True)
    for database, dump in dumps.items():
        progress(f"pg_restore {database} ...")
        with open(os.path.join(directory, dump), "rb") as handle:
            run(["docker", "exec", "-i", "-u", "postgres", container("db"), "pg_restore", "--clean", "--if-exists",
                 "--exit-on-error", "-d", database], stdin=handle, what=f"pg_restore of {database}")
    secrets = secrets_values(os.path.join(directory, SECRETS_FILE))
    password = secrets.get("DB_PASSWORD", "")
    if not re.match(r"^[A-Za-z0-9_-]{24,}$", password):
        raise BackupError("the backup's secrets.env has no usable DB_PASSWORD")
    # the roles again (what a dump from before the roles brought becomes theirs), and the password
    roles_then_sql(f"alter role postgres password '{password}';\n", what="setting the database's password",
                   secret=True)
    if not rollback:
        compose("stop", "db")

    for name, entry in sorted(files.items()):
        if entry.get("kind") == "directory":
            progress(f"restoring {data_root}/{entry['path']} ...")
            unpack(os.path.join(directory, name), data_root, entry["path"])
    if not broker_first:
        restore_broker(os.path.join(directory, BROKER_FILE), data_root, plan, kept)

    temporary = SECRETS_PATH + ".restoring"
    shutil.copyfile(os.path.join(directory, SECRETS_FILE), temporary)
    os.chmod(temporary, 0o600)
    os.replace(temporary, SECRETS_PATH)
    if os.path.basename(directory.rstrip("/")).startswith(".incoming-"):  # uploaded by restore.py
        final = os.path.join(os.path.dirname(directory.rstrip("/")), manifest["name"])
        if os.path.exists(final):
            shutil.rmtree(directory)
        else:
            os.rename(directory, final)
    stopped = [name for name in stopping if not (rollback and name in started)]
    progress(f"restored; this host's previous data is in {kept}. {', '.join(stopped)} stay stopped until "
             + ("the previous compose definition is back and starts them" if rollback else
                "the deploy renders the restored secrets and starts them (edgefit restore runs it)"))
    return kept


READY_TRIES = 150  # pg_isready once a second in the db container: the bounded wait for its start


def roles_then_sql(sql: str, what: str, wait_ready: bool = False, secret: bool = False) -> None:
    """One exec in the db container, as postgres (on the emulated test hosts each exec costs
    seconds): with wait_ready, a bounded wait until the server accepts connections; the stack's
    roles.sql, without the roles' passwords (the deploy after a restore sets them from the
    restored secrets), so Dify's and the plugin daemon's roles exist and own their databases and
    tables (a stack rendered before edgefit had roles mounts none); then `sql` from stdin, so it
    never reaches a process list, each statement on its own (CREATE DATABASE cannot run in a
    transaction). secret: psql's message could quote the statement."""
    psql_command = f"{' '.join(PSQL)} -d postgres"
    wait = (f"i=0; until pg_isready -q -h 127.0.0.1; do i=$((i+1)); [ $i -lt {READY_TRIES} ] || "
            f"{{ echo 'the database did not accept connections within {READY_TRIES} s' >&2; exit 3; }}; "
            "sleep 1; done; ") if wait_ready else ""
    run(["docker", "exec", "-i", "-u", "postgres", container("db"), "sh", "-ec",
         f"{wait}test ! -f {ROLES_SQL} || {psql_command} -f {ROLES_SQL}; {psql_command}"],
        input=sql.encode(), timeout=READY_TRIES + WAIT_TIMEOUT, what=what, secret=secret)


def unpack(tarball: str, data_root: str, tree: str) -> None:
    with tarfile.open(tarball) as archive:
        for member in archive:
            if member.name != tree and not member.name.startswith(tree + "/") or ".." in member.name.split("/"):
                raise BackupError(f"{os.path.basename(tarball)} holds {member.name!r}, outside {tree}/")
    run(["tar", "--numeric-owner", "-p", "-C", data_root, "-xzf", tarball], what=f"unpacking {tree}")


# Redis 7's own names (appenddirname, appendfilename: templates/redis.conf.j2 keeps the defaults)
# of a multi-part append-only file: a manifest naming a base file, which may be an RDB.
AOF_DIR, AOF_NAME = "appendonlydir", "appendonly.aof"


def restore_broker(snapshot: str, data_root: str, plan: dict, kept: str) -> None:
    """The broker's snapshot into a fresh data directory. With appendonly on, Redis ignores a
    dump.rdb at start and reads its append-only file: the snapshot becomes that file's base
    (Redis 7's multi-part AOF: a manifest naming the RDB as base, seq 1); Redis adds its
    incremental file when it starts. (A throwaway server loading the RDB and rewriting the AOF
    did the same in about 40 s on the test hosts, most of it starting its container.)"""
    target = os.path.join(data_root, "redis-broker")
    previous = os.path.join(kept, "redis-broker")
    uid = os.stat(previous).st_uid if os.path.exists(previous) else 999
    os.makedirs(target, exist_ok=True)
    progress("restoring the broker Redis ...")
    if plan["redis_broker"].get("appendonly"):
        aof_dir = os.path.join(target, AOF_DIR)
        os.makedirs(aof_dir, exist_ok=True)
        base = f"{AOF_NAME}.1.base.rdb"
        shutil.copyfile(snapshot, os.path.join(aof_dir, base))
        with open(os.path.join(aof_dir, f"{AOF_NAME}.manifest"), "w") as manifest:
            manifest.write(f"file {base} seq 1 type b\n")
    else:
        shutil.copyfile(snapshot, os.path.join(target, "dump.rdb"))
    run(["chown", "-R", f"{uid}:{uid}", target], what="chown of the broker data")


# ---------------------------------------------------------------------------------------------
# teardown (edgefit rebuild)

def teardown(data_root: str, fresh: bool) -> None:
    """Stop and remove the stack, its containers, networks and rendered files; with fresh, also
    the data directories (the caller has the backup on the control machine already)."""
    if os.path.isfile(os.path.join(STACK_DIR, "docker-compose.yml")):
        progress("docker compose down ...")
        compose("down", "--remove-orphans", "--timeout", "60", timeout=WAIT_TIMEOUT + 120)
    leftovers = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"]).split()
    if leftovers:
        run(["docker", "rm", "-f", *leftovers], what="removing the stack's containers")
    shutil.rmtree(STACK_DIR, ignore_errors=True)
    if os.path.exists(PLAN_OF_RECORD):
        os.remove(PLAN_OF_RECORD)
    progress(f"stack removed ({STACK_DIR} and {PLAN_OF_RECORD})")
    if fresh:
        for name in DATA_DIRS:
            path = os.path.join(data_root, name)
            if os.path.exists(path):
                shutil.rmtree(path)
                progress(f"removed {path} (--fresh)")


# ---------------------------------------------------------------------------------------------
# upgrades (edgefit/upgrade.py, roles/upgrade.py, rollback.py)

def read_upgrade_state() -> dict | None:
    try:
        with open(UPGRADE_STATE) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise BackupError(f"{UPGRADE_STATE} cannot be read ({error}); look at it before going on") from None


def write_upgrade_state(state: dict) -> None:
    os.makedirs(UPGRADE_DIR, mode=0o700, exist_ok=True)
    temporary = UPGRADE_STATE + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, UPGRADE_STATE)


def pre_upgrade(host: str, name: str, root: str, keep: int, upgrade: str) -> str:
    """Before an upgrade: the backup, and the compose definition and plan of record it replaces.
    An earlier upgrade that never finished (it failed without a rollback) keeps its backup and
    copies: they, not the half-upgraded host, are the last state known good."""
    state = read_upgrade_state()
    if state and state.get("status") == "upgrading":
        progress(f"an earlier upgrade ({state.get('upgrade')}) did not finish: keeping its backup "
                 f"{state['backup']} and the compose definition before it, not taking new ones")
        write_upgrade_state({**state, "upgrade": upgrade, "retried": stamp_now()})
        return state["backup"]
    final = backup(host, name, keep, root)
    shutil.rmtree(UPGRADE_PREVIOUS, ignore_errors=True)
    os.makedirs(UPGRADE_PREVIOUS, mode=0o700)
    os.chmod(UPGRADE_DIR, 0o700)
    for path in UPGRADE_KEPT:
        shutil.copy2(path, os.path.join(UPGRADE_PREVIOUS, os.path.basename(path)))
    write_upgrade_state({"status": "upgrading", "backup": final, "host": host, "upgrade": upgrade,
                         "at": stamp_now(), "images": read_manifest(final)["images"]})
    progress(f"pre-upgrade backup {final}; previous compose definition kept in {UPGRADE_PREVIOUS}")
    return final


def mark_upgraded() -> None:
    state = read_upgrade_state()
    if state:
        write_upgrade_state({**state, "status": "upgraded", "upgraded": stamp_now()})


def rollback() -> str:
    """Back to before the last upgrade: its backup restored (the current data kept aside, as any
    restore does), the previous compose definition and plan of record put back, the stack started.
    Returns the backup's path. The caller waits for health."""
    state = read_upgrade_state()
    if not state or state.get("status") not in ROLLBACK_FROM:
        raise BackupError("there is no upgrade to roll back on this host"
                          + (f" (the last one, {state.get('upgrade')}, was rolled back already)" if state else ""))
    missing = [path for path in UPGRADE_KEPT
               if not os.path.isfile(os.path.join(UPGRADE_PREVIOUS, os.path.basename(path)))]
    if missing:
        raise BackupError(f"{UPGRADE_PREVIOUS} lacks the previous {', '.join(missing)}; restore the backup "
                          f"{state['backup']} with `edgefit restore` instead")
    progress(f"rolling back {state.get('upgrade')}: restoring the pre-upgrade backup {state['backup']} ...")
    # An upgrade of Dify's images leaves the container definitions of the database and the broker
    # as they were, so both run on into the compose up below, healthy by then (compose still
    # recreates them if the upgrade's deploy changed them too).
    restore(state["backup"], rollback=True)
    for path in UPGRADE_KEPT:
        temporary = path + ".rollback"
        shutil.copy2(os.path.join(UPGRADE_PREVIOUS, os.path.basename(path)), temporary)
        os.replace(temporary, path)
    progress("previous compose definition and plan of record back; starting the stack ...")
    compose("up", "-d", "--remove-orphans", "--quiet-pull", timeout=WAIT_TIMEOUT + 300)
    write_upgrade_state({**state, "status": "rolled-back", "rolled_back": stamp_now()})
    return state["backup"]


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="host_backup.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("backup")
    one.add_argument("--host", required=True)
    one.add_argument("--name", required=True)
    one.add_argument("--keep", type=int, default=3)
    one.add_argument("--root", default=BACKUP_ROOT)
    two = commands.add_parser("restore")
    two.add_argument("--dir", required=True)
    three = commands.add_parser("teardown")
    three.add_argument("--data-root", required=True)
    three.add_argument("--fresh", action="store_true")
    four = commands.add_parser("pre-upgrade")
    four.add_argument("--host", required=True)
    four.add_argument("--name", required=True)
    four.add_argument("--root", required=True)
    four.add_argument("--keep", type=int, default=2)
    four.add_argument("--upgrade", required=True)
    commands.add_parser("upgraded")
    commands.add_parser("rollback")
    args = parser.parse_args(argv)
    try:
        if args.command in ("backup", "pre-upgrade") and (not STAMP.match(args.name) or args.keep < 1):
            raise BackupError(f"--name must look like {stamp_now()} and --keep be 1 or more")
        if args.command == "backup":
            backup(args.host, args.name, args.keep, args.root)
        elif args.command == "pre-upgrade":
            pre_upgrade(args.host, args.name, args.root, args.keep, args.upgrade)
        elif args.command == "upgraded":
            mark_upgraded()
        elif args.command == "rollback":
            rollback()
        elif args.command == "restore":
            restore(args.dir)
        else:
            teardown(args.data_root, args.fresh)
    except BackupError as error:
        print(f"edgefit {args.command}: {error}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError) as error:
        print(f"edgefit {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
