#!/usr/bin/env python3
"""Postgres connections: upstream Dify's database against edgefit's PgBouncer plan, side by side
in one run on this machine. This file's one job is that comparison.

`upstream` is Dify's database as its compose file runs it (postgres:15 with `-c
max_connections=100 -c shared_buffers=128MB ...`, clients straight at it). `edgefit` is the
rendered 2C4G postgresql.conf, pg_hba.conf, pgbouncer.ini and userlist.txt exactly as rendered,
PgBouncer (transaction pooling) in front, started with the plan's open-files limit. The plan
gives PgBouncer max_client_conn = max(1000, the stack's own pools x 1.25) (edgefit.plan
MIN_MAX_CLIENT_CONN), so every client count run here fits the rendered file unchanged.

pgbench select-only (-S) and TPC-B at 50 and 200 clients (--quick), 50/200/500 (default) or
50/200/500/1000 (--full): TPS, failed transactions, aborted clients, Postgres's "too many
clients" and PgBouncer's "no more connections allowed" refusals, Postgres client backends, and
the peak PSS of the server processes.

Real Debian servers (postgresql-15, pgbouncer) through tests/servers_helpers.py: loopback only,
free ports, temporary directories removed afterwards, every wait and loop bounded, and only the
processes started here are stopped, by PID.

    .venv/bin/python bench/postgres_pool.py [--quick | --full] [--json FILE]

Timings depend on the machine and on what else runs on it: read the ratios between the rows of
one run, not the absolute numbers.
"""

from __future__ import annotations

import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (PRESET, START_TIMEOUT_S, Deadline, Profile, PssSampler, main, mib, rendered_stack,
                    server_versions, table)

from servers_helpers import (
    PGBENCH_MODES,
    Server,
    base_env,
    free_port,
    pgbench_numbers,
    postgres_programs,
    relocate,
    run_checked,
    server_dir,
    service_user,
    write_file,
)

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

MODES = PGBENCH_MODES


@dataclass(frozen=True)
class PgProfile(Profile):
    clients: tuple[int, ...] = ()
    seconds: int = 0
    modes: tuple[str, ...] = tuple(MODES)


PROFILES = {
    "quick": PgProfile("quick", 45, clients=(50, 200), seconds=2),
    "default": PgProfile("default", 240, clients=(50, 200, 500), seconds=8),
    "full": PgProfile("full", 290, clients=(50, 200, 500, 1000), seconds=8),
}


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
    out = pgbench_numbers(stdout)
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


def bench_postgres(profile: PgProfile, deadline: Deadline, log) -> dict:
    initdb, postgres, pgbench, psql, pgbouncer = postgres_programs()
    owner = service_user()
    raise_own_nofile(max(profile.clients) * 2 + 200)

    stack = rendered_stack()
    plan, files, env = stack.plan, stack.files, stack.env
    user, password, database = env["DB_USERNAME"], env["DB_PASSWORD"], env["DB_DATABASE"]
    planned_clients = plan.pgbouncer.max_client_conn
    runs: list[PgRun] = []
    skipped: list[str] = []
    configs = {
        "upstream": {"note": "postgres -c max_connections=100 -c shared_buffers=128MB ... (Dify's compose), "
                             "clients straight at it", "settings": dict(UPSTREAM_POSTGRES)},
        "edgefit": {"note": f"rendered {PRESET} postgresql.conf + pgbouncer.ini + userlist.txt, as rendered "
                            f"(max_client_conn {planned_clients})",
                    "settings": {"max_connections": plan.postgres.max_connections,
                                 "shared_buffers": f"{plan.postgres.shared_buffers_mib}MB",
                                 "pool_mode": plan.pgbouncer.pool_mode,
                                 "default_pool_size": plan.pgbouncer.default_pool_size,
                                 "max_db_connections": plan.pgbouncer.max_db_connections,
                                 "max_client_conn": planned_clients,
                                 "pgbouncer_nofile": plan.pgbouncer.nofile_limit}},
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
            ini = write_file(tmp / f"pgbouncer-{config}.ini", relocate(files[ini_path].content, ini_path, {
                "dify = host=db port=5432 dbname=dify": f"dify = host=127.0.0.1 port={edgefit_port} dbname=dify",
                "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
                "listen_port = 6432": f"listen_port = {port}",
                "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {userlist_file}",
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
                    order = ["upstream", "edgefit"]
                    if cell % 2:  # alternate who goes first, so drift in the machine's load evens out
                        order.reverse()
                    cell += 1
                    for config in order:
                        needed = profile.seconds + math.ceil(clients / 100) + 5
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




def report(result: dict) -> str:
    pg = result["postgres"]
    out = ["Postgres: pgbench on this machine, one run (compare rows, not absolute numbers)"]
    for name, config in pg["configs"].items():
        out.append(f"  {name}: {config['note']}")
    order = {"upstream": 0, "edgefit": 1}
    rows = []
    for run in sorted(pg["runs"], key=lambda r: (list(MODES).index(r["mode"]), r["clients"], order[r["config"]])):
        rows.append([run["mode"], run["clients"], run["config"], run["tps"], run["connect_s"],
                     run["transactions"], run["failed_transactions"], run["aborted_clients"],
                     run["too_many_clients"], run["pooler_refusals"], run["peak_backends"],
                     run["peak_pss_mib"], verdict(run)])
    out.append(table(["mode", "clients", "config", "tps", "connect s", "xacts", "failed", "aborted",
                      "too many clients", "max_client_conn", "backends", "peak PSS MiB", "result"], rows))
    for key, value in pg["ratios"].items():
        out.append(f"  {key}: {value}")
    for line in pg["skipped"]:
        out.append(f"  skipped: {line}")
    return "\n".join(out)


def run(profile: PgProfile, deadline: Deadline, log) -> dict:
    pg = bench_postgres(profile, deadline, log)
    pg["ratios"] = ratios(pg)
    return {"preset": PRESET, "clients": list(profile.clients), "seconds_per_run": profile.seconds,
            "postgres": pg}


if __name__ == "__main__":
    sys.exit(main(__doc__, PROFILES, run, report, versions=server_versions))
