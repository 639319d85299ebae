"""Run the edgefit-test images' processes from the built rootfs WITHOUT Docker, as a smoke test.

    python tests/images/chroot_smoke.py ROOTFS        # as root; prints one JSON report

It re-executes itself inside `unshare --net --pid --mount --fork`: its own loopback (nothing
reaches or leaves the machine's network), its own pid namespace (every process it started dies
with it), and an overlay mount over ROOTFS so the cached rootfs is never written. Each
"container" is started the way Docker would start the image: the image config's Env, User,
WorkingDir, Entrypoint and Cmd from build.IMAGES, with extra env like the compose file's.
Then each image's health command from build.IMAGES runs inside the rootfs. Every wait is bounded.

The work directory (overlay upper dir, logs) is removed afterwards unless EDGEFIT_SMOKE_KEEP=1.
What this cannot show (needs the VM): cgroup memory limits, Docker's own `docker load`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import IMAGES  # noqa: E402

PASSWORD = "smoke-test-only"
SITECUSTOMIZE = "import gc\ngc.set_threshold(4321, 11, 12)\n"


def in_rootfs(root: Path, argv: list[str], env: list[str], user: str = "", workdir: str = "/") -> list[str]:
    """argv as Docker would exec it in the image: env -i, the user, the working directory."""
    inner = f"cd {shlex.quote(workdir)} && exec {shlex.join(argv)}"
    cmd = ["chroot", str(root), "/usr/bin/env", "-i", *env]
    if user:
        uid, _, gid = user.partition(":")
        cmd += ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups"]
    return cmd + ["/bin/sh", "-c", inner]


def start(root: Path, logs: Path, tag: str, args: list[str] | None = None, env: dict | None = None,
          user: str | None = None, entrypoint: list[str] | None = None) -> subprocess.Popen:
    spec = IMAGES[tag]
    full_env = spec["env"] + ["LANG=C.UTF-8", "HOSTNAME=smoke"] + [f"{k}={v}" for k, v in (env or {}).items()]
    argv = (spec["entrypoint"] if entrypoint is None else entrypoint) + (spec["cmd"] if args is None else args)
    log = open(logs / (tag.split("/")[1].replace(":", "_") + ".log"), "ab")
    return subprocess.Popen(in_rootfs(root, argv, full_env, spec["user"] if user is None else user, spec["workdir"]),
                            stdout=log, stderr=subprocess.STDOUT)


def health(root: Path, tag: str, env: dict | None = None) -> tuple[int, str]:
    spec = IMAGES[tag]
    full_env = spec["env"] + [f"{k}={v}" for k, v in (env or {}).items()]
    proc = subprocess.run(in_rootfs(root, spec["health"], full_env), capture_output=True, text=True, timeout=20)
    return proc.returncode, (proc.stdout + proc.stderr).strip()[-400:]


def wait_healthy(root: Path, tag: str, env: dict | None = None, seconds: float = 60) -> tuple[bool, str, float]:
    t0 = time.monotonic()
    out = ""
    while time.monotonic() - t0 < seconds:
        rc, out = health(root, tag, env)
        if rc == 0:
            return True, out, time.monotonic() - t0
        time.sleep(0.5)
    return False, out, time.monotonic() - t0


def run_in_namespace(rootfs: Path, work: Path) -> dict:
    upper, wdir, root, logs = work / "upper", work / "work", work / "root", work / "logs"
    for d in (upper, wdir, root, logs):
        d.mkdir()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={rootfs},upperdir={upper},workdir={wdir}", str(root)], check=True)
    subprocess.run(["mount", "--rbind", "/dev", str(root / "dev")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(root / "dev/shm")], check=True)
    report: dict = {"work": str(work), "checks": {}}

    def record(name: str, ok: bool, detail: str = "", **extra):
        report["checks"][name] = {"ok": ok, "detail": detail[-600:], **extra}

    # --- confs as edgefit's compose mounts them ---------------------------------------------
    (root / "etc/postgresql").mkdir(exist_ok=True)
    (root / "etc/postgresql/postgresql.conf").write_text(
        "listen_addresses = '*'\nmax_connections = 40\nshared_buffers = 32MB\njit = off\n")
    (root / "etc/postgresql/pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n")
    (root / "docker-entrypoint-initdb.d/10-plugin-db.sql").write_text("CREATE DATABASE dify_plugin;\n")
    (root / "etc/pgbouncer/pgbouncer.ini").write_text(
        "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 6432\n"
        "unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = /etc/pgbouncer/userlist.txt\n"
        "pool_mode = transaction\nmax_client_conn = 100\ndefault_pool_size = 5\n")
    (root / "etc/pgbouncer/userlist.txt").write_text(f'"postgres" "{PASSWORD}"\n')
    for f in ("pgbouncer.ini", "userlist.txt"):
        os.chown(root / "etc/pgbouncer" / f, 70, 70)
    (root / "usr/local/etc/redis/redis.conf").write_text(
        f"bind 127.0.0.1\nport 6379\nprotected-mode yes\nrequirepass {PASSWORD}\nmaxmemory 64mb\nsave \"\"\ndir /data\n")
    (root / "etc/squid/squid.conf").write_text(
        "http_port 3128\nacl localnet src 127.0.0.0/8\nhttp_access allow localnet\nhttp_access deny all\n"
        # Log files, as upstream Dify's ssrf_proxy: squid reopens its log paths as uid 13
        # (proxy), which cannot reopen a stdout that root opened (a file here, a pipe in Docker).
        "pid_filename /tmp/squid.pid\naccess_log stdio:/var/log/squid/access.log\n"
        "cache_log /var/log/squid/cache.log\n"
        "cache_store_log none\ncoredump_dir /tmp\n")
    (root / "opt/edgefit/python/sitecustomize.py").write_text(SITECUSTOMIZE)

    procs = []
    try:
        # postgres: initdb through the entrypoint, PGDATA in a subdirectory as edgefit's compose
        procs.append(start(root, logs, "edgefit-test/postgres:15",
                           ["postgres", "-c", "config_file=/etc/postgresql/postgresql.conf",
                            "-c", "hba_file=/etc/postgresql/pg_hba.conf"],
                           {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": PASSWORD, "POSTGRES_DB": "dify",
                            "PGDATA": "/var/lib/postgresql/data/pgdata"}))
        ok, out, secs = wait_healthy(root, "edgefit-test/postgres:15", seconds=90)
        record("postgres_healthy", ok, out, seconds=round(secs, 1))
        q = subprocess.run(in_rootfs(root, ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "dify", "-Atc",
                                            "select current_setting('max_connections'), "
                                            "(select count(*) from pg_database where datname='dify_plugin'), "
                                            "(select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname='postgres')"],
                                     [f"PATH=/usr/lib/postgresql/15/bin:/usr/bin:/bin", f"PGPASSWORD={PASSWORD}"]),
                           capture_output=True, text=True, timeout=30)
        record("postgres_config_initdb_scram", q.stdout.strip() == "40|1|t", q.stdout + q.stderr)
        owner = subprocess.run(["stat", "-c", "%u", str(root / "var/lib/postgresql/data/pgdata")],
                               capture_output=True, text=True).stdout.strip()
        ps = subprocess.run(["ps", "-o", "uid=,comm=", "-C", "postgres"], capture_output=True, text=True).stdout
        conf = (root / "var/lib/postgresql/data/pgdata/postgresql.conf").read_text()
        # as the official image: without a config_file of its own, the cluster listens on every address
        record("postgres_initdb_listens_everywhere", "\nlisten_addresses = '*'" in conf,
               [l for l in conf.splitlines() if "listen_addresses" in l][:1].__str__())
        record("postgres_uid_999", owner == "999" and bool(ps.split()) and ps.split()[0] == "999", f"pgdata owner {owner}; {ps}")

        procs.append(start(root, logs, "edgefit-test/pgbouncer:1.18", ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]))
        ok, out, secs = wait_healthy(root, "edgefit-test/pgbouncer:1.18", seconds=30)
        record("pgbouncer_healthy", ok, out, seconds=round(secs, 1))

        procs.append(start(root, logs, "edgefit-test/redis:7.0", ["redis-server", "/usr/local/etc/redis/redis.conf"]))
        ok, out, secs = wait_healthy(root, "edgefit-test/redis:7.0", {"REDISCLI_AUTH": PASSWORD}, seconds=30)
        record("redis_healthy", ok and "PONG" in out, out, seconds=round(secs, 1))
        ps = subprocess.run(["ps", "-o", "uid=", "-C", "redis-server"], capture_output=True, text=True).stdout.split()
        record("redis_uid_999", ps == ["999"], str(ps))

        procs.append(start(root, logs, "edgefit-test/nginx:1.22"))
        ok, out, secs = wait_healthy(root, "edgefit-test/nginx:1.22", seconds=30)
        record("nginx_healthy", ok, out, seconds=round(secs, 1))

        procs.append(start(root, logs, "edgefit-test/squid:5.7", ["squid", "-N", "-f", "/etc/squid/squid.conf"],
                           entrypoint=[]))
        ok, out, secs = wait_healthy(root, "edgefit-test/squid:5.7", seconds=60)
        record("squid_healthy", ok, out, seconds=round(secs, 1))

        dify_env = {"DB_USERNAME": "postgres", "DB_PASSWORD": PASSWORD, "DB_HOST": "127.0.0.1", "DB_PORT": "6432",
                    "DB_DATABASE": "dify", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": "6379",
                    "REDIS_PASSWORD": PASSWORD, "CELERY_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:6379/1",
                    "SQLALCHEMY_POOL_SIZE": "3", "SQLALCHEMY_MAX_OVERFLOW": "1", "PYTHONPATH": "/opt/edgefit/python"}
        procs.append(start(root, logs, "edgefit-test/dify-api-standin:1", env={**dify_env, "MODE": "api"}))
        ok, out, secs = wait_healthy(root, "edgefit-test/dify-api-standin:1", seconds=30)
        record("api_standin_healthy", ok, out, seconds=round(secs, 1))
        gc_out = subprocess.run(in_rootfs(root, ["curl", "-fsS", "http://127.0.0.1:5001/debug/gc"], ["PATH=/usr/bin:/bin"]),
                                capture_output=True, text=True, timeout=20).stdout
        try:
            gc_info = json.loads(gc_out)
        except ValueError:
            gc_info = {}
        record("api_standin_sitecustomize", gc_info.get("threshold") == [4321, 11, 12]
               and gc_info.get("sitecustomize") == "/opt/edgefit/python/sitecustomize.py", gc_out)
        conn = subprocess.run(in_rootfs(root, ["curl", "-fsS", "http://127.0.0.1:5001/debug/connect?n=10"], ["PATH=/usr/bin:/bin"]),
                              capture_output=True, text=True, timeout=30).stdout
        record("api_standin_pool_bounded", '"held": 4' in conn, conn)
        ps = subprocess.run(["ps", "-o", "uid=,args=", "-C", "python3"], capture_output=True, text=True).stdout
        uids = [line.split()[0] for line in ps.splitlines() if "dify_standin.py" in line]
        record("api_standin_uid_1001", uids == ["1001"], ps)

        # the other stand-ins on their own ports (worker binds 127.0.0.1:5001 like api: own netns in Docker)
        for tag, env in (("edgefit-test/dify-web-standin:1", {}),
                         ("edgefit-test/dify-sandbox-standin:1", {}),
                         ("edgefit-test/dify-plugin-daemon-standin:1", {**dify_env, "DB_PORT": "5432", "DB_DATABASE": "dify_plugin"})):
            procs.append(start(root, logs, tag, env=env))
            ok, out, secs = wait_healthy(root, tag, seconds=30)
            record(tag.split("/")[1].split(":")[0] + "_healthy", ok, out, seconds=round(secs, 1))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        report["logs"] = {f.name: f.read_text(errors="replace")[-1500:] for f in logs.iterdir()}
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    return report


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rootfs = Path(argv[1]).resolve()
    if os.environ.get("EDGEFIT_SMOKE_INSIDE") != "1":
        work = Path(tempfile.mkdtemp(prefix="edgefit-smoke-"))
        # --kill-child: if this parent dies the namespace's init dies too, and with it everything.
        cmd = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
               sys.executable, str(Path(__file__).resolve()), str(rootfs)]
        try:
            return subprocess.run(cmd, env={**os.environ, "EDGEFIT_SMOKE_INSIDE": "1",
                                            "EDGEFIT_SMOKE_WORK": str(work)}, timeout=600).returncode
        finally:
            # The overlay, /dev and /proc mounts lived in the namespace only; out here root/ is
            # an empty directory. Refuse to delete if /dev shows through anyway.
            if os.environ.get("EDGEFIT_SMOKE_KEEP") != "1" and not (work / "root" / "dev" / "null").exists():
                shutil.rmtree(work, ignore_errors=True)
    report = run_in_namespace(rootfs, Path(os.environ["EDGEFIT_SMOKE_WORK"]))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
