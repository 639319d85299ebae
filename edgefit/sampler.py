#!/usr/bin/env python3
"""edgefit's on-host sampler: one self-contained script that prints ONE JSON document.

`edgefit verify` sends this file over SSH (`python3 - --window 30 ... < sampler.py`) and the
verify timer runs it from /usr/local/lib/edgefit/. It only reads: cgroup v2 files, /proc,
`docker ps/inspect/events`, and a few `docker exec` queries (Redis CONFIG GET and INFO,
Postgres pg_settings, the GC thresholds of a fresh Python process with the container's env).
It compares nothing: edgefit/judge.py judges the samples against the plan of record.

Standard library only, plus psutil when present (Debian: python3-psutil), which is the
fallback where a container's cgroup files cannot be read. Every subprocess has a timeout and
the whole run ends within --window plus a few seconds (EXEC_TIMEOUT bounds the stragglers).
The cgroup and /proc roots and the docker command are options, so tests can point the sampler
at a fake tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

SCHEMA = 1
PROJECT = "edgefit-dify"
STACK_DIR = "/opt/edgefit"
EXEC_TIMEOUT = 8.0  # one docker exec/inspect at least; the run's end waits at most this long for checks
# A host's own pace sets the bound for the rest: docker calls took 1-9 s each on the emulated test
# hosts under load, and an exec costs several times a `docker ps` (issue 14). The first call's
# time times this factor, between EXEC_TIMEOUT and MAX_EXEC_TIMEOUT, bounds every later call.
SLOW_HOST_FACTOR = 8
MAX_EXEC_TIMEOUT = 45.0
EXEC_LANES = 2  # docker exec checks at once: the small hosts have 2 cores
INSPECT_RETRY_S = 20.0  # a second try at one container's inspect that timed out
EXEC_PACE_FACTOR = 2  # after an exec of d seconds, the next in its lane gets at least 2 d
GC_SERVICES = ("api", "worker", "worker_beat")
REDIS_SERVICES = ("redis", "redis_broker")
POSTGRES_SERVICE = "db"
POSTGRES_SETTINGS = (
    "max_connections", "superuser_reserved_connections", "shared_buffers", "effective_cache_size",
    "maintenance_work_mem", "work_mem", "wal_buffers", "min_wal_size", "max_wal_size",
    "max_worker_processes", "max_parallel_workers", "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers", "huge_pages", "idle_in_transaction_session_timeout",
)
STAT_KEYS = ("anon", "file", "kernel", "shmem", "sock", "active_file", "inactive_file", "slab")
REDIS_INFO_KEYS = ("used_memory", "used_memory_rss", "maxmemory", "maxmemory_policy",
                   "evicted_keys", "expired_keys", "redis_version")


# ---------------------------------------------------------------------------------------------
# Small readers that never raise

JOIN_SLACK_S = 2.0  # beyond a check's own timeout, for killing it and its thread's wrap-up on a loaded host
END_CALLS_LEAD_S = 5.0  # seconds before the window ends that its end-of-window docker calls start


def run_bound(window: float) -> float:
    """The longest one sampler run may take: the window, then the longest exec timeout it may
    choose on a slow host, then the join's slack (the callers add their own start-up slack)."""
    return window + MAX_EXEC_TIMEOUT + JOIN_SLACK_S + 2 * INSPECT_RETRY_S  # a retry at the start and at the end


def timed_out(timeout: float) -> str:
    """The one wording of a call that ran out of time (verify's tests and reports read it)."""
    return f"timed out after {round(timeout, 1):g}s"


def image_names(names) -> list[str]:
    """repository:tag and repository@digest names, without docker's "<none>" placeholders."""
    return sorted({name for name in names if not name.endswith(("@<none>", ":<none>"))})


def run(argv: list[str], timeout: float = EXEC_TIMEOUT) -> tuple[int | None, str, str]:
    """(exit code or None when it could not run / timed out, stdout, stderr)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, errors="replace")
    except FileNotFoundError:
        return None, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, "", timed_out(timeout)
    except OSError as error:
        return None, "", str(error)
    return done.returncode, done.stdout, done.stderr


def read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_value(path: str):
    """An integer file (memory.current), 'max' kept as the string, None when missing."""
    text = read_text(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return "max"
    try:
        return int(text)
    except ValueError:
        return None


def read_flat_keyed(path: str) -> dict[str, int] | None:
    """memory.stat, memory.events, cpu.stat: 'key value' lines."""
    text = read_text(path)
    if text is None:
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return values


def read_psi(path: str) -> dict | None:
    """/proc/pressure/memory: {'some': {'avg10':..., 'avg60':..., 'avg300':..., 'total':...}, 'full': ...}"""
    text = read_text(path)
    if text is None:
        return None
    result = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        entry = {}
        for item in parts[1:]:
            key, _, value = item.partition("=")
            try:
                entry[key] = int(value) if key == "total" else float(value)
            except ValueError:
                pass
        result[parts[0]] = entry
    return result


def read_meminfo(proc_root: str) -> dict[str, int]:
    """/proc/meminfo in KiB: MemTotal, MemAvailable, SwapTotal, SwapFree, Cached."""
    wanted = {"MemTotal", "MemAvailable", "SwapTotal", "SwapFree", "Cached"}
    values = {}
    for line in (read_text(os.path.join(proc_root, "meminfo")) or "").splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            try:
                values[key] = int(rest.split()[0])
            except (IndexError, ValueError):
                pass
    return values


def record_images(record: dict | None) -> dict[str, str] | None:
    """service -> image of a plan of record (its parsed JSON), None when there is none."""
    try:
        return {service: entry["image"] for service, entry in record["plan"]["services"].items()}
    except (KeyError, TypeError, AttributeError):
        return None


def read_record_images(path: str) -> dict[str, str] | None:
    """record_images of the plan of record at path (/etc/edgefit/plan.json), None without a readable one."""
    try:
        with open(path) as handle:
            return record_images(json.load(handle))
    except (OSError, ValueError):
        return None


def sha256_file(path: str) -> str | None:
    import hashlib  # noqa: PLC0415 - here and below: imported when used, as a no-op deploy's read needs none
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(65536), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Containers

def cgroup_dir(pid: int, container_id: str, cgroup_root: str, proc_root: str) -> str | None:
    """The container's cgroup v2 directory, driver-independent: read from /proc/PID/cgroup of
    its init process; the systemd and cgroupfs drivers' usual paths are the fallbacks."""
    candidates = []
    if pid:
        for line in (read_text(os.path.join(proc_root, str(pid), "cgroup")) or "").splitlines():
            hierarchy, _, path = line.partition("::")
            if hierarchy == "0" and path.startswith("/"):
                candidates.append(os.path.join(cgroup_root, path.lstrip("/")))
    candidates += [os.path.join(cgroup_root, "system.slice", f"docker-{container_id}.scope"),
                   os.path.join(cgroup_root, "docker", container_id)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "memory.current")):
            return candidate
    return None


def inspect_view(data: dict) -> dict:
    """The fields of `docker inspect` that verify reads."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    host_config = data.get("HostConfig") or {}
    labels = config.get("Labels") or {}
    health = state.get("Health")
    if health:
        log = health.get("Log") or []
        health = {
            "status": health.get("Status"),
            "failing_streak": health.get("FailingStreak", 0),
            "log": [{"start": entry.get("Start"), "end": entry.get("End"),
                     "exit_code": entry.get("ExitCode"),
                     "output": (entry.get("Output") or "").strip()[-200:]} for entry in log[-5:]],
        }
    limit_label = labels.get("io.edgefit.mem_limit_mib")
    try:
        limit_label = int(limit_label) if limit_label is not None else None
    except ValueError:
        limit_label = None
    return {
        "id": data.get("Id", ""),
        "name": (data.get("Name") or "").lstrip("/"),
        "service": labels.get("io.edgefit.service") or labels.get("com.docker.compose.service") or "",
        "compose_service": labels.get("com.docker.compose.service"),
        "label_mem_limit_mib": limit_label,
        "image": config.get("Image"),
        "created": data.get("Created"),
        "status": state.get("Status"),
        "running": bool(state.get("Running")),
        "restarting": bool(state.get("Restarting")),
        "pid": state.get("Pid") or 0,
        "oom_killed": bool(state.get("OOMKilled")),
        "exit_code": state.get("ExitCode"),
        "started_at": state.get("StartedAt"),
        "finished_at": state.get("FinishedAt"),
        "restart_count": data.get("RestartCount", 0),
        "health": health,
        "memory_bytes": host_config.get("Memory") or 0,
        "memory_swap_bytes": host_config.get("MemorySwap") or 0,
        "nano_cpus": host_config.get("NanoCpus") or 0,
    }


class Docker:
    """The docker calls the sampler makes, each bounded by the exec timeout; never raises.
    Through the `docker` command (and the tests' fake of it); DockerSocket below asks the
    daemon's API directly for all but exec."""

    def __init__(self, args, errors: list[str]):
        self.args = args
        self.argv = shlex.split(args.docker)
        self.errors = errors
        self.status: dict = {"via": "cli"}
        self.exec_timeout = args.exec_timeout  # raised by list_containers() on a slow host
        # id -> (address, port, password) of each Redis and of Postgres, to ask them directly
        # in the checks; never printed or returned
        self.endpoints: dict[str, tuple[str, int, str]] = {}
        self.listed: dict[str, str] = {}  # id -> compose service, from the container list
        # service -> why its container, listed at the start, could not be inspected: judged
        # "not checked", never "missing" (it exists; dockerd was busy with it)
        self.uninspected: dict[str, str] = {}

    def _ids(self) -> tuple[int | None, list[str], str]:
        code, out, err = self.run("ps", "-a", "--no-trunc", "--filter",
                                  f"label=com.docker.compose.project={self.args.project}",
                                  "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}')
        for line in out.splitlines():
            container_id, _, service = line.strip().partition(" ")
            if container_id:
                self.listed[container_id] = service
        return code, list(self.listed), err

    def _inspect_raw(self, ids: list[str], failures: dict[str, str]) -> list[dict]:
        code, out, err = self.run("inspect", *ids)
        try:
            found = json.loads(out) if out.strip() else []
        except ValueError:
            found = None
        if found is None or (code != 0 and not found):  # one call for all: none of them was read
            why = (err.strip().splitlines() or ["unreadable output"])[-1]
            failures.update({container_id: why for container_id in ids if "No such" not in why})
            return []
        return found

    def _events_raw(self, since: float, until: float) -> tuple[bool, list[str], str]:
        code, out, err = self.run(
            "events", "--since", str(int(since)), "--until", str(int(until) + 1),  # whole seconds: docker's format
            "--filter", "type=container", "--filter", f"label=com.docker.compose.project={self.args.project}",
            "--filter", "event=oom", "--filter", "event=die", "--format", "{{json .}}",
            extra_s=max(0.0, until - time.time()))  # it streams until --until: the window end
        return code == 0, out.splitlines(), (err.strip().splitlines() or ["failed"])[-1]

    def run(self, *argv: str, extra_s: float = 0.0, timeout: float | None = None) -> tuple[int | None, str, str]:
        return run(self.argv + list(argv), timeout if timeout is not None else self.exec_timeout + extra_s)

    def exec(self, container_id: str, argv: list[str], timeout: float | None = None) -> tuple[int | None, str, str]:
        """A command inside a running container, with its environment: (exit code, stdout, stderr)."""
        return self.run("exec", container_id, *argv, timeout=timeout)

    def list_containers(self) -> list[dict] | None:
        started = time.monotonic()
        code, ids, err = self._ids()
        first_call_s = time.monotonic() - started
        self.exec_timeout = min(max(self.args.exec_timeout, SLOW_HOST_FACTOR * first_call_s),
                                max(self.args.exec_timeout, MAX_EXEC_TIMEOUT))
        self.status.update(first_call_s=round(first_call_s, 2), exec_timeout_s=round(self.exec_timeout, 1))
        if code != 0:
            self.status.update(ok=False, error=(err.strip().splitlines() or ["no output"])[-1])
            return None
        self.status["ok"] = True
        failures: dict[str, str] = {}
        views = self.inspect(ids, failures) if ids else []
        self.uninspected = {self.listed.get(container_id) or container_id[:12]: why
                            for container_id, why in failures.items()}
        return views

    def inspect(self, ids: list[str], failures: dict[str, str] | None = None) -> list[dict]:
        """Views of the containers that answered; the others' errors go to failures (id -> why),
        or to the run's errors when no dict is given."""
        if not ids:
            return []
        views = []
        failed: dict[str, str] = {} if failures is None else failures
        raw = self._inspect_raw(ids, failed)
        if failures is None:
            self.errors.extend(f"docker inspect {container_id[:12]}: {why}" for container_id, why in failed.items())
        for item in raw:
            view = inspect_view(item)
            endpoint = (redis_endpoint(item) if view["service"] in REDIS_SERVICES else
                        postgres_endpoint(item) if view["service"] == POSTGRES_SERVICE else None)
            if endpoint:
                self.endpoints[view["id"]] = endpoint
            views.append(view)
        return views

    def images(self) -> list[str] | None:
        """Every image present, as repository:tag and repository@digest (the deploy's check for
        images to load); None when docker did not answer."""
        code, out, err = self.run("images", "--digests", "--format", "{{.Repository}}:{{.Tag}} {{.Repository}}@{{.Digest}}")
        if code != 0:
            self.errors.append(f"docker images: {(err.strip().splitlines() or ['failed'])[-1]}")
            return None
        return image_names(out.split())

    def events(self, since: float, until: float) -> list[dict]:
        ok, lines, error = self._events_raw(since, until)
        if not ok:
            self.errors.append(f"docker events: {error}")
            return []
        found = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            attributes = (event.get("Actor") or {}).get("Attributes") or {}
            exit_code = attributes.get("exitCode")
            found.append({
                "time": event.get("time"),
                "action": event.get("Action") or event.get("status"),
                "id": (event.get("Actor") or {}).get("ID") or event.get("id"),
                "name": attributes.get("name"),
                "service": attributes.get("io.edgefit.service") or attributes.get("com.docker.compose.service"),
                "exit_code": int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None,
            })
        return found


def unix_http(socket_path: str, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.0 request on a unix socket -> (status, body): dockerd answers HTTP/1.0 without
    chunks and closes the connection. http.client is left for exec's attached stream: importing
    it (and the email package under it) took 1-2 s on a loaded small host (issue 12)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(socket_path)
        head = f"{method} {path} HTTP/1.0\r\nHost: docker\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        connection.sendall(head.encode() + b"\r\n" + (body or b""))
        chunks = []
        while True:
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = connection.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    header, separator, content = data.partition(b"\r\n\r\n")
    status_line = header.split(b"\r\n", 1)[0].split()
    if not separator or len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError("unreadable answer from dockerd")
    return int(status_line[1]), content


def unix_http_connection(path: str, timeout: float):
    """http.client over a unix socket, imported only here: exec's attached stream needs it."""
    import http.client  # noqa: PLC0415 - slow to import on a loaded host; only exec needs it

    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self):
            super().__init__("localhost", timeout=timeout)

        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)

    return UnixHTTPConnection(), http.client.HTTPException


class DockerSocket(Docker):
    """ps, inspect, events and exec straight from the daemon's API on its unix socket: the same
    JSON the CLI prints, without starting the docker CLI (a Go binary that took 1-9 s per call on
    the emulated test hosts: most of a no-op deploy's time, issue 12)."""

    def __init__(self, args, errors: list[str]):
        super().__init__(args, errors)
        self.status["via"] = "socket"

    def _get(self, path: str, query: dict, timeout: float, method: str = "GET",
             payload: dict | None = None, stream: bool = False) -> tuple[int | None, bytes, str]:
        """One API call; stream: exec's attached output, read through http.client until dockerd
        closes it (an upgraded connection, which the plain HTTP/1.0 reader does not speak)."""
        target = f"{path}?{urllib.parse.urlencode(query)}"
        body = None if payload is None else json.dumps(payload).encode()
        try:
            if stream:
                connection, http_error = unix_http_connection(self.args.docker_socket, timeout)
                try:
                    connection.request(method, target, body=body,
                                       headers={"Content-Type": "application/json"} if body is not None else {})
                    response = connection.getresponse()
                    status, content = response.status, response.read()
                except http_error as error:
                    raise ConnectionError(str(error)) from None
                finally:
                    connection.close()
            else:
                status, content = unix_http(self.args.docker_socket, method, target, body, timeout)
            return status, content, "" if status in (200, 201) else content.decode(errors="replace")[:200]
        except (OSError, ConnectionError) as error:
            return None, b"", (timed_out(timeout) if isinstance(error, TimeoutError)
                               else f"{self.args.docker_socket}: {error}")

    def _filters(self, **more: list[str]) -> str:
        return json.dumps({"label": [f"com.docker.compose.project={self.args.project}"], **more})

    def _ids(self) -> tuple[int | None, list[str], str]:
        status, body, error = self._get("/containers/json", {"all": "1", "filters": self._filters()},
                                        self.exec_timeout)
        if status != 200:
            return 1, [], error or f"HTTP {status}"
        try:
            self.listed = {item["Id"]: (item.get("Labels") or {}).get("com.docker.compose.service") or ""
                           for item in json.loads(body)}
            return 0, list(self.listed), ""
        except (ValueError, KeyError, TypeError, AttributeError):
            return 1, [], "unreadable container list"

    def _inspect_raw(self, ids: list[str], failures: dict[str, str]) -> list[dict]:
        """Every container at once, a thread each (one after another took 2 s for 11 containers
        on a loaded small host), in the list's order."""
        answers: dict[str, tuple[int | None, bytes, str]] = {}

        def inspect_one(container_id: str) -> None:
            status, body, error = self._get(f"/containers/{container_id}/json", {}, self.exec_timeout)
            if status is None and error.startswith("timed out"):
                # dockerd holds a container it is restarting (after an OOM kill, seconds on a slow
                # host): once more, longer, rather than judge a running service missing
                status, body, error = self._get(f"/containers/{container_id}/json", {}, INSPECT_RETRY_S)
            answers[container_id] = (status, body, error)

        threads = [threading.Thread(target=inspect_one, args=(container_id,), daemon=True) for container_id in ids]
        for thread in threads:
            thread.start()
        for thread in threads:  # each call is bounded by its two timeouts
            thread.join(self.exec_timeout + INSPECT_RETRY_S + JOIN_SLACK_S)
        found = []
        for container_id in ids:
            status, body, error = answers.get(container_id, (None, b"", timed_out(self.exec_timeout + INSPECT_RETRY_S)))
            if status == 404:
                continue  # removed since the list: as `docker inspect` leaves it out
            try:
                if status != 200:
                    raise ValueError(error)
                found.append(json.loads(body))
            except ValueError:
                failures[container_id] = error or "unreadable answer"
        return found

    def images(self) -> list[str] | None:
        status, body, error = self._get("/images/json", {"digests": "1"}, self.exec_timeout)
        try:
            if status != 200:
                raise ValueError(error or f"HTTP {status}")
            items = json.loads(body)
        except ValueError as problem:
            self.errors.append(f"docker images: {problem}")
            return None
        names = set()
        for item in items:
            names.update(item.get("RepoTags") or [])
            names.update(item.get("RepoDigests") or [])
        return image_names(names)

    def exec(self, container_id: str, argv: list[str], timeout: float | None = None) -> tuple[int | None, str, str]:
        """Create the exec, start it attached (its output comes back on the same connection),
        then read its exit code: three requests to dockerd, no CLI."""
        limit = self.exec_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit

        def left() -> float:
            return deadline - time.monotonic()

        status, body, error = self._get(f"/containers/{container_id}/exec", {}, limit, "POST",
                                        {"Cmd": argv, "AttachStdout": True, "AttachStderr": True})
        try:
            exec_id = json.loads(body)["Id"] if status == 201 else None
        except (ValueError, KeyError, TypeError):
            exec_id = None
        if exec_id is None:
            return (None if status is None else 1), "", error or f"exec create: HTTP {status}"
        if left() <= 0:
            return None, "", timed_out(limit)
        status, body, error = self._get(f"/exec/{exec_id}/start", {}, left(), "POST", {"Detach": False, "Tty": False},
                                        stream=True)
        if status != 200:
            return (None if status is None else 1), "", (timed_out(limit) if status is None else error)
        out, err = demux_stream(body)
        for _ in range(20):  # the exit code is set a moment after the stream ends
            status, body, error = self._get(f"/exec/{exec_id}/json", {}, max(1.0, left()))
            try:
                state = json.loads(body) if status == 200 else {}
                if state.get("ExitCode") is not None and not state.get("Running"):
                    return state["ExitCode"], out, err
            except (ValueError, AttributeError):
                pass
            if status != 200 or left() <= 0:
                break
            time.sleep(0.05)
        return None, out, err or error or "exec: no exit code"

    def _events_raw(self, since: float, until: float) -> tuple[bool, list[str], str]:
        query = {"since": str(int(since)), "until": str(int(until) + 1),
                 "filters": self._filters(type=["container"], event=["oom", "die"])}
        status, body, error = self._get("/events", query, self.exec_timeout + max(0.0, until - time.time()))
        return status == 200, body.decode(errors="replace").splitlines(), error or f"HTTP {status}"


def demux_stream(data: bytes) -> tuple[str, str]:
    """stdout and stderr of docker's multiplexed stream: frames of an 8-byte header (stream 1 or 2,
    then the length, big-endian, in bytes 4-7) and that many bytes."""
    parts = {1: [], 2: []}
    at = 0
    while at + 8 <= len(data):
        kind, size = data[at], int.from_bytes(data[at + 4:at + 8], "big")
        parts.setdefault(kind, []).append(data[at + 8:at + 8 + size])
        at += 8 + size
    return b"".join(parts[1]).decode(errors="replace"), b"".join(parts[2]).decode(errors="replace")


REDIS_PORT = 6379


def redis_endpoint(item: dict) -> tuple[str, int, str] | None:
    """(address, port, password) to ask a Redis container directly: its address on its first
    network and the REDISCLI_AUTH the stack gives it. Kept in memory for the check, never printed."""
    env, address = container_env_and_address(item)
    return (address, REDIS_PORT, env["REDISCLI_AUTH"]) if address and env.get("REDISCLI_AUTH") else None


def resp_command(*words: str) -> bytes:
    return f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(word.encode())}\r\n".encode() + word.encode() + b"\r\n" for word in words)


def resp_read(stream):
    """One RESP2 reply from a file-like stream: str, int, None, or a list of them."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ValueError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [resp_read(stream) for _ in range(size)]
    raise ValueError(f"unexpected reply {line[:20]!r}")


def redis_query(address: str, port: int, password: str, commands: list[tuple[str, ...]], timeout: float) -> list:
    """AUTH, then each command, over one TCP connection: redis-cli's answers without a docker exec."""
    with socket.create_connection((address, port), timeout=timeout) as connection:
        connection.settimeout(timeout)
        connection.sendall(resp_command("AUTH", password) + b"".join(resp_command(*c) for c in commands))
        stream = connection.makefile("rb")
        resp_read(stream)  # +OK, or raises with Redis's own words
        return [resp_read(stream) for _ in commands]


def redis_info(text: str) -> dict:
    info = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in REDIS_INFO_KEYS:
            info[key] = int(value) if value.isdigit() else value
    return info


POSTGRES_PORT = 5432


def container_env_and_address(item: dict) -> tuple[dict[str, str], str | None]:
    env = dict(entry.split("=", 1) for entry in (item.get("Config") or {}).get("Env") or [] if "=" in entry)
    networks = ((item.get("NetworkSettings") or {}).get("Networks") or {}).values()
    return env, next((network.get("IPAddress") for network in networks if network.get("IPAddress")), None)


def postgres_endpoint(item: dict) -> tuple[str, int, str] | None:
    """(address, port, password) to ask Postgres directly as the superuser its container was made
    with (POSTGRES_PASSWORD); pg_hba.conf takes SCRAM logins from Docker's networks."""
    env, address = container_env_and_address(item)
    return (address, POSTGRES_PORT, env["POSTGRES_PASSWORD"]) if address and env.get("POSTGRES_PASSWORD") else None


def _pg_message(kind: bytes, payload: bytes) -> bytes:
    return kind + (len(payload) + 4).to_bytes(4, "big") + payload


def _pg_read(stream) -> tuple[bytes, bytes]:
    header = stream.read(5)
    if len(header) < 5:
        raise ConnectionError("connection closed")
    size = int.from_bytes(header[1:5], "big") - 4
    return header[:1], stream.read(size)


def _pg_error(payload: bytes) -> str:
    fields = {part[:1]: part[1:].decode(errors="replace") for part in payload.split(b"\0") if part}
    return fields.get(b"M", "error")


def _scram_proof(password: str, client_first_bare: str, server_first: str, nonce: str) -> tuple[str, bytes]:
    """SCRAM-SHA-256 (RFC 7677) as Postgres asks for it: the client's final message and the
    server signature it must send back."""
    import base64, hashlib, hmac  # noqa: E401,PLC0415
    attributes = dict(part.split("=", 1) for part in server_first.split(","))
    if not attributes["r"].startswith(nonce):
        raise ValueError("SCRAM: the server's nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attributes["s"]), int(attributes["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c=biws,r={attributes['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return f"{without_proof},p={proof}", hmac.new(server_key, auth_message, "sha256").digest()


def postgres_query(address: str, port: int, password: str, sql: str, timeout: float,
                   user: str = "postgres", database: str = "postgres") -> list[list[str | None]]:
    """The rows of one query over Postgres' own protocol (v3, SCRAM-SHA-256 or md5 login): psql's
    answer without a docker exec, which took 2-15 s on the emulated test hosts (issue 12)."""
    import base64, hashlib, hmac  # noqa: E401,PLC0415
    with socket.create_connection((address, port), timeout=timeout) as connection:
        connection.settimeout(timeout)
        stream = connection.makefile("rb")
        startup = (3 << 16).to_bytes(4, "big") + f"user\0{user}\0database\0{database}\0\0".encode()
        connection.sendall((len(startup) + 4).to_bytes(4, "big") + startup)
        nonce, expected = base64.b64encode(os.urandom(18)).decode(), None
        client_first_bare = f"n=,r={nonce}"
        rows: list[list[str | None]] = []
        while True:
            kind, payload = _pg_read(stream)
            if kind == b"E":
                raise ValueError(_pg_error(payload))
            if kind == b"R":
                code = int.from_bytes(payload[:4], "big")
                if code == 10:  # SASL: the mechanisms offered
                    if b"SCRAM-SHA-256\0" not in payload[4:]:
                        raise ValueError("no SCRAM-SHA-256 offered")
                    first = f"n,,{client_first_bare}".encode()
                    connection.sendall(_pg_message(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
                elif code == 11:
                    final, expected = _scram_proof(password, client_first_bare, payload[4:].decode(), nonce)
                    connection.sendall(_pg_message(b"p", final.encode()))
                elif code == 12:
                    got = dict(part.split("=", 1) for part in payload[4:].decode().split(","))
                    if expected is None or not hmac.compare_digest(base64.b64decode(got.get("v", "")), expected):
                        raise ValueError("SCRAM: the server's signature is wrong")
                elif code == 5:  # md5, where pg_hba asks for it
                    inner = hashlib.md5((password + user).encode()).hexdigest()
                    digest = "md5" + hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
                    connection.sendall(_pg_message(b"p", digest.encode() + b"\0"))
                elif code != 0:
                    raise ValueError(f"unsupported login method {code}")
            elif kind == b"Z":
                if sql:
                    connection.sendall(_pg_message(b"Q", sql.encode() + b"\0"))
                    sql = ""
                else:
                    connection.sendall(_pg_message(b"X", b""))
                    return rows
            elif kind == b"D":
                count, at, row = int.from_bytes(payload[:2], "big"), 2, []
                for _ in range(count):
                    size = int.from_bytes(payload[at:at + 4], "big", signed=True)
                    at += 4
                    row.append(None if size < 0 else payload[at:at + size].decode(errors="replace"))
                    at += max(size, 0)
                rows.append(row)


class ServiceChecks:
    """Settings read inside the containers through docker exec: Redis, Postgres, GC thresholds."""

    def __init__(self, docker: Docker):
        self.docker = docker

    def redis_check(self, record: dict, with_config: bool, timeout: float | None = None) -> dict:
        endpoint = self.docker.endpoints.get(record["id"])
        if endpoint:
            return self.redis_direct(endpoint, with_config, timeout or self.docker.exec_timeout)
        script = ("redis-cli --no-auth-warning -h 127.0.0.1 CONFIG GET 'maxmemory*'; echo '@@INFO@@'; "
                  "redis-cli --no-auth-warning -h 127.0.0.1 INFO") if with_config else \
                 "echo '@@INFO@@'; redis-cli --no-auth-warning -h 127.0.0.1 INFO"
        code, out, err = self.docker.exec(record["id"], ["sh", "-c", script], timeout=timeout)
        if code != 0 or "@@INFO@@" not in out:
            return {"error": (err.strip().splitlines() or out.strip().splitlines() or [f"exit {code}"])[-1][:200]}
        config_part, _, info_part = out.partition("@@INFO@@")
        result: dict = {}
        if with_config:
            lines = [line.strip() for line in config_part.splitlines() if line.strip()]
            result["config"] = dict(zip(lines[0::2], lines[1::2]))
        result["info"] = redis_info(info_part)
        if not result["info"] and with_config and not result["config"]:
            result["error"] = (out.strip().splitlines() or ["no answer"])[-1][:200]
        return result

    @staticmethod
    def redis_direct(endpoint: tuple[str, int, str], with_config: bool, timeout: float) -> dict:
        address, port, password = endpoint
        commands = ([("CONFIG", "GET", "maxmemory*")] if with_config else []) + [("INFO",)]
        try:
            answers = redis_query(address, port, password, commands, timeout)
        except (OSError, ValueError, ConnectionError) as error:
            reason = timed_out(timeout) if isinstance(error, TimeoutError) else str(error)
            return {"error": f"redis at {address}: {reason}"[:200]}
        result: dict = {"info": redis_info(answers[-1] or "")}
        if with_config:
            pairs = answers[0] or []
            result["config"] = dict(zip(pairs[0::2], pairs[1::2]))
        return result

    def postgres_check(self, record: dict, timeout: float | None = None) -> dict:
        names = ",".join(f"'{name}'" for name in POSTGRES_SETTINGS)
        sql = f"SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name IN ({names})"
        endpoint = self.docker.endpoints.get(record["id"])
        if endpoint:
            address, port, password = endpoint
            limit = timeout or self.docker.exec_timeout
            try:
                rows = postgres_query(address, port, password, sql, limit)
            except (OSError, ValueError, ConnectionError, KeyError) as error:
                reason = timed_out(limit) if isinstance(error, TimeoutError) else str(error)
                return {"error": f"postgres at {address}: {reason}"[:200]}
            return {"settings": {name: {"setting": setting, "unit": unit} for name, setting, unit in rows}}
        code, out, err = self.docker.exec(record["id"], [
            "psql", "-U", "postgres", "-d", "postgres", "-XAtq", "-F", "|", "-c", sql], timeout=timeout)
        if code != 0:
            return {"error": (err.strip().splitlines() or [f"exit {code}"])[-1][:200]}
        settings = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                settings[parts[0]] = {"setting": parts[1], "unit": parts[2]}
        return {"settings": settings}

    def gc_check(self, record: dict, timeout: float | None = None) -> dict:
        code, out, err = self.docker.exec(record["id"], ["python3", "-c", "import gc; print(gc.get_threshold())"],
                                          timeout=timeout)
        if code != 0:
            return {"error": (err.strip().splitlines() or [f"exit {code}"])[-1][:200]}
        return {"threshold": out.strip()}


class ContainerMemory:
    """Memory and CPU of one container: its cgroup's files, or psutil over its processes where those cannot be read."""

    def __init__(self):
        self._psutil = None  # the optional psutil module (Debian: python3-psutil), imported when used
        self.has_psutil = importlib.util.find_spec("psutil") is not None

    @property
    def psutil(self):
        """psutil, imported on first use (0.2 s on a loaded small host: most runs read cgroups only)."""
        if self._psutil is None and self.has_psutil:
            try:
                import psutil  # noqa: PLC0415 - optional
                self._psutil = psutil
            except ImportError:
                self.has_psutil = False
        return self._psutil

    def processes(self, pid: int) -> list:
        """The container's main process and all its descendants, as psutil sees them ([] without psutil)."""
        psutil = self.psutil
        if psutil is None or not pid:
            return []
        try:
            root = psutil.Process(pid)
            return [root] + root.children(recursive=True)
        except (psutil.Error, OSError):
            return []

    def sample(self, record: dict) -> dict | None:
        """One sample of the container's memory and CPU: from its cgroup, else summed over its processes."""
        directory = record.get("cgroup")
        if directory:
            current = read_value(os.path.join(directory, "memory.current"))
            if isinstance(current, int):
                stat = read_flat_keyed(os.path.join(directory, "memory.stat")) or {}
                cpu = read_flat_keyed(os.path.join(directory, "cpu.stat")) or {}
                sample = {"current": current, "cpu_usec": cpu.get("usage_usec")}
                sample.update({key: stat[key] for key in STAT_KEYS if key in stat})
                return sample
        if self.psutil is not None and record["start"].get("pid"):
            psutil = self.psutil
            rss = shared = cpu_s = 0
            alive = 0
            for process in self.processes(record["start"]["pid"]):
                try:
                    with process.oneshot():
                        info = process.memory_info()
                        times = process.cpu_times()
                except (psutil.Error, OSError):
                    continue
                alive += 1
                rss += info.rss
                shared += getattr(info, "shared", 0)
                cpu_s += times.user + times.system
            if alive:
                record["source"] = "psutil"
                return {"current": rss, "anon": max(0, rss - shared), "file": shared, "inactive_file": 0,
                        "cpu_usec": int(cpu_s * 1_000_000), "processes": alive}
        return None

    def cgroup_snapshot(self, record: dict) -> dict:
        """The container's limits, peak and memory events as its cgroup has them now ({} without one)."""
        directory = record.get("cgroup")
        if not directory:
            return {}
        return {
            "max": read_value(os.path.join(directory, "memory.max")),
            "swap_max": read_value(os.path.join(directory, "memory.swap.max")),
            "peak": read_value(os.path.join(directory, "memory.peak")),  # kernel 5.19+
            "events": read_flat_keyed(os.path.join(directory, "memory.events")),
            "cpu_max": (read_text(os.path.join(directory, "cpu.max")) or "").strip() or None,
        }


class CheckLanes:
    """The checks, from the window's start until deadline (the window plus one exec timeout).
    Redis is asked directly (no exec) in a lane of its own; the docker exec checks share
    EXEC_LANES lanes, Postgres first: all at once they were a burst of runc starts that, on a
    2-core host, made every one of them late together (and the stack's own healthchecks with
    them); one at a time, four execs of ~5 s each did not fit a short window. In each lane a
    check gets whatever time is left. An exec that answered after d seconds moves the deadline to at
    least d x EXEC_PACE_FACTOR from its end (never past cap): the host showed its pace, and
    the next exec gets the time that pace needs (the worker's GC check after a Postgres exec
    of 10 s, right after a recreate on the slow host, once got 5.7 s and timed out)."""

    def __init__(self, service_checks: ServiceChecks, kinds: set[str], containers: dict[str, dict], keep):
        self.service_checks = service_checks
        self.kinds = kinds  # --checks: which kinds to run
        self.containers = containers  # id -> record, as the run fills it
        self.keep = keep  # keep(key, value): where each answer goes as it comes
        self.deadline = 0.0  # monotonic; set by runners, moved by the host's pace
        self.cap = 0.0  # monotonic; the pace never moves the deadline past it

    def lanes(self) -> list[list]:
        """The (key, job) pairs of each lane: Redis in its own, the exec checks dealt over EXEC_LANES."""
        lanes: dict[str, list] = {}
        execs = 0
        by_kind = sorted(
            (record for record in self.containers.values() if record["start"]["running"]),
            key=lambda r: (r["start"]["service"] not in REDIS_SERVICES, r["start"]["service"] != POSTGRES_SERVICE,
                           r["start"]["service"]))
        for record in by_kind:
            service = record["start"]["service"]
            kind = "redis" if service in REDIS_SERVICES else "postgres" if service == POSTGRES_SERVICE else "gc"
            if kind not in self.kinds or (kind == "gc" and service not in GC_SERVICES):
                continue
            if kind == "redis":
                lane = "redis"
                job = (("redis", service), lambda t, r=record: self.service_checks.redis_check(r, True, t))
            else:
                lane, execs = f"exec-{execs % EXEC_LANES}", execs + 1
                job = ((("postgres", None), lambda t, r=record: self.service_checks.postgres_check(r, t))
                       if kind == "postgres" else
                       (("gc", service), lambda t, r=record: self.service_checks.gc_check(r, t)))
            lanes.setdefault(lane, []).append(job)
        return list(lanes.values())

    def runners(self, deadline: float, cap: float) -> list:
        """One callable per lane, to run in a thread of its own, with the deadline and cap set."""
        self.deadline, self.cap = deadline, cap
        return [lambda jobs=jobs: self.in_turn(jobs) for jobs in self.lanes()]

    def in_turn(self, jobs: list) -> None:
        """One lane's checks one after another, each given the time left; an exec's answer sets the pace."""
        for key, job in jobs:
            started = time.monotonic()
            left = self.deadline - started
            value = job(left) if left >= 1.0 else {"error": "not run: no time left in the window"}
            if left >= 1.0 and key[0] != "redis" and not (isinstance(value, dict) and value.get("error")):
                ended = time.monotonic()
                self.deadline = min(self.cap, max(self.deadline, ended + EXEC_PACE_FACTOR * (ended - started)))
            self.keep(key, value)


class Sampler:
    """One run: the containers, their memory and CPU over the window, the checks, the events."""

    def __init__(self, args):
        self.args = args
        self.errors: list[str] = []
        use_socket = bool(args.docker_socket) and os.access(args.docker_socket, os.R_OK | os.W_OK)
        self.docker = (DockerSocket if use_socket else Docker)(args, self.errors)
        self.service_checks = ServiceChecks(self.docker)
        self.memory = ContainerMemory()
        self.result: dict = {"schema": SCHEMA, "errors": self.errors}
        self.containers: dict[str, dict] = {}  # id -> record
        self.checks: dict = {"redis": {}, "postgres": None, "gc": {}}
        self.lanes = CheckLanes(self.service_checks, args.checks, self.containers, self._keep)
        self.began = 0.0  # monotonic, at the run's start
        self.wall_start = 0.0  # time.time(), at the run's start
        self._end_views: list[dict] | None = None
        self._events: list[dict] | None = None

    # -- the checks and the other calls that run beside the window
    def start_checks(self, deadline: float, cap: float) -> list[threading.Thread]:
        """The checks in their lanes (CheckLanes), until deadline, which the host's pace may move up to cap."""
        return [self._thread(("checks", None), runner) for runner in self.lanes.runners(deadline, cap)]

    def _thread(self, key, job) -> threading.Thread:
        """job() in a daemon thread, started; its answer (or its exception's) is kept under key."""
        def target():
            try:
                value = job()
            except Exception as error:  # a check must never take the sampler down
                value = {"error": f"{type(error).__name__}: {error}"}
            if key[0] != "checks":  # those keep their own answers as they come
                self._keep(key, value)
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def _keep(self, key, value) -> None:
        """Keeps one call's answer where the result wants it, by its key (kind, name)."""
        kind, name = key
        if kind == "inspect_end":
            self._end_views = value if isinstance(value, list) else []
        elif kind == "events":
            self._events = value if isinstance(value, list) else []
        elif kind == "postgres":
            self.checks["postgres"] = value
        elif kind == "redis_end":
            self.checks["redis"].setdefault(name, {})["info_end"] = value.get("info")
        else:
            earlier = self.checks[kind].get(name)
            if isinstance(earlier, dict) and isinstance(value, dict):
                # the end-of-window call may answer first (its info_end is kept)
                value = {**value, **earlier}
            self.checks[kind][name] = value

    def start_end_calls(self, lead: float, exec_timeout: float, wall_end: float) -> list[threading.Thread]:
        """The calls about the window's end, started: Redis's counters, and the events until wall_end."""
        args = self.args
        threads: list[threading.Thread] = []
        for record in self.containers.values():
            if record["start"]["running"] and record["start"]["service"] in REDIS_SERVICES and "redis" in args.checks:
                threads.append(self._thread(("redis_end", record["start"]["service"]),
                                            lambda r=record: self.service_checks.redis_check(
                                                r, False, lead + exec_timeout)))
        if "events" in args.checks:
            threads.append(self._thread(("events", None),
                                        lambda: self.docker.events(wall_end - args.events_since, wall_end)))
        return threads

    # -- samples
    def host_sample(self, t: float) -> dict:
        """The host's memory at t seconds into the run."""
        return {"t": round(t, 2), "meminfo_kib": read_meminfo(self.args.proc_root)}

    def take_sample(self, t: float) -> None:
        """One sample of the host and of every container, at t seconds into the run."""
        self.result["host"]["samples"].append(self.host_sample(t))
        for record in self.containers.values():
            sample = self.memory.sample(record)
            if sample is not None:
                sample["t"] = round(t, 2)
                record["samples"].append(sample)

    # -- the run, step by step
    def main(self) -> dict:
        """The run: begin (header, containers), the checks, the window's samples, its end, the joins, the result."""
        if not self.begin():  # docker does not answer: nothing to watch
            self.result.update({"containers": [], "checks": self.checks, "events": [], "files": {}})
            return self.stamp_end()
        self.take_sample(0.0)
        exec_timeout = self.docker.exec_timeout
        window_end = self.began + self.args.window
        threads = self.start_checks(window_end + exec_timeout, window_end + max(exec_timeout, MAX_EXEC_TIMEOUT))
        threads += self.sample_window(exec_timeout)
        threads += self.end_of_window()
        self.wait_for(threads, exec_timeout)
        return self.collect()

    def header(self) -> dict:
        """What the result says first: when, the window, the stack, the host as the run starts."""
        args = self.args
        return {
            "started": self.wall_start, "window_s": args.window, "interval_s": args.interval,
            "events_since_s": args.events_since,
            "project": args.project,
            "stack": {"dir": args.stack_dir,
                      "compose_file": os.path.isfile(os.path.join(args.stack_dir, "docker-compose.yml"))},
            "host": {"cgroup2": os.path.isfile(os.path.join(args.cgroup_root, "cgroup.controllers")),
                     "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                     "psi_start": read_psi(os.path.join(args.proc_root, "pressure", "memory")),
                     "samples": []},
            "psutil": self.memory.has_psutil,
        }

    def begin(self) -> bool:
        """The run's start: the header, then a record per container found; False when docker does not answer."""
        args = self.args
        self.began = time.monotonic()
        self.wall_start = time.time()
        self.result.update(self.header())
        found = self.docker.list_containers()
        self.result["docker"] = self.docker.status
        self.result["uninspected"] = self.docker.uninspected
        if args.images and found is not None:
            self.result["images"] = self.docker.images()
        if args.record:
            self.result["record_images"] = read_record_images(args.record)
        if found is None:
            return False
        for view in found or []:
            record = {"id": view["id"], "start": view, "samples": [], "source": "cgroup"}
            record["cgroup"] = cgroup_dir(view["pid"], view["id"], args.cgroup_root, args.proc_root) \
                if view["running"] else None
            if view["running"] and not record["cgroup"]:
                record["source"] = "psutil" if self.memory.has_psutil else "none"
            record["cgroup_start"] = self.memory.cgroup_snapshot(record)
            self.containers[view["id"]] = record
        return True

    def sample_window(self, exec_timeout: float) -> list[threading.Thread]:
        """The window's samples, one per interval; returns the end-of-window calls, started shortly before its end."""
        args, began = self.args, self.began
        samples = max(1, int(round(args.window / args.interval)))
        # docker calls are slow on a loaded host (seconds each under emulation), so the calls
        # about the window's end start shortly before it: `docker events --until` streams
        # until that moment and then returns, and Redis's counters are read just before it.
        wall_end = self.wall_start + args.window
        lead = min(END_CALLS_LEAD_S, args.window / 4)
        end_threads: list[threading.Thread] = []
        for index in range(1, samples + 1):
            target = began + index * args.window / samples
            if not end_threads and target - lead <= time.monotonic() + args.window / samples:
                time.sleep(max(0.0, target - lead - time.monotonic()))
                end_threads = self.start_end_calls(lead, exec_timeout, wall_end)
            time.sleep(max(0.0, target - time.monotonic()))
            self.take_sample(time.monotonic() - began)
        if not end_threads:
            end_threads = self.start_end_calls(lead, exec_timeout, wall_end)
        return end_threads

    def end_of_window(self) -> list[threading.Thread]:
        """The window's end: the containers' inspect (started), their cgroups, the host's pressure, the files."""
        # End of the window: restart counts and states as they are now. These docker calls run at
        # once, so the run ends at most one exec timeout after the window.
        inspect = self._thread(("inspect_end", None), lambda: self.docker.inspect(list(self.containers)))
        for record in self.containers.values():
            record["cgroup_end"] = self.memory.cgroup_snapshot(record)
        self.result["host"]["psi_end"] = read_psi(os.path.join(self.args.proc_root, "pressure", "memory"))
        self.result["files"] = {path: sha256_file(path) for path in self.args.hash}
        return [inspect]

    def wait_for(self, waiting: list[threading.Thread], exec_timeout: float) -> None:
        """Joins the calls until one exec timeout from now or the checks' deadline, whichever is later (plus slack)."""
        end_deadline = time.monotonic() + exec_timeout
        while any(thread.is_alive() for thread in waiting):
            left = max(end_deadline, self.lanes.deadline) + JOIN_SLACK_S - time.monotonic()
            if left <= 0:
                break
            next(thread for thread in waiting if thread.is_alive()).join(min(left, 0.5))
        # what the checks were given in the end: the window plus this (the host's pace)
        self.docker.status["exec_timeout_s"] = round(
            max(exec_timeout, self.lanes.deadline - self.began - self.args.window), 1)
        if any(thread.is_alive() for thread in waiting):
            self.errors.append(f"some docker calls did not answer within {exec_timeout:g}s")

    def collect(self) -> dict:
        """The result: each container's end view, the events, the checks, the containers, the run's end."""
        ends = {view["id"]: view for view in self._end_views or []}
        for container_id, record in self.containers.items():
            record["end"] = ends.get(container_id)
        self.result["events"] = self._events or []
        self.result["checks"] = self.checks
        self.result["containers"] = list(self.containers.values())
        return self.stamp_end()

    def stamp_end(self) -> dict:
        """The result, stamped with the run's end and its length."""
        self.result["ended"] = time.time()
        self.result["elapsed_s"] = round(time.monotonic() - self.began, 2)
        return self.result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgefit-sampler", description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds to watch (default 30)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--events-since", type=float, default=3600.0,
                        help="look this many seconds back for OOM kills and exits (default 3600)")
    parser.add_argument("--hash", action="append", default=[], metavar="PATH",
                        help="a file whose sha256 to report; repeatable")
    parser.add_argument("--project", default=PROJECT)
    parser.add_argument("--stack-dir", default=STACK_DIR)
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    parser.add_argument("--proc-root", default="/proc")
    parser.add_argument("--docker", default="docker", help="the docker command for exec, and for everything "
                        "when the socket is not there (tests use a fake)")
    parser.add_argument("--docker-socket", default="/var/run/docker.sock",
                        help="the Docker API's unix socket, asked directly for ps, inspect and events; '' for none")
    parser.add_argument("--checks", type=lambda text: set(text.split(",")), default={"redis", "postgres", "gc", "events"},
                        help="which checks to run: redis,postgres,gc (docker exec) and events (default all)")
    parser.add_argument("--images", action="store_true",
                        help="also list the images present (repository:tag and repository@digest)")
    parser.add_argument("--record", metavar="PATH",
                        help="also report the images of this plan of record (the deploy judges an upgrade by them)")
    parser.add_argument("--exec-timeout", type=float, default=EXEC_TIMEOUT,
                        help=f"seconds one docker call may take at least (default {EXEC_TIMEOUT:g}; on a slow host "
                             f"{SLOW_HOST_FACTOR}x its first call, up to {MAX_EXEC_TIMEOUT:g})")
    args = parser.parse_args(argv)
    if not 0 < args.window <= 3600 or not 0 < args.interval <= args.window:
        parser.error("need 0 < --interval <= --window <= 3600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = Sampler(args).main()
    except Exception as error:  # one JSON document, always
        result = {"schema": SCHEMA, "fatal": f"{type(error).__name__}: {error}"}
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
