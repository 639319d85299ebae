#!/usr/bin/env python3
"""The same Dify workload on edge-small under edgefit's stack and under upstream-like settings.

Issue 9, item 6, side by side in one run on one VM: tests/workload.py (uploads to index up to the
upload cap, console GETs, a burst of 30 clients) drives the stack through its nginx, twice:

1. **edgefit**: the stack as `deploy.py` renders it for edge-small (limits, PgBouncer pools, two
   Redis, GC and malloc settings, the worker's watchdog);
2. **upstream-like**: the same containers re-created from the running project's own config with
   what Dify's docker-compose does instead: no memory or CPU limits, SQLAlchemy pools of 30+10
   straight to Postgres (no PgBouncer), one Redis for cache and broker without maxmemory,
   Postgres with upstream's `-c` flags, no GC sitecustomize, no MALLOC_ARENA_MAX, web without
   NODE_OPTIONS, worker concurrency 1, upload cap 15 MB.

While each runs, a sampler on the host reads every container's cgroup memory.current each second
(and memory.events' oom_kill) and /proc/meminfo's MemAvailable. Reported per variant: the peak of
the containers' total, per service, the host's lowest MemAvailable, OOM kills, container restarts
and what the clients saw (failures, the slowest request, the longest time nothing was answered).
Afterwards the host is deployed back to its plan (deploy.py converges it) and the upstream file
removed.

The stack runs the stand-ins' memory model of Dify (tests/images/standin/dify_standin.py, its
figures measured on the real Dify: ../shared/notes/dify-memory.md), not Dify; the model reacts to
the settings the way the measured processes did (peaks per gunicorn worker, per indexing task,
with and without edgefit's GC and malloc settings; V8 with and without NODE_OPTIONS).

    .venv/bin/python bench/workload.py [--seconds 120] [--json FILE] [--keep-up]

The clients run on edge-small itself (127.0.0.1:443), so both variants carry the same client load;
only the project's own test host is contacted. It boots edge-small when it is not up (software
emulation: minutes), deploys it when it has no plan of record, and destroys only what it booted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PYINFRA = REPO / ".venv" / "bin" / "pyinfra"
INVENTORY = REPO / "inventory" / "vagrant.py"
WORKLOAD = REPO / "tests" / "workload.py"
HOST = "edge-small"
DEPLOY_TIMEOUT_S = 2400
UPSTREAM_FILE = "/opt/edgefit/docker-compose.upstream.json"

# On the host (python3, standard library): the running project's config, uninterpolated (no
# secret is read or written by this script; compose reads them from .env when it starts the
# file), changed to what Dify's own compose does, written 0600 beside the rendered file.
UPSTREAM_LIKE = r"""
import json, os, subprocess, sys
stack, out_file = sys.argv[1], sys.argv[2]
compose = sys.argv[3:] or ["docker", "compose"]
config = json.loads(subprocess.run([*compose, "--project-directory", stack, "-f", stack + "/docker-compose.yml",
                                    "config", "--no-interpolate", "--format", "json"],
                                   capture_output=True, text=True, check=True, timeout=300).stdout)
services = config["services"]
python_roles = ("api", "worker", "worker_beat")
for gone in ("pgbouncer", "redis_broker"):  # upstream has neither
    services.pop(gone, None)
for name, service in services.items():
    for key in ("mem_limit", "memswap_limit", "cpus", "mem_reservation"):  # no limits
        service.pop(key, None)
    depends = service.get("depends_on")
    if isinstance(depends, dict):
        for gone in ("pgbouncer", "redis_broker"):
            depends.pop(gone, None)
        if name in python_roles:
            depends["db"] = {"condition": "service_healthy", "required": True}
    env = service.get("environment") or {}
    if name in python_roles:
        env.update({
            "SQLALCHEMY_POOL_SIZE": "30", "SQLALCHEMY_MAX_OVERFLOW": "10",  # .env.example
            "DB_HOST": "db", "DB_PORT": "5432",  # straight to Postgres
            "CELERY_BROKER_URL": "redis://:${REDIS_PASSWORD}@redis:6379/1",  # the one Redis
            "PYTHONPATH": "", "PYTHON_GC_THRESHOLD": "", "MALLOC_ARENA_MAX": "",  # CPython's defaults
            "GUNICORN_CMD_ARGS": "", "SERVER_WORKER_AMOUNT": "1", "CELERY_WORKER_AMOUNT": "1",
            "UPLOAD_FILE_SIZE_LIMIT": "15", "EDGEFIT_WORKER_RESTART_ANON_MIB": "",
        })
    if name == "web":
        env.update({"NODE_OPTIONS": "", "PM2_INSTANCES": "2"})
    service["environment"] = env
services["redis"]["command"] = ["redis-server", "--requirepass", "${REDIS_PASSWORD}"]  # no maxmemory
services["db"]["command"] = ["postgres", "-c", "max_connections=100", "-c", "shared_buffers=128MB",
                             "-c", "work_mem=4MB", "-c", "maintenance_work_mem=64MB",
                             "-c", "effective_cache_size=4096MB", "-c", "listen_addresses=*",  # as the image's own conf
                             "-c", "hba_file=/etc/postgresql/pg_hba.conf"]
fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
with os.fdopen(fd, "w") as out:
    json.dump(config, out, indent=1)
print(sorted(services))
"""

# On the host: every container of the project, each second for S seconds: memory.current and
# oom_kill from its cgroup, and the host's MemAvailable. Prints one JSON object.
SAMPLER = r"""
import json, os, subprocess, sys, time
seconds = float(sys.argv[1])
ids = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", "label=com.docker.compose.project=edgefit-dify"],
                     capture_output=True, text=True, timeout=60).stdout.split()
names = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=60).stdout)
def cgroup(container_id):  # the cgroupfs driver's path (the plan's daemon.json), else systemd's
    for path in ("/sys/fs/cgroup/docker/" + container_id, "/sys/fs/cgroup/system.slice/docker-%s.scope" % container_id):
        if os.path.isfile(path + "/memory.current"):
            return path
    return "/nonexistent"
cgroups = {c["Config"]["Labels"]["com.docker.compose.service"]: cgroup(c["Id"]) for c in names}
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
def oom_kills(cg):
    for line in read(cg + "/memory.events").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0
def available():
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0
kills_before = {s: oom_kills(cg) for s, cg in cgroups.items()}
peak_total, peak = 0, {s: 0 for s in cgroups}
lowest_available = available()
end = time.monotonic() + seconds
while time.monotonic() < end:
    total = 0
    for service, cg in cgroups.items():
        value = read(cg + "/memory.current").strip()
        mib = int(value) // 1048576 if value.isdigit() else 0
        peak[service] = max(peak[service], mib)
        total += mib
    peak_total = max(peak_total, total)
    lowest_available = min(lowest_available, available())
    time.sleep(1)
print(json.dumps({"peak_total_mib": peak_total, "peak_mib": peak, "lowest_available_mib": lowest_available,
                  "oom_kills": sum(oom_kills(cg) - kills_before[s] for s, cg in cgroups.items())}))
"""
RESTARTS = "docker inspect -f '{{.Name}} {{.RestartCount}}' $(docker ps -aq --filter label=com.docker.compose.project=edgefit-dify)"


def deploy(timeout: float = DEPLOY_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYINFRA), "-y", str(INVENTORY), "deploy.py", "--limit", HOST], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def must(label: str, done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise SystemExit(f"bench/workload.py: {label} failed (exit {done.returncode}):\n{(done.stderr + done.stdout)[-3000:]}")


def restarts(entry: dict) -> dict[str, int]:
    from tests.vm.ssh import run_ssh
    lines = run_ssh(entry, RESTARTS, timeout=120).stdout.split("\n")
    return {line.split()[0].lstrip("/"): int(line.split()[1]) for line in lines if line.strip()}


def one_variant(entry: dict, label: str, args) -> dict:
    """The workload against the stack as it runs now, with the host sampled beside it."""
    from tests.vm.ssh import run_ssh
    before = restarts(entry)
    upload_limit = float(run_ssh(entry, "docker exec edgefit-dify-api-1 printenv UPLOAD_FILE_SIZE_LIMIT").stdout)
    params = {"host": "127.0.0.1", "port": 443, "seconds": args.seconds, "upload_limit_mb": upload_limit,
              "upload_mb": sorted({0.1, 1.0, min(4.0, upload_limit), min(8.0, upload_limit)})}
    sampled: dict = {}

    def sample() -> None:
        done = run_ssh(entry, f"python3 -c {shlex.quote(SAMPLER)} {args.seconds + 30}", timeout=args.seconds + 300,
                       check=False)
        try:
            sampled.update(json.loads(done.stdout))
        except ValueError:
            sampled["error"] = f"the host's sampler failed (exit {done.returncode}): {done.stderr[-500:]}"

    sampler = threading.Thread(target=sample)
    sampler.start()
    print(f"  {label}: workload of {args.seconds} s ...", flush=True)
    clients = json.loads(run_ssh(entry, f"python3 -c {shlex.quote(WORKLOAD.read_text())}", input=json.dumps(params),
                                 timeout=args.seconds + 600).stdout)
    sampler.join(timeout=args.seconds + 400)
    if "error" in sampled or not sampled:
        raise SystemExit(f"bench/workload.py: {label}: {sampled.get('error', 'no figures from the host')}")
    after = restarts(entry)
    restarted = sorted(name for name, count in after.items() if count != before.get(name, count))
    result = {"clients": clients, "host": sampled, "restarted": restarted, "upload_limit_mb": upload_limit}
    print(f"  {label}: {clients['requests']} requests, {clients['failed']} failed, slowest "
          f"{clients['max_request_s']:.1f} s; containers' peak {sampled.get('peak_total_mib')} MiB, "
          f"lowest MemAvailable {sampled.get('lowest_available_mib')} MiB, OOM kills {sampled.get('oom_kills')}",
          flush=True)
    return result


def measure(args) -> dict:
    from tests.images.build import build_images
    from tests.vm import harness
    from tests.vm.ssh import run_ssh

    build_images()
    booted = HOST not in harness.read_hosts()
    print(f"boot {HOST if booted else 'nothing (edge-small is up)'}", flush=True)
    harness.up([HOST], wait_for_docker=True)
    entry = harness.read_hosts()[HOST]
    figures: dict = {"seconds": args.seconds}
    try:
        if run_ssh(entry, "test -s /etc/edgefit/plan.json", check=False).returncode != 0:
            print("deploy edge-small from bare ...", flush=True)
            must("deploy from bare", deploy())
        figures["edgefit"] = one_variant(entry, "edgefit", args)
        print("re-create the stack with upstream-like settings ...", flush=True)
        services = run_ssh(entry, f"python3 -c {shlex.quote(UPSTREAM_LIKE)} /opt/edgefit {UPSTREAM_FILE}", timeout=600).stdout.strip()
        up = run_ssh(entry, f"cd /opt/edgefit && docker compose -f {UPSTREAM_FILE.rsplit('/', 1)[1]} up -d "
                     "--remove-orphans --wait --wait-timeout 900", timeout=1200, check=False)
        if up.returncode != 0:
            raise SystemExit(f"bench/workload.py: the upstream-like stack did not come up healthy:\n{up.stderr[-3000:]}")
        figures["upstream_services"] = services
        figures["upstream_like"] = one_variant(entry, "upstream-like", args)
    finally:
        run_ssh(entry, f"rm -f {UPSTREAM_FILE}", check=False)
        if not booted or args.keep_up:
            print("deploy edge-small back to its plan ...", flush=True)
            must("deploy back to the plan", deploy())
        else:
            harness.destroy([HOST])
    return figures


def report(f: dict) -> str:
    rows = []
    for key, label in (("edgefit", "edgefit (2C4G plan for edge-small)"), ("upstream_like", "upstream-like")):
        v = f[key]
        c, h = v["clients"], v["host"]
        rows.append(f"| {label} | {h['peak_total_mib']} | {h['lowest_available_mib']} | {h['oom_kills']} | "
                    f"{', '.join(v['restarted']) or 'none'} | {c['requests']} | {c['failed']} | {c['max_request_s']:.1f} | "
                    f"{c['longest_unanswered_s']:.1f} | {c['uploads_accepted']} |")
    per_service = sorted(set(f["edgefit"]["host"]["peak_mib"]) | set(f["upstream_like"]["host"]["peak_mib"]))
    lines = ["| stack | containers' peak MiB | lowest MemAvailable MiB | OOM kills | restarted | requests | failed | "
             "slowest s | longest unanswered s | uploads accepted |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
             *rows, "", "| service | edgefit peak MiB | upstream-like peak MiB |", "|---|---:|---:|"]
    for service in per_service:
        lines.append(f"| {service} | {f['edgefit']['host']['peak_mib'].get(service, '-')} | "
                     f"{f['upstream_like']['host']['peak_mib'].get(service, '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=120, help="each variant's workload (default 120)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep-up", action="store_true", help="leave edge-small running if this run booted it")
    args = parser.parse_args(argv)
    if not 30 <= args.seconds <= 900:
        parser.error("--seconds 30-900")
    figures = measure(args)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
