"""`edgefit verify` from the command line and its remote layer (edgefit/remote.py): unreachable
hosts, bad inventories, and reading the plan of record. Subprocesses: pyinfra patches the
standard library with gevent on import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EDGEFIT = [sys.executable, "-m", "edgefit"]


# ---- the command line and the connection layer (subprocesses: pyinfra patches with gevent) ---------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_exits_2_with_a_sentence_while_other_hosts_are_checked(tmp_path):
    port = closed_port()
    (tmp_path / "inv.py").write_text(
        f'edge = [("dead", {{"ssh_hostname": "127.0.0.1", "ssh_port": {port}, "ssh_user": "root"}}),\n'
        f'        ("@local", {{}})]\n')
    started = time.monotonic()
    done = subprocess.run([*EDGEFIT, "verify", "inv.py", "--window", "2", "--json", "out.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("edgefit verify: COULD NOT CHECK: 2 hosts")
    assert f"dead: could not check: dead is unreachable: Could not connect" in done.stdout
    assert str(port) in done.stdout
    document = json.loads((tmp_path / "out.json").read_text())
    by_host = {h["host"]: h for h in document["hosts"]}
    assert set(by_host) == {"dead", "@local"} and document["exit_code"] == 2
    # The other host was really checked: its sampler ran here and found no stack.
    assert "unreachable" not in by_host["@local"]["summary"]
    assert "has no plan of record (/etc/edgefit/plan.json): no stack was deployed there" in by_host["@local"]["summary"]
    assert elapsed < 2 + 15


def test_bad_inventories_and_limits_exit_2_with_one_line(tmp_path):
    (tmp_path / "inv.py").write_text('edge = [("a.example", {}), ("b.example", {})]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = subprocess.run([*EDGEFIT, "verify", "nope.py"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env=env)
    assert missing.returncode == 2 and missing.stderr.strip() == "edgefit: error: inventory nope.py does not exist"
    nomatch = subprocess.run([*EDGEFIT, "verify", "inv.py", "--limit", "zzz*"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env=env)
    assert nomatch.returncode == 2 and "no host of inv.py matches --limit zzz*" in nomatch.stderr
    window = subprocess.run([*EDGEFIT, "verify", "inv.py", "--window", "0"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env)
    assert window.returncode == 2 and "Traceback" not in window.stderr


RECORD_SCRIPT = r'''
import json, sys
from edgefit import remote
from tests.fake_host import FakeHost
from edgefit.plan import HostSize, make_plan
from edgefit.secrets import Secrets
from pathlib import Path

secrets = Secrets.generate()
fake = FakeHost(Path(sys.argv[1]), make_plan(HostSize(2, 4096, 40)), secrets)
expected = remote.parse_record(fake.record_text().splitlines())
none = remote.parse_record([remote.NO_RECORD])
try:
    remote.parse_record(['{"schema": 1, "services": {}}'])
    old = "accepted"
except ValueError as error:
    old = str(error)
print(json.dumps({"total": expected["total_mem_limit_mib"], "files": len(expected["files"]), "none": none,
                  "old": old, "command": remote.record_command(),
                  "leak": any(v in json.dumps(expected) for v in vars(secrets).values())}))
'''


def test_verify_reads_the_plan_of_record_and_never_the_secrets(tmp_path):
    done = subprocess.run([sys.executable, "-c", RECORD_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["total"] > 0 and result["files"] >= 15 and not result["leak"] and result["none"] is None
    assert "re-deploy" in result["old"]
    assert result["command"].startswith("test -s /etc/edgefit/plan.json && cat /etc/edgefit/plan.json")
    # What crosses the connection: the record command and the sampler, nothing that reads secrets.
    remote_source = (REPO / "edgefit" / "remote.py").read_text()
    assert "secrets" not in remote_source.lower().replace("no secret crosses", "")
