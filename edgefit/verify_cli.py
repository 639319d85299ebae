"""`edgefit verify INVENTORY`: the connection layer around sampler.py and verify.py.

Hosts, keys, host data and parallelism come from pyinfra itself, exactly as for the deploy:
pyinfra_cli's make_inventory (group_data/ beside the working directory and the inventory),
pyinfra's State/Config, one greenlet per host on the state's pool, SSH through pyinfra's
connector (paramiko underneath). Per host, in two commands over one connection:

1. the deploy's own facts (edgefit.facts.HostSizeFacts, BlockDevice of the data disk) and the
   secrets file, so the plan is recomputed as the deploy made it (read_settings(host.data),
   size override) and the stack rendered again; the secrets stay in memory, never printed;
2. sampler.py, sent on stdin to `python3 -`, which watches the stack for --window seconds and
   prints one JSON document.

verify.evaluate() then judges the samples. Every wait is bounded: the connection by
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
from edgefit import verify
from edgefit.facts import SECRETS_PATH, BlockDevice, HostSizeFacts, SecretsFile
from edgefit.plan import HostSize, PlanError, make_plan
from edgefit.render import STACK_DIR, render_stack
from edgefit.safe_write import WriteError, check_file, write_atomic
from edgefit.secrets import Secrets, SecretsError
from edgefit.settings import SettingsError, read_settings

SEPARATOR = "@@EDGEFIT-VERIFY@@"
NO_PYTHON = "@@EDGEFIT-NO-PYTHON3@@"
CONNECT_TIMEOUT = 10
PREPARE_TIMEOUT = 20
SAMPLER_SLACK = 20  # seconds beyond the window the sampler may take (its own bound is ~8 s)


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

def _executor_arguments(state, host) -> dict:
    """sudo, su, shell and the like from host data, as pyinfra applies them to facts."""
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments

    arguments, _ = pop_global_arguments(state, host, {})
    return {key: value for key, value in arguments.items() if key in CONNECTOR_ARGUMENT_KEYS}


def prepare_command(data_disk: str | None) -> str:
    parts = [HostSizeFacts().command(),
             BlockDevice().command(data_disk) if data_disk else "true",
             SecretsFile().command()]
    return f"; echo {SEPARATOR}; ".join(parts)


def parse_prepare_output(lines: list[str], data_disk: str | None) -> tuple[dict, dict | None, str | None]:
    """-> (size facts, block device or None, secrets text or None). Never logs the secrets."""
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.strip() == SEPARATOR:
            sections.append([])
        else:
            sections[-1].append(line)
    if len(sections) != 3:
        raise ValueError("unexpected output from the facts command")
    facts = HostSizeFacts().process(sections[0])
    device = BlockDevice().process(sections[1]) if data_disk else None
    secrets = SecretsFile().process(sections[2])
    return facts, device, secrets


def host_plan(settings, facts: dict, device: dict | None):
    """The plan exactly as roles/facts.py makes it for the deploy."""
    disk_gib = facts["root_size_gib"]
    if settings.data_disk and device and device.get("exists"):
        disk_gib = device["size_gib"]
    cpus, memory = facts["cpus"], facts["memory_mib"]
    if settings.size_override:
        cpus, memory = settings.size_override
    return make_plan(HostSize(cpus, memory, disk_gib), settings.options)


def expected_for(plan, secrets_text: str | None, host_name: str) -> dict:
    """Expectations with the rendered files' hashes (None with a reason when the host's secrets
    cannot be read: the file comparison is then skipped, nothing else)."""
    files_error = None
    try:
        if secrets_text is None:
            raise SecretsError(f"{SECRETS_PATH} is missing on the host")
        secrets = Secrets.from_env(secrets_text, f"{host_name}:{SECRETS_PATH}")
        rendered = render_stack(plan, secrets)
    except SecretsError as error:
        files_error = str(error)
        rendered = None
    expected = verify.expectations(plan, rendered, stack_dir=STACK_DIR, files_error=files_error)
    if rendered is None:  # still ask for the paths, so missing files are named
        placeholder = render_stack(plan, Secrets.generate())
        expected["paths"] = [verify.stack_file_destination(f.path, STACK_DIR) for f in placeholder]
    return expected


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
    bound = CONNECT_TIMEOUT + PREPARE_TIMEOUT + options.window + SAMPLER_SLACK + 5
    try:
        with gevent.Timeout(bound):
            report = _check_host(state, host, options)
    except gevent.Timeout:
        report = verify.error_report(name, f"{name} did not finish within {bound:g}s")
    except Exception as error:  # one sentence per host, never a traceback
        report = verify.error_report(name, f"{type(error).__name__}: {error}")
    report["elapsed_s"] = round(time.monotonic() - began, 2)
    return report


def _check_host(state, host, options: VerifyOptions) -> dict:
    from pyinfra.api.exceptions import ConnectError

    name = host.name
    try:
        settings = read_settings(host.data)
    except SettingsError as error:
        return verify.error_report(name, f"inventory data for {name}: {error}")

    try:
        host.connect(show_errors=False, raise_exceptions=True)
    except ConnectError as error:
        reason = error.args[0] if error.args else "connection failed"
        return verify.error_report(name, f"{name} is unreachable: {reason}")
    arguments = _executor_arguments(state, host)

    ok, output = host.run_shell_command(prepare_command(settings.data_disk), print_output=False,
                                        **{**arguments, "_timeout": PREPARE_TIMEOUT})
    try:
        facts, device, secrets_text = parse_prepare_output(output.stdout_lines, settings.data_disk)
    except (ValueError, KeyError) as error:
        last = (output.stderr_lines or ["no output"])[-1]
        return verify.error_report(name, f"reading {name}'s facts failed ({error}; {last})")
    if settings.data_disk and not (device or {}).get("exists"):
        return verify.error_report(name, f"data disk {settings.data_disk} does not exist on {name}")
    try:
        plan = host_plan(settings, facts, device)
    except PlanError as error:
        return verify.error_report(name, f"no plan for {name}: {str(error).rstrip('.')}")
    expected = expected_for(plan, secrets_text, name)
    del secrets_text
    paths = sorted(expected["files"] or {}) or expected.get("paths", [])

    source = Path(sampler_module.__file__).read_text()
    try:
        ok, output = host.run_shell_command(
            sampler_command(options, paths), print_output=False,
            **{**arguments, "_stdin": source, "_timeout": int(options.window + SAMPLER_SLACK)})
    except TimeoutError:
        return verify.error_report(name, f"the sampler on {name} did not finish within "
                                         f"{options.window + SAMPLER_SLACK:g}s")
    stdout = [line for line in output.stdout_lines if line.strip()]
    if stdout and stdout[-1].strip() == NO_PYTHON:
        return verify.error_report(name, f"python3 is not installed on {name} (the sampler needs it)")
    try:
        samples = json.loads(stdout[-1])
    except (IndexError, ValueError):
        last = (output.stderr_lines or ["no output"])[-1]
        return verify.error_report(name, f"the sampler on {name} printed no result ({last.strip()[:200]})")
    report = verify.evaluate(samples, expected, host=name, strict=options.strict)
    if expected.get("files") is None:
        missing = [path for path in paths if (samples.get("files") or {}).get(path) is None]
        if missing and report["verdict"] != "error":
            report["findings"].append({"severity": "info", "kind": "config_missing", "service": None,
                                       "message": f"missing on the host: {', '.join(missing)}"})
    return report


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
    bound = CONNECT_TIMEOUT + PREPARE_TIMEOUT + options.window + SAMPLER_SLACK + 15
    gevent.joinall(greenlets, timeout=bound)
    reports = []
    for host, greenlet in zip(hosts, greenlets):
        if greenlet.ready() and greenlet.successful():
            reports.append(greenlet.value)
        else:
            greenlet.kill(block=False)
            reports.append(verify.error_report(host.name, f"{host.name} did not finish within {bound:g}s"))
    for host in hosts:
        if host.connected:
            try:
                with gevent.Timeout(5):
                    host.disconnect()
            except (gevent.Timeout, Exception):  # closing is best effort
                pass

    code, headline = verify.overall(reports)
    elapsed = round(time.monotonic() - started, 2)
    print(headline, file=out)
    for report in reports:
        print("", file=out)
        print(verify.format_report(report), file=out)
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
