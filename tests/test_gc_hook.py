"""The GC hook: the rendered sitecustomize.py makes PYTHON_GC_THRESHOLD real (issue 2).

CPython reads no environment variable for its GC thresholds (python/cpython#124742 was closed
unmerged), so the compose file's PYTHON_GC_THRESHOLD does nothing unless the mounted
sitecustomize.py applies it. Here a real Python process is started the way the api container
starts one: with the api service's environment as Docker Compose resolves it, PYTHONPATH
pointing at the directory the compose file mounts there (conf/python of the rendered stack).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefit.plan import PRESETS
from edgefit.render import render_stack, write_stack
from edgefit.secrets import Secrets
from servers_helpers import base_env, compose_binary, preset_plan

PROBE = "import gc, json; print(json.dumps(gc.get_threshold())); print('still running')"
HOOK_MESSAGE = "edgefit sitecustomize: ignoring PYTHON_GC_THRESHOLD"


def api_environment(preset: str, stack_dir: Path):
    """(plan, the api container's environment on this machine).

    The environment is the api service's as Compose resolves it (.env and the service's own
    variables); PYTHONPATH, a path inside the container, becomes the host directory that the
    compose file bind-mounts at that path.
    """
    plan = preset_plan(preset)
    write_stack(render_stack(plan, Secrets.generate()), stack_dir)
    result = subprocess.run([compose_binary(), "--project-directory", str(stack_dir),
                             "-f", str(stack_dir / "docker-compose.yml"), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env=base_env(stack_dir))
    assert result.returncode == 0, result.stderr
    api = json.loads(result.stdout)["services"]["api"]
    environment = {key: value for key, value in api["environment"].items() if value is not None}
    container_path = environment["PYTHONPATH"]
    mounts = {mount["target"]: mount["source"] for mount in api.get("volumes", [])}
    assert container_path in mounts, f"nothing is mounted at the api's PYTHONPATH {container_path}"
    host_path = Path(mounts[container_path])
    assert (host_path / "sitecustomize.py").is_file(), f"no sitecustomize.py in {host_path}"
    environment["PYTHONPATH"] = str(host_path)
    return plan, environment


def run_python(environment: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    env = {**environment, "PATH": base_env(home)["PATH"], "HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, f"python exited with {result.returncode}:\n{result.stderr}"
    assert result.stdout.splitlines()[-1] == "still running"
    return result


def threshold(result: subprocess.CompletedProcess) -> tuple[int, ...]:
    return tuple(json.loads(result.stdout.splitlines()[0]))


@pytest.fixture(scope="module")
def default_threshold(tmp_path_factory) -> tuple[int, ...]:
    """This interpreter's own default: no hook, no variable."""
    return threshold(run_python({}, tmp_path_factory.mktemp("home")))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hook_applies_the_planned_threshold(preset, tmp_path):
    plan, environment = api_environment(preset, tmp_path / "stack")
    assert environment["PYTHON_GC_THRESHOLD"] == ",".join(map(str, plan.dify.gc_threshold))
    assert threshold(run_python(environment, tmp_path)) == plan.dify.gc_threshold


def test_hook_changes_the_interpreters_default(tmp_path, default_threshold):
    """Where the plan differs from the default, the process runs with the plan's value, so the
    equality above is the hook's doing and not the default's."""
    differing = [preset for preset in PRESETS
                 if preset_plan(preset).dify.gc_threshold != default_threshold]
    assert differing, f"every preset plans this interpreter's default {default_threshold}"
    plan, environment = api_environment(differing[0], tmp_path / "stack")
    applied = threshold(run_python(environment, tmp_path))
    assert applied == plan.dify.gc_threshold != default_threshold


def test_variable_alone_does_nothing(tmp_path, default_threshold):
    """The bug being fixed: without the hook on PYTHONPATH the variable is ignored."""
    differing = [preset for preset in PRESETS
                 if preset_plan(preset).dify.gc_threshold != default_threshold]
    assert differing
    plan, environment = api_environment(differing[0], tmp_path / "stack")
    del environment["PYTHONPATH"]
    result = run_python(environment, tmp_path)
    assert environment["PYTHON_GC_THRESHOLD"] == ",".join(map(str, plan.dify.gc_threshold))
    assert threshold(result) == default_threshold != plan.dify.gc_threshold
    assert HOOK_MESSAGE not in result.stderr


@pytest.mark.parametrize("malformed", ["abc", "700,10,10,10", "-1,10,10", "700;10;10", "1e3,10,10",
                                       "700,,10", ","])
def test_malformed_value_is_ignored_with_a_message(malformed, tmp_path, default_threshold):
    _, environment = api_environment("2C4G", tmp_path / "stack")
    environment["PYTHON_GC_THRESHOLD"] = malformed
    result = run_python(environment, tmp_path)  # exit code 0 and the program ran on
    assert threshold(result) == default_threshold
    assert HOOK_MESSAGE in result.stderr
    assert repr(malformed) in result.stderr
    assert "Traceback" not in result.stderr
