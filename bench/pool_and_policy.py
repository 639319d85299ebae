#!/usr/bin/env python3
"""Two of edgefit's measured claims, side by side in one run on this machine.

1. Postgres connections. Upstream Dify's database (postgres:15 with `-c max_connections=100
   -c shared_buffers=128MB ...`, clients straight at it) against edgefit's 2C4G plan (the
   rendered postgresql.conf, pg_hba.conf, pgbouncer.ini and userlist.txt, PgBouncer in front).
   pgbench select-only (-S) and TPC-B at 50, 200, 500 clients (1000 with --full): TPS, failed
   transactions, aborted clients, Postgres's "too many clients" and PgBouncer's
   "no more connections allowed" refusals, Postgres backends, and the peak PSS of the server
   processes. The rendered PgBouncer takes only the plan's max_client_conn (50 on 2C4G, sized to
   the stack's own pools); `edgefit-wide` is the same files with that one line raised, to show
   what pooling does with more clients than Postgres would accept.

2. Redis as cache + Celery broker once memory fills. One instance with allkeys-lru against
   edgefit's two rendered instances (cache allkeys-lru, broker noeviction): broker state goes in
   first, then cache writes go 3x past maxmemory; which broker keys survive, how many keys were
   evicted, how many cache writes failed, and whether Celery can still publish.

Both use the real Debian servers (postgresql-15, pgbouncer, redis-server) through the helpers in
tests/servers_helpers.py: loopback only, free ports, temporary directories removed afterwards,
every wait and loop bounded, and only the processes started here are stopped, by PID.

    .venv/bin/python bench/pool_and_policy.py [--quick | --full] [--json FILE]

Timings depend on the machine and on what else runs on it: read the ratios between the rows of
one run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import psutil  # noqa: E402  (an edgefit dependency)

from edgefit.plan import Plan  # noqa: E402
from edgefit.secrets import Secrets  # noqa: E402
from servers_helpers import (  # noqa: E402
    PG_BIN,
    Server,
    base_env,
    free_port,
    parse_env,
    preset_plan,
    relocate,
    render_files,
    require_executable,
    require_module,
    run_checked,
    server_dir,
    service_user,
    url_password,
    write_file,
)

PRESET = "2C4G"
START_TIMEOUT_S = 30
EXIT_MISSING_TOOL = 77  # what automake/ctest call "skipped"
REDIS_RESERVE_S = 10  # kept for the Redis comparison when Postgres runs against the deadline

# Upstream Dify 1.13.3, docker/.env.example, passed to postgres as `-c` by the compose file.
UPSTREAM_POSTGRES = {
    "max_connections": "100",
    "shared_buffers": "128MB",
    "work_mem": "4MB",
    "maintenance_work_mem": "64MB",
    "effective_cache_size": "4096MB",
    "statement_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
}

MODES = {"select-only": ["-S"], "tpc-b": []}


@dataclass(frozen=True)
class Profile:
    clients: tuple[int, ...]
    seconds: int
    modes: tuple[str, ...] = tuple(MODES)
    redis_fill_factor: float = 3.0


PROFILES = {
    "quick": Profile(clients=(50, 200), seconds=2),
    "default": Profile(clients=(50, 200, 500), seconds=8),
    "full": Profile(clients=(50, 200, 500, 1000), seconds=8),
}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# =============================================================================================
# Memory: PSS of the server processes started here

def tree_pss(root_pid: int) -> tuple[int, int]:
    """PSS in bytes of a process and all its descendants (a postmaster and its backends), and
    how many of them are TCP client backends (Postgres titles them "postgres: user db
    127.0.0.1(port) ..."). Processes that exit between listing and reading are skipped."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = backends = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
            if proc.pid != root_pid and "127.0.0.1(" in " ".join(proc.cmdline()):
                backends += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total, backends


class PssSampler:
    """Samples the summed PSS of named process trees in a thread; keeps the peak of the sum
    and each tree's value at that peak."""

    def __init__(self, roots: dict[str, int], interval: float = 0.25):
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_backends = 0  # client backends of the trees, at their own peak
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        measured = {name: tree_pss(pid) for name, pid in self.roots.items()}
        parts = {name: pss for name, (pss, _) in measured.items()}
        self.peak_backends = max(self.peak_backends, sum(backends for _, backends in measured.values()))
        self.samples += 1
        if sum(parts.values()) > self.peak:
            self.peak = sum(parts.values())
            self.peak_parts = parts

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()


def mib(value_bytes: int) -> float:
    return round(value_bytes / 1024 / 1024, 1)


# =============================================================================================
# Postgres: upstream direct vs edgefit behind PgBouncer

@dataclass
class PgRun:
    config: str
    mode: str
    clients: int
    exit_code: int | None
    tps: float | None  # pgbench's figure: excludes the initial connection time
    connect_s: float | None  # pgbench's "initial connection time"
    transactions: int
    failed_transactions: int | None
    aborted_clients: int
    too_many_clients: int  # Postgres: "FATAL: sorry, too many clients already"
    pooler_refusals: int  # PgBouncer: "no more connections allowed (max_client_conn)"
    other_errors: int
    timed_out: bool
    seconds: float
    peak_pss_mib: float
    peak_pss_parts_mib: dict[str, float]
    peak_backends: int  # Postgres client backends seen at once (sampled)
    first_error: str | None = None
    stderr_tail: list[str] | None = None  # pgbench's last messages, for reading the failures
    stdout_tail: list[str] | None = None

    @property
    def errors(self) -> int:
        """Error reports of every kind; a non-zero exit with none of them counts as one."""
        counted = (self.aborted_clients + self.too_many_clients + self.pooler_refusals + self.other_errors
                   + (self.failed_transactions or 0) + int(self.timed_out))
        return counted or int(self.exit_code != 0)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.errors == 0 and self.transactions > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "ok": self.ok}


def parse_pgbench(stdout: str, stderr: str) -> dict:
    out = {}
    for key, pattern in {
        "processed": r"number of transactions actually processed: (\d+)",
        "failed": r"number of failed transactions: (\d+)",
        "tps": r"tps = ([\d.]+)",
        "connect_ms": r"initial connection time = ([\d.]+) ms",
    }.items():
        match = re.search(pattern, stdout)
        if match:
            out[key] = float(match.group(1))
    # pgbench's two threads write to stderr at once, so lines can interleave: count phrases in
    # the whole text, not lines.
    text = stdout + stderr
    error_lines = [line for line in stderr.splitlines() if "error" in line.lower() or "fatal" in line.lower()]
    out["too_many"] = stderr.count("too many clients already")
    out["refusals"] = stderr.count("no more connections allowed")
    aborted = set(re.findall(r"client (\d+) aborted", text))
    # A failed initial connection ends pgbench as a whole ("could not create connection for
    # client N"): count those clients as aborted.
    connect_failed = set(re.findall(r"could not create connection for client (\d+)", text))
    out["aborted"] = len(aborted | connect_failed)
    explained = (out["too_many"] + out["refusals"] + stderr.count("could not create connection for client")
                 + stderr.count(" aborted in command"))
    out["other"] = max(0, stderr.count("error:") - explained)
    out["first_error"] = error_lines[0][:240] if error_lines else None
    return out


@dataclass
class PgTarget:
    config: str
    port: int
    roots: dict[str, Server]  # whose process trees count in the memory


class PgBench:
    def __init__(self, pgbench: str, env: dict[str, str], user: str, password: str, database: str):
        self.pgbench = pgbench
        self.env = {**env, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
        self.user = user
        self.database = database

    def argv(self, port: int, *args: str) -> list[str]:
        return [self.pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", self.user, *args, self.database]

    def init(self, port: int) -> None:
        run_checked(self.argv(port, "-i", "-q", "-s", "1"), what="pgbench -i", timeout=120, env=self.env)

    def warm_up(self, port: int) -> None:
        subprocess.run(self.argv(port, "-S", "-n", "-c", "4", "-j", "2", "-T", "1"),
                       capture_output=True, text=True, timeout=60, env=self.env)

    def run(self, target: PgTarget, mode: str, clients: int, seconds: int) -> PgRun:
        # pgbench's -T clock runs while its clients log in, and a SCRAM login through PgBouncer
        # (one thread) takes ~5 ms here: 1000 clients used up a 5 s run before the first
        # transaction (0 processed, exit 0). Allow 10 ms per client on top of the run.
        duration = seconds + math.ceil(clients / 100)
        argv = self.argv(target.port, *MODES[mode], "-n", "-c", str(clients), "-j", "2", "-T", str(duration))
        # Bounded: a hang (e.g. PgBouncer out of descriptors) ends in a kill of this pgbench,
        # which we started.
        timeout = duration + 30 + clients * 0.05
        started = time.monotonic()
        timed_out = False
        with PssSampler({name: server.pid for name, server in target.roots.items()}) as sampler:
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
                stdout, stderr, code = result.stdout, result.stderr, result.returncode
            except subprocess.TimeoutExpired as expired:
                timed_out = True
                stdout = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
                stderr = (expired.stderr or b"").decode(errors="replace") if isinstance(expired.stderr, bytes) else (expired.stderr or "")
                code = None
        parsed = parse_pgbench(stdout, stderr)
        return PgRun(
            config=target.config, mode=mode, clients=clients, exit_code=code,
            tps=round(parsed["tps"], 1) if "tps" in parsed else None,
            connect_s=round(parsed["connect_ms"] / 1000, 2) if "connect_ms" in parsed else None,
            transactions=int(parsed.get("processed", 0)),
            failed_transactions=int(parsed["failed"]) if "failed" in parsed else None,
            aborted_clients=parsed["aborted"], too_many_clients=parsed["too_many"],
            pooler_refusals=parsed["refusals"], other_errors=parsed["other"], timed_out=timed_out,
            seconds=round(time.monotonic() - started, 1), peak_pss_mib=mib(sampler.peak),
            peak_pss_parts_mib={name: mib(value) for name, value in sampler.peak_parts.items()},
            peak_backends=sampler.peak_backends,
            first_error=parsed["first_error"] or (f"timed out after {timeout:.0f} s" if timed_out else None),
            stderr_tail=[line[:200] for line in stderr.splitlines()[-8:]],
            stdout_tail=[line[:200] for line in stdout.splitlines()[-4:]],
        )


def nofile_soft(pid: int) -> int | None:
    match = re.search(r"^Max open files\s+(\d+|unlimited)", Path(f"/proc/{pid}/limits").read_text(), re.M)
    if not match:
        return None
    return 1 << 30 if match.group(1) == "unlimited" else int(match.group(1))


def raise_own_nofile(wanted: int) -> None:
    """pgbench needs a descriptor per client: raise this process's soft limit (inherited by the
    pgbench we start) up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def bench_postgres(profile: Profile, deadline: Deadline, log) -> dict:
    require_module("psycopg", "psycopg[binary]")
    initdb = require_executable(PG_BIN / "initdb", "postgresql-15")
    postgres = require_executable(PG_BIN / "postgres", "postgresql-15")
    pgbench = require_executable(PG_BIN / "pgbench", "postgresql-15")
    psql = require_executable(PG_BIN / "psql", "postgresql-client-15")
    pgbouncer = require_executable("pgbouncer", "pgbouncer")
    owner = service_user()
    raise_own_nofile(max(profile.clients) * 2 + 200)

    plan: Plan = preset_plan(PRESET)
    files = render_files(plan, Secrets.generate())
    env = parse_env(files[".env"].content)
    user, password, database = env["DB_USERNAME"], env["DB_PASSWORD"], env["DB_DATABASE"]
    planned_clients = plan.pgbouncer.max_client_conn
    wide_max_client_conn = max(profile.clients) + 10  # room for pgbench's own set-up connection
    runs: list[PgRun] = []
    skipped: list[str] = []
    configs = {
        "upstream": {"note": "postgres -c max_connections=100 -c shared_buffers=128MB ... (Dify's compose), "
                             "clients straight at it", "settings": dict(UPSTREAM_POSTGRES)},
        "edgefit": {"note": f"rendered {PRESET} postgresql.conf + pgbouncer.ini + userlist.txt, as rendered",
                    "settings": {"max_connections": plan.postgres.max_connections,
                                 "shared_buffers": f"{plan.postgres.shared_buffers_mib}MB",
                                 "pool_mode": plan.pgbouncer.pool_mode,
                                 "default_pool_size": plan.pgbouncer.default_pool_size,
                                 "max_db_connections": plan.pgbouncer.max_db_connections,
                                 "max_client_conn": planned_clients,
                                 "pgbouncer_nofile": plan.pgbouncer.nofile_limit}},
        "edgefit-wide": {"note": f"the same rendered files with one line changed: max_client_conn "
                                 f"{planned_clients} -> {wide_max_client_conn}; run only above {planned_clients} clients",
                         "settings": {"max_client_conn": wide_max_client_conn}},
    }

    with server_dir("bench-pg", owner) as tmp:
        tool_env = base_env(tmp)
        bench = PgBench(pgbench, tool_env, user, password, database)
        upstream_data, edgefit_data = tmp / "data-upstream", tmp / "data-edgefit"
        # One bootstrap for both configs, as the image's entrypoint makes it (initdb as
        # POSTGRES_USER with POSTGRES_PASSWORD), then copied: both run on the same data.
        pwfile = write_file(tmp / "pwfile", password + "\n", 0o600, owner)
        run_checked([initdb, "-D", str(upstream_data), "-U", user, f"--pwfile={pwfile}", "-E", "UTF8",
                     "--no-locale", "--no-sync"], what="initdb", timeout=120, owner=owner, env=tool_env, cwd=tmp)
        pwfile.unlink()
        # Both authenticate TCP clients with SCRAM (upstream's image appends `host all all all
        # scram-sha-256`, and Dify connects from another container); the rendered pg_hba.conf
        # says the same for 127.0.0.1, so both use it and pay the same cost per login.
        hba_file = write_file(tmp / "pg_hba.conf", files["conf/postgres/pg_hba.conf"].content, 0o644, owner)
        upstream_port, edgefit_port = free_port(), free_port()
        while edgefit_port == upstream_port:
            edgefit_port = free_port()
        pg_conf_path = "conf/postgres/postgresql.conf"
        edgefit_conf = write_file(tmp / "postgresql.conf", relocate(files[pg_conf_path].content, pg_conf_path, {
            "listen_addresses = '*'": "listen_addresses = '127.0.0.1'",
            "port = 5432": f"port = {edgefit_port}",
        }), 0o644, owner)

        def postgres_server(name: str, data: Path, sockets: Path, extra: list[str]) -> Server:
            sockets.mkdir(mode=0o700, exist_ok=True)
            if owner:
                os.chown(sockets, owner.uid, owner.gid)
            return Server(name, [postgres, "-D", str(data), "-c", f"unix_socket_directories={sockets}",
                                 "-c", f"hba_file={hba_file}", *extra],
                          workdir=tmp, env=tool_env, run_as=owner, stop_signal=signal.SIGINT)

        def ready(port: int, db: str):
            def probe():
                import psycopg
                with psycopg.connect(host="127.0.0.1", port=port, dbname=db, user=user, password=password,
                                     connect_timeout=5, autocommit=True, prepare_threshold=None) as conn:
                    return conn.execute("SELECT 1").fetchone() == (1,)
            return probe

        # Upstream: Dify's compose command line over initdb's own postgresql.conf.
        upstream_args = ["-c", "listen_addresses=127.0.0.1", "-c", f"port={upstream_port}"]
        for key, value in UPSTREAM_POSTGRES.items():
            upstream_args += ["-c", f"{key}={value}"]
        upstream = postgres_server("postgres-upstream", upstream_data, tmp / "sock-upstream", upstream_args)
        with upstream.running(ready(upstream_port, "postgres"), timeout=START_TIMEOUT_S, what="upstream postgres"):
            run_checked([psql, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-h", "127.0.0.1", "-p", str(upstream_port),
                         "-U", user, "-d", "postgres", "-c", f'CREATE DATABASE "{database}"'],
                        what="CREATE DATABASE", timeout=60, env={**tool_env, "PGPASSWORD": password})
            bench.init(upstream_port)
        run_checked(["cp", "-a", str(upstream_data), str(edgefit_data)], what="copy the data directory", timeout=120)
        edgefit_pg = postgres_server("postgres-edgefit", edgefit_data, tmp / "sock-edgefit",
                                     ["-c", f"config_file={edgefit_conf}"])

        userlist = files["conf/pgbouncer/userlist.txt"]
        userlist_file = write_file(tmp / "userlist.txt", userlist.content, userlist.mode, owner)
        ini_path = "conf/pgbouncer/pgbouncer.ini"

        @contextmanager
        def bouncer(config: str):
            """A PgBouncer of its own for one run: its server connections end with it, so no
            idle backend of an earlier run counts in the next run's memory."""
            port = free_port()
            extra = ({f"max_client_conn = {planned_clients}": f"max_client_conn = {wide_max_client_conn}"}
                     if config == "edgefit-wide" else {})
            ini = write_file(tmp / f"pgbouncer-{config}.ini", relocate(files[ini_path].content, ini_path, {
                "dify = host=db port=5432 dbname=dify": f"dify = host=127.0.0.1 port={edgefit_port} dbname=dify",
                "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
                "listen_port = 6432": f"listen_port = {port}",
                "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {userlist_file}",
                **extra,
            }), 0o644, owner)
            server = Server(f"pgbouncer-{config}", [pgbouncer, str(ini)], workdir=tmp, env=tool_env,
                            run_as=owner, nofile=plan.pgbouncer.nofile_limit)  # compose: ulimits nofile
            with server.running(ready(port, database), timeout=START_TIMEOUT_S, what=f"{config} pgbouncer"):
                yield PgTarget(config, port, {"postgres": edgefit_pg, "pgbouncer": server})

        with ExitStack() as running:
            running.enter_context(upstream.running(ready(upstream_port, database), timeout=START_TIMEOUT_S,
                                                   what="upstream postgres"))
            running.enter_context(edgefit_pg.running(ready(edgefit_port, database), timeout=START_TIMEOUT_S,
                                                     what="edgefit postgres"))
            bench.warm_up(upstream_port)
            with bouncer("edgefit") as target:
                bench.warm_up(target.port)
            for name, config in configs.items():
                log(f"postgres {name}: {config['note']}")
            cell = 0
            for mode in profile.modes:
                for clients in profile.clients:
                    order = ["upstream", "edgefit"] + (["edgefit-wide"] if clients > planned_clients else [])
                    if cell % 2:  # alternate who goes first, so drift in the machine's load evens out
                        order.reverse()
                    cell += 1
                    for config in order:
                        needed = profile.seconds + math.ceil(clients / 100) + 5 + REDIS_RESERVE_S
                        if deadline.left() < needed:
                            skipped.append(f"{config} {mode} {clients} clients: out of time")
                            continue
                        with ExitStack() as per_run:
                            if config == "upstream":
                                target = PgTarget(config, upstream_port, {"postgres": upstream})
                            else:
                                target = per_run.enter_context(bouncer(config))
                                soft = nofile_soft(target.roots["pgbouncer"].pid) or 0
                                configs[config]["settings"]["pgbouncer_nofile"] = soft
                                need = clients + plan.pgbouncer.max_db_connections + 20
                                if need > soft:  # measured: clients hang on "Too many open files"
                                    skipped.append(f"{config} {mode} {clients} clients: PgBouncer's "
                                                   f"open-files limit {soft} < {need}")
                                    continue
                            run = bench.run(target, mode, clients, profile.seconds)
                        runs.append(run)
                        log(f"  {run.config:<13} {mode:<11} {clients:>5} clients: tps {run.tps}, "
                            f"errors {run.errors}, peak PSS {run.peak_pss_mib} MiB")

    return {"configs": configs, "runs": [run.to_dict() for run in runs], "skipped": skipped}


# =============================================================================================
# Redis: one instance for cache + broker vs edgefit's two

BROKER_DB = 1  # Dify: CELERY_BROKER_URL=redis://...:6379/1; the cache (REDIS_DB) is 0
QUEUE_MESSAGES = 1000
UNACKED = 4  # prefetched, not yet acknowledged (Dify: prefetch multiplier 1 x greenlets)
CACHE_VALUE = 16 * 1024
CACHE_BATCH = 32  # 512 KiB per pipeline: a small query buffer, so "full" stays full after it
PUBLISHES_AFTER_FILL = 300  # task messages a producer keeps sending once memory is full


def kombu_message(index: int) -> bytes:
    """A Celery task message as kombu stores it in the queue list (JSON, base64 body)."""
    body = {"body": "W1siZG9jdW1lbnRfaWQiXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbH1d" + "A" * 600,
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "tasks.document_indexing_task", "id": f"task-{index:06d}",
                        "retries": 0, "root_id": f"task-{index:06d}", "parent_id": None},
            "properties": {"correlation_id": f"task-{index:06d}", "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": f"tag-{index:06d}"}}
    return json.dumps(body).encode()


BROKER_KEYS = ("_kombu.binding.celery", "celery", "unacked")


def load_broker_state(client) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.sadd("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    for start in range(0, QUEUE_MESSAGES, 100):
        pipe.lpush("celery", *[kombu_message(i) for i in range(start, min(QUEUE_MESSAGES, start + 100))])
    for index in range(UNACKED):
        pipe.hset("unacked", f"tag-u{index}", json.dumps([kombu_message(10_000 + index).decode(), "", "celery"]))
    pipe.zadd("unacked_index", {f"tag-u{index}": time.time() for index in range(UNACKED)})
    pipe.execute()


def broker_state(client) -> dict:
    return {
        "_kombu.binding.celery": client.scard("_kombu.binding.celery"),
        "celery": client.llen("celery"),
        "unacked": client.hlen("unacked"),
    }


def try_command(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as error:  # noqa: BLE001 - the error is the result
        return f"{type(error).__name__}: {str(error)[:100]}"


@dataclass
class RedisInstance:
    name: str
    server: Server
    port: int
    password: str | None

    def client(self, db: int = 0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=10)


def bench_redis_layout(layout: str, note: str, cache: RedisInstance, broker: RedisInstance,
                       fill_factor: float, deadline: Deadline) -> dict:
    broker_client = broker.client(BROKER_DB)
    cache_client = cache.client(0)
    load_broker_state(broker_client)
    before = broker_state(broker_client)
    maxmemory = int(cache_client.config_get("maxmemory")["maxmemory"])
    target_bytes = int(fill_factor * maxmemory)
    value = b"v" * CACHE_VALUE
    written = errors = attempted = 0
    first_error = None
    # Bounded by bytes, by a key count and by the clock.
    max_keys = target_bytes // CACHE_VALUE + CACHE_BATCH
    while written < target_bytes and attempted < max_keys and deadline.left() > 10:
        pipe = cache_client.pipeline(transaction=False)
        for index in range(attempted, attempted + CACHE_BATCH):
            pipe.set(f"cache:workflow:{index}", value, ex=3600)  # Dify's cache keys carry TTLs
        attempted += CACHE_BATCH
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                errors += 1
                first_error = first_error or str(reply)[:120]
            else:
                written += CACHE_VALUE
    after = broker_state(broker_client)
    survived = {key: after[key] == before[key] for key in BROKER_KEYS}
    # Can Celery still use its broker once the cache is full? A producer keeps publishing
    # (LPUSH, one task message each); kombu reads queue sizes with LLEN inside MULTI/EXEC (a
    # transaction pipeline). One message alone may still fit in what the cache's last pipeline
    # left free, so send a few hundred and count.
    published = 0
    publish = "ok"
    for index in range(PUBLISHES_AFTER_FILL):
        outcome = try_command(lambda: broker_client.lpush("celery", kombu_message(100_000 + index)))
        if outcome == "ok":
            published += 1
        elif publish == "ok":
            publish = outcome

    def multi_llen():
        with broker_client.pipeline(transaction=True) as pipe:
            pipe.llen("celery")
            pipe.execute()
    size_check = try_command(multi_llen)
    instances = {}
    for instance in {cache.name: cache, broker.name: broker}.values():
        info = instance.client().info()
        instances[instance.name] = {
            "maxmemory_mib": mib(int(info["maxmemory"])), "policy": info["maxmemory_policy"],
            "used_memory_mib": mib(int(info["used_memory"])), "evicted_keys": int(info["evicted_keys"]),
        }
    return {
        "layout": layout, "note": note, "cache_maxmemory_mib": mib(maxmemory),
        "cache_attempted_mib": mib(attempted * CACHE_VALUE), "cache_written_mib": mib(written),
        "cache_write_errors": errors, "first_cache_error": first_error,
        "evicted_keys": sum(item["evicted_keys"] for item in instances.values()),
        "broker_before": before, "broker_after": after, "broker_survived": survived,
        "broker_all_survived": all(survived.values()),
        "published_after_fill": published, "publishes_after_fill": PUBLISHES_AFTER_FILL,
        "publish_after_fill": publish, "multi_llen_after_fill": size_check,
        "instances": instances,
    }


@contextmanager
def redis_server(name: str, conf_text: str, password: str | None, binary: str):
    with server_dir(f"bench-{name}", None) as tmp:
        port = free_port()
        conf_text = conf_text.replace("{PORT}", str(port)).replace("{DIR}", str(tmp))
        conf_path = write_file(tmp / "redis.conf", conf_text, 0o600, None)
        server = Server(name, [binary, str(conf_path)], workdir=tmp, env=base_env(tmp))
        instance = RedisInstance(name, server, port, password)
        with server.running(lambda: instance.client().ping(), timeout=START_TIMEOUT_S, what=f"redis {name}"):
            yield instance


def bench_redis(profile: Profile, deadline: Deadline, log) -> dict:
    require_module("redis", "redis")
    binary = require_executable("redis-server", "redis-server")
    plan: Plan = preset_plan(PRESET)
    files = render_files(plan, Secrets.generate())
    env = parse_env(files[".env"].content)

    def rendered(path: str) -> str:
        return relocate(files[path].content, path, {
            "bind 0.0.0.0": "bind 127.0.0.1", "port 6379": "port {PORT}", "dir /data": "dir {DIR}"})

    # One instance for both jobs, as upstream runs it, given the memory of edgefit's two
    # (cache + broker maxmemory) so the layouts compare at the same total.
    single_mib = plan.redis.maxmemory_mib + plan.redis_broker.maxmemory_mib

    def single(policy: str) -> str:
        return (f"bind 127.0.0.1\nport {{PORT}}\ndir {{DIR}}\nprotected-mode yes\nsave \"\"\nappendonly no\n"
                f"maxmemory {single_mib}mb\nmaxmemory-policy {policy}\nmaxmemory-samples 5\nlogfile \"\"\n")

    layouts = []
    for policy, note in (("allkeys-lru", "one Redis for cache + broker (upstream's layout) with a maxmemory"),
                         ("noeviction", "reference: one Redis, noeviction (Redis's default policy)")):
        layout = f"single {policy}"
        with redis_server(f"redis-single-{policy}", single(policy), None, binary) as one:
            result = bench_redis_layout(layout, note, one, one, profile.redis_fill_factor, deadline)
        layouts.append(result)
        log(f"redis: {layout}: broker survived {result['broker_survived']}, evicted {result['evicted_keys']}, "
            f"cache write errors {result['cache_write_errors']}")
    with ExitStack() as stack:
        cache = stack.enter_context(redis_server("redis-cache", rendered("conf/redis/redis.conf"),
                                                 env["REDIS_PASSWORD"], binary))
        broker = stack.enter_context(redis_server("redis-broker", rendered("conf/redis-broker/redis.conf"),
                                                  url_password(env["CELERY_BROKER_URL"]), binary))
        result = bench_redis_layout(
            "edgefit two", f"rendered {PRESET} cache ({plan.redis.maxmemory_policy}) + broker "
            f"({plan.redis_broker.maxmemory_policy})", cache, broker, profile.redis_fill_factor, deadline)
    layouts.append(result)
    log(f"redis: edgefit two: broker survived {result['broker_survived']}, evicted {result['evicted_keys']}, "
        f"cache write errors {result['cache_write_errors']}")
    return {"layouts": layouts, "cache_value_bytes": CACHE_VALUE, "queue_messages": QUEUE_MESSAGES,
            "fill_factor": profile.redis_fill_factor}


# =============================================================================================
# Output

def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and c.replace(".", "").replace("-", "").isdigit() else c.ljust(w)
                               for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(result: dict) -> str:
    out = []
    pg = result.get("postgres")
    if pg:
        out.append("Postgres: pgbench on this machine, one run (compare rows, not absolute numbers)")
        for name, config in pg["configs"].items():
            out.append(f"  {name}: {config['note']}")
        order = {"upstream": 0, "edgefit": 1, "edgefit-wide": 2}
        rows = []
        for run in sorted(pg["runs"], key=lambda r: (list(MODES).index(r["mode"]), r["clients"], order[r["config"]])):
            rows.append([run["mode"], run["clients"], run["config"], run["tps"], run["connect_s"],
                         run["transactions"], run["failed_transactions"], run["aborted_clients"],
                         run["too_many_clients"], run["pooler_refusals"], run["peak_backends"],
                         run["peak_pss_mib"], verdict(run)])
        out.append(table(["mode", "clients", "config", "tps", "connect s", "xacts", "failed", "aborted",
                          "too many clients", "max_client_conn", "backends", "peak PSS MiB", "result"], rows))
        for key, value in (pg.get("ratios") or {}).items():
            out.append(f"  {key}: {value}")
        for line in pg.get("skipped", []):
            out.append(f"  skipped: {line}")
        out.append("")
    rd = result.get("redis")
    if rd:
        out.append(f"Redis: broker state ({rd['queue_messages']} task messages) in, then cache writes "
                   f"{rd['fill_factor']:g}x past the cache's maxmemory ({rd['cache_value_bytes'] // 1024} KiB values)")
        rows = []
        for layout in rd["layouts"]:
            s = layout["broker_survived"]
            rows.append([layout["layout"], layout["cache_maxmemory_mib"], layout["cache_attempted_mib"],
                         layout["cache_write_errors"], layout["evicted_keys"],
                         "kept" if s["_kombu.binding.celery"] else "LOST",
                         f"{layout['broker_after']['celery']}/{layout['broker_before']['celery']}",
                         "kept" if s["unacked"] else "LOST",
                         f"{layout['published_after_fill']}/{layout['publishes_after_fill']}",
                         "ok" if layout["multi_llen_after_fill"] == "ok" else "FAILS"])
        out.append(table(["layout", "maxmem MiB", "cache MiB sent", "write errors", "evicted",
                          "binding", "celery list", "unacked", "publishes ok", "MULTI LLEN"], rows))
        for layout in rd["layouts"]:
            for what in ("first_cache_error",):
                if layout[what]:
                    out.append(f"  {layout['layout']}: {what}: {layout[what]}")
            for what in ("publish_after_fill", "multi_llen_after_fill"):
                if layout[what] != "ok":
                    out.append(f"  {layout['layout']}: {what}: {layout[what]}")
    out.append(f"\n{result['meta']['profile']} profile, {result['meta']['seconds']} s in all")
    return "\n".join(out)


def verdict(run: dict) -> str:
    if run["ok"]:
        return "ok"
    why = []
    if run["too_many_clients"]:
        why.append("Postgres: too many clients")
    if run["pooler_refusals"]:
        why.append("PgBouncer: max_client_conn")
    if run["failed_transactions"]:
        why.append(f"{run['failed_transactions']} failed")
    if run["timed_out"]:
        why.append("timed out")
    if run["exit_code"] is not None and run["exit_code"] < 0:
        why.append(f"pgbench killed by signal {-run['exit_code']}")
    if not why and run["first_error"]:
        why.append(run["first_error"][:60])
    return "FAIL " + "; ".join(why or [f"exit {run['exit_code']}"])


def ratios(pg: dict) -> dict:
    """TPS of each edgefit config over upstream's, where both ran without errors."""
    by_key = {(run["config"], run["mode"], run["clients"]): run for run in pg["runs"]}
    out = {}
    for (config, mode, clients), run in sorted(by_key.items()):
        base = by_key.get(("upstream", mode, clients))
        if config == "upstream" or not base or not base["ok"] or not run["ok"]:
            continue
        out[f"tps {config}/upstream {mode} {clients} clients"] = round(run["tps"] / base["tps"], 2)
        out[f"peak PSS {config}/upstream {mode} {clients} clients"] = round(run["peak_pss_mib"] / base["peak_pss_mib"], 2)
    return out


def versions() -> dict:
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    return {"postgres": first_line([str(PG_BIN / "postgres"), "--version"]),
            "pgbouncer": first_line(["pgbouncer", "--version"]),
            "redis": first_line(["redis-server", "--version"]),
            "python": platform.python_version(), "cpus": psutil.cpu_count(),
            "memory_mib": psutil.virtual_memory().total // 1024 // 1024, "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="50 and 200 clients, 2 s each (< 1 min)")
    size.add_argument("--full", action="store_true", help="also 1000 clients (< 5 min)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-': stdout)")
    parser.add_argument("--only", choices=("postgres", "redis"), help="run one comparison only")
    args = parser.parse_args(argv)
    profile_name = "quick" if args.quick else "full" if args.full else "default"
    profile = PROFILES[profile_name]
    deadline = Deadline(55 if args.quick else 290)
    started = time.monotonic()
    quiet = args.json == "-"

    def log(message: str) -> None:
        print(message, file=sys.stderr if quiet else sys.stdout, flush=True)

    # A SIGTERM unwinds like Ctrl-C, so every server started here is stopped and every
    # temporary directory removed.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    import pytest  # servers_helpers reports a missing program as a pytest skip
    result: dict = {"meta": {"profile": profile_name, "preset": PRESET, "clients": list(profile.clients),
                             "seconds_per_run": profile.seconds, "versions": versions()}}
    try:
        if args.only in (None, "postgres"):
            result["postgres"] = bench_postgres(profile, deadline, log)
            result["postgres"]["ratios"] = ratios(result["postgres"])
        if args.only in (None, "redis"):
            result["redis"] = bench_redis(profile, deadline, log)
    except pytest.skip.Exception as missing:
        print(f"cannot run the bench: {missing.msg}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    text = report(result)
    print(text, file=sys.stderr if quiet else sys.stdout)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
