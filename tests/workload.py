"""A bounded, realistic mix of Dify traffic through a host's nginx (issue 9, item 6).

Runs on a test VM with its python3's standard library only (the VM test and bench/workload.py
send this file's text to edge-medium and point it at edge-small's HTTPS port), so clients come
from outside the host as a user's would, and the load they add is not charged to the host measured.
Parameters: one JSON object on stdin (WORKLOAD below gives the defaults); result: one JSON object
on stdout.

The mix, after Dify's own load in ../shared/notes/dify-memory.md ("Load (bounded)"): documents
uploaded one after another for the worker to index (sizes up to the host's upload cap, and one
above it that must be refused with 413), console GETs from `clients` clients throughout, and in
the middle a burst of `burst_clients` clients at once. Every request has a timeout; the whole run
ends after `seconds` plus the last requests' timeouts.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import threading
import time

WORKLOAD = {
    "host": "127.0.0.1",
    "port": 443,
    "seconds": 120,  # the mix's length
    "clients": 10,  # console GETs throughout, each with a 0.2 s pause between requests
    "burst_clients": 30,  # at once, at the middle of the run ("a burst of concurrent clients")
    "burst_requests": 5,  # each
    "upload_mb": [0.1, 1, 4, 8],  # cycled, one upload at a time; capped by the host's limit below
    "upload_limit_mb": 8,  # the host's UPLOAD_FILE_SIZE_LIMIT: one upload above it must get 413
    "timeout_s": 60,  # per request
    "tls": True,  # False: plain HTTP (the unit test's local stand-ins)
}
GET_PATHS = ["/console/api/setup", "/console/api/init", "/"]  # api, api, web


def request(params: dict, method: str, path: str, body: bytes | None = None) -> dict:
    """One HTTPS request on a new connection (a browser's new tab): its status and time."""
    started = time.monotonic()
    if params["tls"]:
        conn = http.client.HTTPSConnection(params["host"], params["port"], timeout=params["timeout_s"],
                                           context=ssl._create_unverified_context())  # the host's own certificate
    else:
        conn = http.client.HTTPConnection(params["host"], params["port"], timeout=params["timeout_s"])
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"} if body else {})
        response = conn.getresponse()
        response.read()
        status, error = response.status, None
    except (OSError, http.client.HTTPException) as exc:
        status, error = None, f"{type(exc).__name__}: {exc}"[:200]
    finally:
        conn.close()
    return {"method": method, "path": path, "status": status, "error": error,
            "start": started, "seconds": time.monotonic() - started}


def run(params: dict) -> dict:
    params = {**WORKLOAD, **params}
    results: list[dict] = []
    lock = threading.Lock()
    begin = time.monotonic()
    end = begin + params["seconds"]

    def record(result: dict, kind: str) -> None:
        with lock:
            results.append({**result, "kind": kind, "start": result["start"] - begin})

    def getter(index: int) -> None:
        n = index
        while time.monotonic() < end:
            record(request(params, "GET", GET_PATHS[n % len(GET_PATHS)]), "get")
            n += 1
            time.sleep(0.2)

    def uploader() -> None:
        sizes = [mb for mb in params["upload_mb"] if mb <= params["upload_limit_mb"]]
        over = params["upload_limit_mb"] + 1
        record(request(params, "POST", "/console/api/files/upload", b"d" * int(over * 1024 * 1024)), "too_large")
        n = 0
        while time.monotonic() < end:
            mb = sizes[n % len(sizes)]
            record(request(params, "POST", "/console/api/files/upload", b"d" * int(mb * 1024 * 1024)), "upload")
            n += 1
            time.sleep(1)

    def burster(index: int) -> None:
        for n in range(params["burst_requests"]):
            record(request(params, "GET", GET_PATHS[(index + n) % len(GET_PATHS)]), "burst")

    threads = [threading.Thread(target=getter, args=(i,)) for i in range(params["clients"])]
    threads.append(threading.Thread(target=uploader))
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, params["seconds"] / 2 - (time.monotonic() - begin)))
    burst = [threading.Thread(target=burster, args=(i,)) for i in range(params["burst_clients"])]
    for thread in burst:
        thread.start()
    for thread in threads + burst:  # each ends by `end` plus one request's timeout
        thread.join()
    return summarize(results, time.monotonic() - begin)


def summarize(results: list[dict], seconds: float) -> dict:
    def ok(r: dict) -> bool:
        return r["status"] is not None and (r["status"] < 400 or (r["kind"] == "too_large" and r["status"] == 413))

    failed = [r for r in results if not ok(r)]
    served = sorted(r["start"] + r["seconds"] for r in results if ok(r))
    # the longest stretch in which no request was answered (an outage as a user sees it)
    gaps = [b - a for a, b in zip([0.0] + served, served)]
    by_kind: dict = {}
    for r in results:
        kind = by_kind.setdefault(r["kind"], {"requests": 0, "failed": 0, "max_s": 0.0, "total_s": 0.0})
        kind["requests"] += 1
        kind["failed"] += 0 if ok(r) else 1
        kind["max_s"] = round(max(kind["max_s"], r["seconds"]), 3)
        kind["total_s"] += r["seconds"]
    for kind in by_kind.values():
        kind["mean_s"] = round(kind.pop("total_s") / kind["requests"], 3)
    return {
        "seconds": round(seconds, 1),
        "requests": len(results),
        "failed": len(failed),
        "failures": [{k: r[k] for k in ("kind", "method", "path", "status", "error")} | {"at_s": round(r["start"], 1)}
                     for r in failed[:20]],
        "uploads_accepted": sum(1 for r in results if r["kind"] == "upload" and ok(r)),
        "too_large_refused": any(r["kind"] == "too_large" and r["status"] == 413 for r in results),
        "max_request_s": round(max((r["seconds"] for r in results), default=0.0), 3),
        "longest_unanswered_s": round(max(gaps, default=0.0), 3),
        "by_kind": by_kind,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read() or "{}"))))
