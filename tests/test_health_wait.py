"""The deploy's bounded health wait (roles/stack.py wait_healthy_command) run by a real shell
against a stand-in `docker` that answers `inspect` from files: what it accepts, what it names.
The VM tier runs it against real Docker on every deploy."""

import subprocess
import time
from pathlib import Path

from edgefit.facts import COMPOSE_PROJECT
from edgefit.upgrade import failing_services
from roles.stack import STABLE_POLLS, STOP_GRACE_S, restart_command, wait_healthy_command

FAKE_DOCKER = """#!/bin/sh
# docker inspect -f FORMAT NAME...: each NAME's line from $STATE/NAME, as the real one formats it;
# NAME.loop: a crash loop, its restart count one higher on every poll
[ "$1" = inspect ] || exit 0
shift 3
rc=0
for name in "$@"; do
  if [ -f "$STATE/$name.loop" ]; then
    n=$(cat "$STATE/$name.loop"); echo $((n + 1)) > "$STATE/$name.loop"; echo "${name#*-dify-} running none restarts=$n" | sed 's/-1 / /'
  elif [ -f "$STATE/$name" ]; then cat "$STATE/$name"
  else echo "Error: No such object: $name" >&2; rc=1; fi
done
exit $rc
"""


def run_wait(tmp_path: Path, lines: dict[str, str], services: list[str], timeout_s: int) -> tuple[int, list[str], float]:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    for service, line in lines.items():
        name = f"{COMPOSE_PROJECT}-{service}-1"
        if line == "loop":
            (state / f"{name}.loop").write_text("0")
        else:
            (state / name).write_text(line + "\n")
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", wait_healthy_command(timeout_s, services, poll_s=1)], capture_output=True,
                          text=True, timeout=timeout_s + 30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "STATE": str(state)})
    return done.returncode, done.stdout.splitlines(), time.monotonic() - started


def test_a_stack_running_and_healthy_passes_after_its_stable_polls(tmp_path):
    code, out, seconds = run_wait(tmp_path, {"api": "api running healthy restarts=0",
                                             "worker": "worker running none restarts=2"}, ["api", "worker"], 60)
    assert code == 0 and out == ["all services running and healthy"]
    assert STABLE_POLLS <= seconds < 30


def test_a_missing_container_is_named_missing_and_the_wait_fails_at_its_bound(tmp_path):
    code, out, seconds = run_wait(tmp_path, {"api": "api running healthy restarts=0"}, ["api", "worker"], 3)
    assert code == 1 and out[0] == "not healthy and stable after 3s (edgefit_health_timeout):"
    assert "worker missing none" in out
    assert failing_services(out, ["api"]) == ["worker"]
    assert 2 <= seconds < 20  # the deadline is counted in whole seconds


def test_an_unhealthy_service_is_named_with_its_health(tmp_path):
    code, out, _ = run_wait(tmp_path, {"api": "api running unhealthy restarts=0",
                                       "nginx": "nginx running healthy restarts=0"}, ["api", "nginx"], 3)
    assert code == 1 and "api running unhealthy" in out
    assert failing_services(out, ["api"]) == ["api"]


def test_a_crash_loop_without_a_healthcheck_never_counts_as_stable(tmp_path):
    code, out, _ = run_wait(tmp_path, {"api": "api running healthy restarts=0", "worker": "loop"}, ["api", "worker"], 6)
    assert code == 1
    assert failing_services(out, ["worker"]) == []  # running each time it is looked at: named by its restarts
    assert any(line.startswith("worker restarts=") and line != "worker restarts=0" for line in out)


RESTART_FAKE_DOCKER = """#!/bin/sh
# docker inspect -f FORMAT NAME: $STATE/started; docker restart ...: logged to $STATE/restarts
case "$1" in
  inspect) cat "$STATE/started" ;;
  restart) echo "$@" >> "$STATE/restarts" ;;
esac
"""


def run_restart(tmp_path: Path, after_compose_up: bool, started: str, marker: int | None) -> tuple[str, str]:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(RESTART_FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (state / "started").write_text(started + "\n")
    (state / "restarts").write_text("")
    if marker is not None:
        (state / "compose-up-started").write_text(f"{marker}\n")
    done = subprocess.run(["sh", "-c", restart_command("redis", after_compose_up, str(state / "compose-up-started"))],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "STATE": str(state)})
    assert done.returncode == 0, done.stderr
    return done.stdout, (state / "restarts").read_text()


def test_a_restart_after_compose_up_skips_a_container_compose_up_started(tmp_path):
    """roles/stack.py restart_command: 2026-12-07T04:56:40Z is 1796619400."""
    out, restarts = run_restart(tmp_path, True, "2026-12-07T04:56:40.123456789Z", 1796619390)
    assert restarts == "" and "no restart" in out
    out, restarts = run_restart(tmp_path, True, "2026-12-07T04:56:40.123456789Z", 1796619400)
    assert restarts == "", "a container started in the second compose up began was started by it"
    out, restarts = run_restart(tmp_path, True, "2026-12-07T04:56:40.123456789Z", 1796619401)
    assert restarts == f"restart -t {STOP_GRACE_S} {COMPOSE_PROJECT}-redis-1\n"
    out, restarts = run_restart(tmp_path, True, "2026-12-07T04:56:40Z", None)
    assert restarts.startswith("restart "), "with no marker (compose up never ran) the restart happens"
    out, restarts = run_restart(tmp_path, False, "2026-12-07T04:56:40Z", 1796619390)
    assert restarts.startswith("restart "), "without compose up in the run, the restart is unconditional"
