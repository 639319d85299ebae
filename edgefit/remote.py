"""The remote layer of `edgefit verify INVENTORY`: inventory, connections, and the two commands.

Hosts, keys, host data and parallelism come from pyinfra itself, exactly as for the deploy:
pyinfra_cli's make_inventory (group_data/ beside the working directory and the inventory),
pyinfra's State/Config, one greenlet per host on the state's pool, SSH through pyinfra's
connector (paramiko underneath). Per host, in two commands over one connection:

1. the plan of record the last deploy wrote (/etc/edgefit/plan.json: limits, settings and the
   sha256 of every file it placed; no secret crosses the connection);
2. sampler.py, sent on stdin to `python3 -`, which watches the stack for --window seconds,
   hashes the recorded files and prints one JSON document.

judge.evaluate() then judges the samples against the record, and names any change of the host
(memory, cores) since the deploy as a warning. Every wait is bounded: the connection by
CONNECT_TIMEOUT, each command by pyinfra's _timeout, each host by a gevent.Timeout.
"""

from __future__ import annotations

# pyinfra_cli monkey-patches the standard library for gevent on import, as the `pyinfra`
# command does; it must come before anything opens a socket.
import pyinfra_cli  # noqa: F401  isort: skip

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gevent

from edgefit import sampler as sampler_module
from edgefit import judge
from edgefit import report as reporting
from edgefit.render import PLAN_OF_RECORD, PLAN_OF_RECORD_SCHEMA
from edgefit.safe_write import WriteError, check_file, write_atomic

NO_RECORD = "@@EDGEFIT-NO-PLAN-OF-RECORD@@"
NO_PYTHON = "@@EDGEFIT-NO-PYTHON3@@"
CONNECT_TIMEOUT = 10
PREPARE_TIMEOUT = 20
SAMPLER_SLACK = 10  # seconds for python3's start and the JSON's way back, beyond the sampler's own bound


def sampler_bound(window: float) -> float:
    """The most one sampler run over SSH may take (sampler.run_bound: the window plus the longest
    exec timeout it may choose on a slow host), plus the way there and back."""
    return sampler_module.run_bound(window) + SAMPLER_SLACK


class VerifyUsageError(Exception):
    """Bad arguments or an inventory that cannot be loaded: exit 2 with this sentence."""


@dataclass(frozen=True)
class VerifyOptions:
    window: float = 30.0
    interval: float = 5.0
    events_since: float = 3600.0
    strict: bool = False


# ---------------------------------------------------------------------------------------------
# Inventory, through pyinfra's own loader

def _quiet_logs() -> None:
    """pyinfra and paramiko log connection errors themselves; verify says it in one sentence."""
    if os.environ.get("EDGEFIT_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
        return
    for name in ("pyinfra", "pyinfra_cli", "paramiko"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def load_inventory(inventory: str, limits: list[str] | None):
    """-> (state, hosts to check), the way `pyinfra INVENTORY ...` loads them."""
    from pyinfra.api import Config, State
    from pyinfra.api.exceptions import NoGroupError
    from pyinfra.context import ctx_config, ctx_inventory, ctx_state
    from pyinfra_cli.exceptions import CliError
    from pyinfra_cli.inventory import make_inventory

    if inventory.endswith(".py") and not Path(inventory).is_file():
        raise VerifyUsageError(f"inventory {inventory} does not exist")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as pyinfra does: inventories may import from the working directory
        sys.path.append(cwd)
    state = State(check_for_changes=False)
    state.cwd = cwd
    ctx_state.set(state)
    config = Config()
    config.CONNECT_TIMEOUT = CONNECT_TIMEOUT
    ctx_config.set(config)
    try:
        loaded = make_inventory(inventory, cwd=cwd)
    except SystemExit as error:  # an inventory may refuse itself (inventory/vagrant.py without hosts)
        raise VerifyUsageError(f"inventory {inventory}: {error}") from None
    except CliError as error:
        raise VerifyUsageError(f"inventory {inventory}: {error.message if hasattr(error, 'message') else error}") from None
    except Exception as error:  # the inventory is Python: anything can go wrong in it
        cause = getattr(error, "exception", error)  # pyinfra's UnexpectedExternalError wraps it; its str() fails
        raise VerifyUsageError(f"inventory {inventory} could not be loaded: {type(cause).__name__}: {cause}") from None
    ctx_inventory.set(loaded)
    hosts = list(loaded)
    if limits:
        from fnmatch import fnmatch
        chosen = []
        for pattern in limits:
            try:
                matched = loaded.get_group(pattern)
            except NoGroupError:
                matched = [host for host in loaded if fnmatch(host.name, pattern)]
            chosen += [host for host in matched if host not in chosen]
        if not chosen:
            raise VerifyUsageError(f"no host of {inventory} matches --limit {' '.join(limits)}")
        hosts = [host for host in hosts if host in chosen]
    if not hosts:
        raise VerifyUsageError(f"inventory {inventory} holds no hosts")
    state.init(loaded, config, initial_limit=hosts)
    return state, hosts


# ---------------------------------------------------------------------------------------------
# One host

def executor_arguments(state, host) -> dict:
    """sudo, su, shell and the like from host data, as pyinfra applies them to facts and operations."""
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments

    arguments, _ = pop_global_arguments(state, host, {})
    return {key: value for key, value in arguments.items() if key in CONNECTOR_ARGUMENT_KEYS}


def record_command() -> str:
    path = shlex.quote(PLAN_OF_RECORD)
    return f"test -s {path} && cat {path} || echo {NO_RECORD}"


def parse_record(lines: list[str]) -> dict | None:
    """-> the expectations of the plan of record, or None when the host has none."""
    text = "\n".join(lines).strip()
    if text == NO_RECORD:
        return None
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("schema") != PLAN_OF_RECORD_SCHEMA or "expect" not in record:
        raise ValueError(f"{PLAN_OF_RECORD} is not a plan of record this edgefit reads (schema "
                         f"{record.get('schema') if isinstance(record, dict) else '?'}); re-deploy")
    return record["expect"]


def sampler_command(options: VerifyOptions, paths: list[str]) -> str:
    arguments = ["--window", f"{options.window:g}", "--interval", f"{options.interval:g}",
                 "--events-since", f"{options.events_since:g}"]
    for path in paths:
        arguments += ["--hash", path]
    quoted = " ".join(shlex.quote(argument) for argument in arguments)
    return f"command -v python3 >/dev/null || {{ echo {NO_PYTHON}; exit 3; }}; exec python3 - {quoted}"


def check_host(state, host, options: VerifyOptions) -> dict:
    """Everything for one host; returns its report and never raises."""
    name = host.name
    began = time.monotonic()
    bound = CONNECT_TIMEOUT + PREPARE_TIMEOUT + sampler_bound(options.window) + 5
    try:
        with gevent.Timeout(bound):
            report = _check_host(state, host, options)
    except gevent.Timeout:
        report = judge.error_report(name, f"{name} did not finish within {bound:g}s")
    except Exception as error:  # one sentence per host, never a traceback
        report = judge.error_report(name, f"{type(error).__name__}: {error}")
    report["elapsed_s"] = round(time.monotonic() - began, 2)
    return report


def _check_host(state, host, options: VerifyOptions) -> dict:
    from pyinfra.api.exceptions import ConnectError

    name = host.name
    try:
        host.connect(show_errors=False, raise_exceptions=True)
    except ConnectError as error:
        reason = error.args[0] if error.args else "connection failed"
        return judge.error_report(name, f"{name} is unreachable: {reason}")
    arguments = executor_arguments(state, host)

    ok, output = host.run_shell_command(record_command(), print_output=False,
                                        **{**arguments, "_timeout": PREPARE_TIMEOUT})
    try:
        expected = parse_record(output.stdout_lines) if ok else None
    except ValueError as error:
        return judge.error_report(name, f"{name}: {error}")
    if not ok:
        last = (output.stderr_lines or ["no output"])[-1]
        return judge.error_report(name, f"reading {name}'s plan of record failed ({last.strip()[:200]})")
    if expected is None:
        return judge.error_report(name, f"{name} has no plan of record ({PLAN_OF_RECORD}): no stack was "
                                         "deployed there; run the deploy first")
    paths = sorted(expected["files"])

    source = Path(sampler_module.__file__).read_text()
    try:
        ok, output = host.run_shell_command(
            sampler_command(options, paths), print_output=False,
            **{**arguments, "_stdin": source, "_timeout": int(sampler_bound(options.window))})
    except TimeoutError:
        return judge.error_report(name, f"the sampler on {name} did not finish within "
                                         f"{int(sampler_bound(options.window))}s")
    stdout = [line for line in output.stdout_lines if line.strip()]
    if stdout and stdout[-1].strip() == NO_PYTHON:
        return judge.error_report(name, f"python3 is not installed on {name} (the sampler needs it)")
    try:
        samples = json.loads(stdout[-1])
    except (IndexError, ValueError):
        last = (output.stderr_lines or ["no output"])[-1]
        return judge.error_report(name, f"the sampler on {name} printed no result ({last.strip()[:200]})")
    return judge.evaluate(samples, expected, host=name, strict=options.strict)


# ---------------------------------------------------------------------------------------------
# All hosts

def run_verify(inventory: str, limits: list[str] | None, options: VerifyOptions,
               json_file: str | None = None, out=None) -> int:
    out = out or sys.stdout
    if json_file:  # before the window: a report that cannot be written is known now, not after it
        try:
            check_file(json_file, "--json")
        except WriteError as error:
            raise VerifyUsageError(str(error)) from None
    _quiet_logs()
    started = time.monotonic()
    state, hosts = load_inventory(inventory, limits)
    greenlets = [state.pool.spawn(check_host, state, host, options) for host in hosts]
    bound = CONNECT_TIMEOUT + PREPARE_TIMEOUT + sampler_bound(options.window) + 15
    gevent.joinall(greenlets, timeout=bound)
    reports = []
    for host, greenlet in zip(hosts, greenlets):
        if greenlet.ready() and greenlet.successful():
            reports.append(greenlet.value)
        else:
            greenlet.kill(block=False)
            reports.append(judge.error_report(host.name, f"{host.name} did not finish within {bound:g}s"))
    for host in hosts:
        if host.connected:
            try:
                with gevent.Timeout(5):
                    host.disconnect()
            except (gevent.Timeout, Exception):  # closing is best effort
                pass

    code, headline = reporting.overall(reports)
    elapsed = round(time.monotonic() - started, 2)
    print(headline, file=out)
    for report in reports:
        print("", file=out)
        print(reporting.format_report(report), file=out)
    if json_file:
        document = {"verdict": {0: "ok", 1: "fail", 2: "error"}[code], "exit_code": code, "summary": headline,
                    "window_s": options.window, "elapsed_s": elapsed, "hosts": reports}
        try:
            write_atomic(json_file, json.dumps(document, indent=2) + "\n")
        except OSError as error:  # changed since the check: say so; "over budget" (1) still wins
            print(f"edgefit: error: --json {json_file} was not written ({(error.strerror or str(error)).lower()})",
                  file=sys.stderr)
            return code if code == 1 else 2
    return code
