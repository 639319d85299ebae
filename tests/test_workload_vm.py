"""A realistic mix through nginx on edge-small, then `edgefit verify` (issue 9, item 6).

tests/workload.py runs on edge-medium (clients from outside the host, their load not charged to
it) against edge-small's HTTPS port: documents uploaded for the worker to index up to the host's
upload cap (and one above it, refused), console GETs throughout and a burst of 30 clients at once.
Then every accepted document must be indexed, no container may have restarted except the worker
by its own memory watchdog (a clean exit, planned recycling), no request may have failed or waited
beyond the bounds below, and verify must pass. The stack runs the stand-ins' memory model of Dify
(tests/images/standin/dify_standin.py), not Dify.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_security_vm import _ip, _python_on
from tests.test_verify_vm import failing, host_report, verify
from tests.vm_deploy import DeployedStack, containers, in_stack

# Its second run on the VMs (2026-12-02) served all 439 requests (none failed, the site never
# unanswered for more than 2.6 s) but left the last of 8 documents queued for over 180 s: the
# 2C4G plan's watchdog then restarted the worker at 609 MiB of anonymous memory, below its idle
# 320 + jieba's 220 + the smallest indexing task's 78 (618), so after every indexing task. The
# plan's threshold now holds that high-water (tests/test_plan.py checks the rule). In CI's run
# since 2026-12-07: 133 s that day, within the 150 s the same day's changes took off the VM tier
# (nginx reloaded instead of restarted, a restore without its throwaway broker container).
pytestmark = pytest.mark.vm

WORKLOAD = Path(__file__).resolve().parent / "workload.py"
SECONDS = 90
# Item 4: no request waits because of a recycle, and the site is never unanswered. edge-small
# runs one gunicorn worker, so the plan recycles nothing (the stand-in api counts its recycles).
# Single requests are slow here for the emulated host's own reasons (first run, 2026-12-02: GETs
# 4.5 s on average, an 8 MB upload 37 s, TLS on an emulated CPU), so each is bounded by the
# driver's timeout (a request past it is a failure); the outage bound is on the longest time in
# which no request at all was answered (2.8 s in that run).
LONGEST_UNANSWERED_S = 10
INDEXED_WITHIN_S = 180
# Asked of the broker Redis itself (the broker URL's database, templates/dify.env.j2), not through
# a process in the worker's container: in a clean-clone run of the suite on 2026-12-07 that
# process was killed (exit 137) while the worker indexed, which its watchdog's planned restart
# or its memory limit does to anything in the container; the test must not add to either.
BROKER_DB = 1
BROKER_COUNTS = "; ".join(f"REDISCLI_AUTH=$REDIS_BROKER_PASSWORD redis-cli -n {BROKER_DB} {command}" for command in
                          ("scard dataset:standin-done", "llen dataset", "llen dataset:standin-running"))


def broker_counts(host) -> tuple[int, int, int]:
    """(documents indexed so far, queued, running), from the broker."""
    done, queued, running = in_stack(host, "redis_broker", BROKER_COUNTS).stdout.split()
    return int(done), int(queued), int(running)


def upload_limit_mb(host) -> float:
    return float(in_stack(host, "api", "printenv UPLOAD_FILE_SIZE_LIMIT").stdout.strip())


def test_a_realistic_mix_through_nginx_leaves_every_service_up_and_verify_passing(deployed_stack: DeployedStack,
                                                                                  tmp_path):
    small, medium = deployed_stack.hosts["edge-small"], deployed_stack.hosts["edge-medium"]
    limit = upload_limit_mb(small)
    before = {service: (c["Id"], c["RestartCount"]) for service, c in containers(small).items()}
    indexed_before, _, _ = broker_counts(small)
    started = time.monotonic()
    params = {"host": _ip(small), "port": 443, "seconds": SECONDS, "upload_limit_mb": limit,
              "upload_mb": sorted({0.1, 1.0, min(4.0, limit), limit})}
    result = json.loads(_python_on(medium, WORKLOAD.read_text(), stdin=json.dumps(params),
                                   timeout=SECONDS + 4 * 60 + 60))
    print(f"[workload] edge-small, upload cap {limit:g} MB: {json.dumps(result)}")

    assert result["failed"] == 0, result["failures"]
    assert result["too_large_refused"], "an upload above the host's cap was not refused with 413"
    assert result["uploads_accepted"] >= 5 and result["by_kind"]["burst"]["requests"] == 150, result
    assert result["longest_unanswered_s"] <= LONGEST_UNANSWERED_S, result
    model = json.loads(in_stack(small, "api", "curl -fsS http://127.0.0.1:5001/debug/model").stdout)
    assert model["recycles"] == 0 and model["gunicorn_workers"] == 1, model

    deadline = time.monotonic() + INDEXED_WITHIN_S
    while (counts := broker_counts(small)) != (indexed_before + result["uploads_accepted"], 0, 0):
        if time.monotonic() >= deadline:
            worker = containers(small)["worker"]
            log = small.run(f"docker logs --tail 40 {worker['Name'].lstrip('/')} 2>&1", check=False).stdout
            pytest.fail(f"not all documents indexed in {INDEXED_WITHIN_S}s: (done, queued, running) {counts}, "
                        f"{indexed_before} before; the worker restarted {worker['RestartCount']} time(s), "
                        f"state {worker['State']['Status']}; its last log lines:\n{log}")
        time.sleep(5)

    after = containers(small)
    for service, (container_id, restarts) in before.items():
        now = after[service]
        if (now["Id"], now["RestartCount"]) == (container_id, restarts):
            continue
        # only planned recycling: the worker's watchdog ends it cleanly and its restart policy returns it
        assert service == "worker" and now["Id"] == container_id, f"{service} was replaced or restarted"
        assert not now["State"]["OOMKilled"], "the worker was OOM-killed"
        log = small.run(f"docker logs --tail 400 {now['Name'].lstrip('/')} 2>&1 | grep -c 'warm shutdown'",
                        check=False).stdout.strip()
        assert int(log or 0) >= 1, "the worker restarted without its watchdog's warm shutdown"

    # OOM kills and restarts since the workload began count; an earlier test's deliberate OOM kill does not
    since = f"{int(time.monotonic() - started) + 5}s"
    done, document, _ = verify(deployed_stack, tmp_path, "--limit", "edge-small", "--since", since, window=10)
    assert done.returncode == 0, done.stdout[-3000:]
    assert not failing(host_report(document, "edge-small"))
