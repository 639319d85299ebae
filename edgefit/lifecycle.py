"""The control-machine side of `edgefit backup`, `restore`, `rebuild` and `rollback`.

The host-side work lives in deploy files a user can run with pyinfra directly (backup.py,
restore.py, deploy.py); this module runs them as `pyinfra -y ...` subprocesses with live
progress and adds what only the control machine can do: copying backups back and checking
their checksums, the staging check and the confirmation, the rebuild's state file, and verify.
Hosts, keys and host data come from edgefit/remote.py's load_inventory, as for verify.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgefit import host_backup
from edgefit.host_backup import BackupError

REPO = Path(__file__).resolve().parent.parent
STATE_FILE = "rebuild-state.json"
PYINFRA_TIMEOUT_S = 3 * 3600  # one pyinfra run: a deploy from bare on a slow host, or a large backup
HEARTBEAT_S = 30
FETCH_MIB_PER_S = 1  # the slowest link a copy is allowed (bounds each file's copy)


class Refused(Exception):
    """Bad input or a host edgefit must not touch: one sentence, exit 2, nothing changed."""


class StepFailed(Exception):
    """A step failed on a host: one sentence, exit 1; what was kept and how to go on is said."""


# ---------------------------------------------------------------------------------------------
# Pure parts (unit-tested)

def staging_reason(name: str, groups, data) -> str | None:
    """Why a host counts as staging, or None when it does not."""
    if "staging" in (groups or []):
        return "in the staging group"
    if (data or {}).get("edgefit_role") == "staging":
        return 'edgefit_role = "staging"'
    return None


def not_staging_sentence(name: str, data) -> str:
    role = (data or {}).get("edgefit_role") or "production"
    return (f"{name} is not a staging host (it is in no `staging` group and edgefit_role is {role!r}); "
            "rebuild tears the stack down, so it runs only on staging hosts: set edgefit_role = \"staging\" "
            "in its host data if it is one. Nothing was changed")


def load_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise Refused(f"{path} is not readable JSON; look at it, and remove it to start the rebuild afresh") from None
    if not isinstance(state, dict) or not host_backup.STAMP.match(str(state.get("backup", ""))):
        raise Refused(f"{path} is not a rebuild state this edgefit wrote; remove it to start afresh")
    return state


def save_state(path: Path, state: dict) -> None:
    write_private(path, json.dumps(state, indent=1, sort_keys=True) + "\n")


def write_private(path: Path, text: str) -> None:
    """A 0600 file in 0700 directories, replaced atomically."""
    make_private_dir(path.parent)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def resume_decision(state: dict | None, host_dir: Path, fresh: bool) -> tuple[str | None, bool, str]:
    """What a rebuild does given the state file of an earlier, interrupted one.

    -> (backup to reuse or None for a new one, fresh, a sentence for the operator). A backup
    is reused only when it is complete on this machine; when the host was already torn down and
    that backup is gone, nothing can be done safely and Refused says what to do instead."""
    if state is None:
        return None, fresh, ""
    name, phase = state["backup"], state.get("phase", "backed-up")
    try:
        host_backup.check_backup(str(host_dir / name))
        good = True
    except BackupError:
        good = False
    if good:
        fresh_then = bool(state.get("fresh"))
        note = (f"resuming an interrupted rebuild (it stopped after: {phase}): reusing backup {host_dir / name} "
                f"of {state.get('at', '?')}; remove {host_dir / STATE_FILE} to take a new one instead"
                + ("" if fresh_then == fresh else f"; --fresh as in that run ({fresh_then})"))
        return name, fresh_then, note
    if phase == "backed-up":  # the host was not touched yet: a new backup is safe
        return None, fresh, f"the interrupted rebuild's backup {name} is not complete here; taking a new one"
    raise Refused(f"an interrupted rebuild tore the stack down after backup {name}, but {host_dir / name} is "
                  "missing or damaged here; restore another backup with `edgefit restore`, then remove "
                  f"{host_dir / STATE_FILE}")


# ---------------------------------------------------------------------------------------------
# pyinfra as a subprocess, with live progress

def pyinfra_binary() -> str:
    beside = Path(sys.executable).with_name("pyinfra")
    return str(beside) if beside.exists() else "pyinfra"


def run_pyinfra(inventory: str, deploy_file: str, hosts: list[str], data: dict[str, str] | None = None,
                label: str = "", timeout: float = PYINFRA_TIMEOUT_S) -> None:
    """`pyinfra -y INVENTORY FILE --limit HOST... --data K=V`, in the repository (its deploy
    files import roles/), every line shown as it comes, a heartbeat on long silences, bounded."""
    command = [pyinfra_binary(), "-y", str(Path(inventory).resolve()), str(REPO / deploy_file)]
    for name in hosts:
        command += ["--limit", name]
    for key, value in (data or {}).items():
        command += ["--data", f"{key}={value}"]
    label = label or deploy_file
    print(f"[{label}] {' '.join(shlex.quote(part) for part in command)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    tail: list[str] = []

    def follow() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=follow, daemon=True).start()
    last = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            process.kill()
            process.wait(timeout=30)
            raise StepFailed(f"{label} did not finish within {timeout:.0f}s and was stopped")
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            if time.monotonic() - last >= HEARTBEAT_S:
                print(f"[{label}] ... still running ({elapsed:.0f}s)", flush=True)
                last = time.monotonic()
            continue
        if line is None:
            break
        line = line.rstrip()
        if line.strip():
            tail = (tail + [line])[-20:]
            print(f"[{label}] {line}", flush=True)
            last = time.monotonic()
    code = process.wait(timeout=60)
    print(f"[{label}] finished in {time.monotonic() - started:.0f}s (exit {code})", flush=True)
    if code != 0:
        reason = next((line.strip() for line in reversed(tail) if "error" in line.lower()), f"exit {code}")
        raise StepFailed(f"{label} failed on {', '.join(hosts)}: {reason[:400]}")


SHOWN_BY_DEFAULT = ("init_password",)  # `edgefit secret` shows others only with --show-any


def secret_name(name: str, show_any: bool) -> str:
    """The field name `edgefit secret` may print (checked: a known secret, allowed); Refused otherwise."""
    from dataclasses import fields

    from edgefit.secrets import Secrets

    known = [f.name for f in fields(Secrets)]
    clean = name.strip().lower()
    if clean not in known:
        raise Refused(f"{name!r} is not an edgefit secret; one of: {', '.join(known)}")
    if clean not in SHOWN_BY_DEFAULT and not show_any:
        raise Refused(f"{clean} is not shown by default (only {', '.join(SHOWN_BY_DEFAULT)} is); "
                      "add --show-any if you really need it on this terminal")
    return clean


def secret_command(name: str) -> str:
    """Reads only the one line of the host's secrets file, so no other secret crosses the connection."""
    from edgefit.facts import SECRETS_PATH

    return f"grep -m1 -e {shlex.quote('^' + name.upper() + '=')} {shlex.quote(SECRETS_PATH)} || true"


def secret_from_lines(lines: list[str], name: str) -> str | None:
    prefix = name.upper() + "="
    for line in lines:
        if line.startswith(prefix) and line[len(prefix):].strip():
            return line[len(prefix):].strip()
    return None


def show_secret(inventory: str, limits: list[str] | None, name: str, show_any: bool, out=None) -> int:
    """`edgefit secret`: print one secret of one host (its value and nothing else) for its operator."""
    from edgefit.facts import SECRETS_PATH

    out = out or sys.stdout
    clean = secret_name(name, show_any)
    if not limits:
        raise Refused("give the one host with --limit HOST")
    state, hosts = open_inventory(inventory, limits)
    if len(hosts) != 1:
        raise Refused(f"--limit {' '.join(limits)} matches {len(hosts)} hosts; name exactly one")
    host = hosts[0]
    lines = host_command(state, host, secret_command(clean), timeout=30)
    value = secret_from_lines(lines, clean)
    if value is None:
        raise StepFailed(f"{host.name} has no {clean.upper()} in {SECRETS_PATH}; deploy it first "
                         "(the deploy generates it)")
    print(value, file=out, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Hosts through pyinfra's API (as verify connects)

def open_inventory(inventory: str, limits: list[str] | None):
    """-> (state, hosts); an inventory that cannot be loaded is Refused."""
    from edgefit import remote

    remote._quiet_logs()
    try:
        return remote.load_inventory(inventory, limits)
    except remote.VerifyUsageError as error:
        raise Refused(str(error)) from None


def _connected(state, host):
    import gevent
    from pyinfra.api.exceptions import ConnectError

    from edgefit import remote

    if not host.connected:
        try:
            with gevent.Timeout(remote.CONNECT_TIMEOUT + 5):
                host.connect(show_errors=False, raise_exceptions=True)
        except (ConnectError, gevent.Timeout) as error:
            raise StepFailed(f"{host.name} is unreachable: {error}") from None
    return remote.executor_arguments(state, host)


def host_command(state, host, command: str, timeout: int, stdin: str | None = None) -> list[str]:
    """Run a command on the host; -> its stdout lines, or StepFailed with its last stderr line."""
    arguments = _connected(state, host)
    extra = {"_timeout": timeout}
    if stdin is not None:
        extra["_stdin"] = stdin
    try:
        ok, output = host.run_shell_command(command, print_output=False, **{**arguments, **extra})
    except TimeoutError:
        raise StepFailed(f"a command on {host.name} did not finish within {timeout}s") from None
    for line in output.stdout_lines:
        if line.startswith("["):  # host_backup.py's progress lines
            print(f"    [{host.name}] {line}", flush=True)
    if not ok:
        last = (output.stderr_lines or ["no output"])[-1].strip()
        raise StepFailed(f"{host.name}: {last[:400]}")
    return output.stdout_lines


def fetch_backup(state, host, name: str, to_dir: Path) -> Path:
    """Copy the host's backup NAME to TO_DIR/HOST/NAME (0700/0600), checksums verified; it is
    copied under a temporary name first, so an interrupted copy never looks complete."""
    import gevent

    remote_dir = f"{host_backup.BACKUP_ROOT}/{name}"
    text = "\n".join(host_command(state, host, f"cat {remote_dir}/{host_backup.MANIFEST}", timeout=60))
    manifest = json.loads(text)
    host_dir = to_dir / host.name
    partial, final = host_dir / f".partial-{name}", host_dir / name
    make_private_dir(partial)
    write_private(partial / host_backup.MANIFEST, text + "\n")
    arguments = _connected(state, host)
    for file_name, entry in sorted(manifest["files"].items()):
        bound = 120 + entry["size"] / (FETCH_MIB_PER_S * 2**20)
        target = partial / file_name
        target.touch(mode=0o600)
        os.chmod(target, 0o600)
        started = time.monotonic()
        try:
            with gevent.Timeout(bound):
                copied = host.get_file(f"{remote_dir}/{file_name}", str(target), **arguments)
        except gevent.Timeout:
            raise StepFailed(f"copying {file_name} from {host.name} took more than {bound:.0f}s") from None
        if not copied:
            raise StepFailed(f"copying {file_name} from {host.name} failed")
        os.chmod(target, 0o600)
        print(f"    [{host.name}] copied {file_name} ({entry['size'] / 2**20:.1f} MiB, "
              f"{time.monotonic() - started:.0f}s)", flush=True)
    try:
        host_backup.check_backup(str(partial))
    except BackupError as error:
        raise StepFailed(f"the copy of {host.name}'s backup is not intact: {error}") from None
    if final.exists():
        raise StepFailed(f"{final} exists already")
    partial.rename(final)
    print(f"[backup] {host.name}: {final} (checksums verified)", flush=True)
    return final


def verify(inventory: str, hosts: list[str]) -> int:
    from edgefit.remote import VerifyOptions, run_verify

    return run_verify(inventory, hosts, VerifyOptions(window=30.0, interval=5.0))


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Refused("not asked at a terminal: pass --yes to go ahead without the question. Nothing was changed")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise Refused("not confirmed. Nothing was changed")


# ---------------------------------------------------------------------------------------------
# The three commands

def backup(inventory: str, limits: list[str] | None, to_dir: Path, keep: int) -> dict[str, Path]:
    state, hosts = open_inventory(inventory, limits)
    names = [host.name for host in hosts]
    stamp = host_backup.stamp_now()
    run_pyinfra(inventory, "backup.py", names, {"backup_name": stamp, "backup_keep": str(keep)}, label="backup")
    return {host.name: fetch_backup(state, host, stamp, to_dir) for host in hosts}


def check_local_backup(path: Path) -> dict:
    if not path.is_dir():
        raise Refused(f"--from {path} is not a directory (a backup is backups/HOST/STAMP)")
    try:
        return host_backup.check_backup(str(path))
    except BackupError as error:
        raise Refused(f"{error}") from None


def _host_by_host(inventory: str, names: list[str], question: str, yes: bool, steps) -> int:
    """Ask once, then per host, one at a time: each (deploy file, data) step, then verify. A failed
    step raises StepFailed: the next host is not touched."""
    confirm(question, yes)
    code = 0
    for name in names:
        for deploy_file, data in steps:
            run_pyinfra(inventory, deploy_file, [name], data, label=f"{deploy_file.removesuffix('.py')} {name}")
        code = max(code, verify(inventory, [name]))
    return code


def restore(inventory: str, limits: list[str] | None, source: Path, yes: bool, check_first: bool = True) -> int:
    manifest = check_local_backup(source) if check_first else host_backup.read_manifest(str(source))
    _, hosts = open_inventory(inventory, limits)
    names = [host.name for host in hosts]
    return _host_by_host(
        inventory, names,
        f"restore backup {manifest['name']} of {manifest.get('host')} onto {', '.join(names)}? Dify, its database and broker stop, "
        "their current data is kept aside under DATA_ROOT/.pre-restore-*, then the backup's data and secrets replace it",
        yes, [("restore.py", {"backup_from": str(source.resolve())}), ("deploy.py", None)])


def rollback(inventory: str, limits: list[str] | None, yes: bool) -> int:
    """Each host back to before its last upgrade (rollback.py), one host at a time, then verify.
    Every host's upgrade state is read first: one with nothing to roll back is Refused before any is touched."""
    from edgefit.upgrade import UpgradeRefused, rollback_target

    state, hosts = open_inventory(inventory, limits)
    for host in hosts:
        text = "\n".join(host_command(state, host, f"cat {host_backup.UPGRADE_STATE} 2>/dev/null || true", timeout=30))
        try:
            print(rollback_target(host.name, json.loads(text) if text.strip() else None), flush=True)
        except ValueError as error:  # UpgradeRefused, or a state file that is not JSON
            raise Refused(str(error) if isinstance(error, UpgradeRefused) else
                          f"{host.name}: {host_backup.UPGRADE_STATE} is not readable JSON; look at it") from None
    code = _host_by_host(
        inventory, [host.name for host in hosts],
        "roll back these upgrades? Data written since each was backed up is kept aside under "
        "DATA_ROOT/.pre-restore-*, not in the running stack", yes, [("rollback.py", None)])
    print("rolled back; the inventory still names the newer release: change it (edgefit_dify_version or "
          "edgefit_images) before the next deploy, which would upgrade again", flush=True)
    return code


def rebuild(inventory: str, limits: list[str] | None, to_dir: Path, fresh: bool, yes: bool) -> int:
    state, hosts = open_inventory(inventory, limits)
    from edgefit.settings import SettingsError, check_values

    reasons = {}
    for host in hosts:  # every host is checked before any is touched
        try:
            check_values(host.data)
        except SettingsError as error:
            raise Refused(f"{host.name}: {error}. Nothing was changed") from None
        reason = staging_reason(host.name, host.groups, host.data.dict())
        if reason is None:
            raise Refused(not_staging_sentence(host.name, host.data.dict()))
        reasons[host.name] = reason
    decisions = {}
    for host in hosts:
        host_dir = to_dir / host.name
        decisions[host.name] = resume_decision(load_state(host_dir / STATE_FILE), host_dir, fresh)

    for host in hosts:
        reuse, host_fresh, note = decisions[host.name]
        print(f"{host.name} ({reasons[host.name]}):" + (f"\n  {note}" if note else ""))
        print(f"  1. {'reuse backup ' + reuse if reuse else 'back up'} to {to_dir / host.name}/ (checksums verified)")
        print("  2. docker compose down; remove /opt/edgefit and /etc/edgefit/plan.json"
              + ("; then DELETE the data directories (--fresh)" if host_fresh else ""))
        print(f"  3. deploy from scratch: pyinfra -y {inventory} deploy.py --limit {host.name}")
        print("  4. " + ("no restore (--fresh): the stack starts empty" if host_fresh
                         else "restore the backup (data, broker Redis, secrets)"))
        print("  5. edgefit verify")
    confirm(f"rebuild {', '.join(host.name for host in hosts)}?", yes)

    code = 0
    for host in hosts:
        code = max(code, _rebuild_one(inventory, state, host, to_dir, decisions[host.name]))
    return code


def _rebuild_one(inventory: str, state, host, to_dir: Path, decision) -> int:
    reuse, fresh, _ = decision
    host_dir = to_dir / host.name
    state_path = host_dir / STATE_FILE
    began = time.monotonic()

    def phase(name: str, record: dict) -> None:
        save_state(state_path, {**record, "phase": name})
        print(f"[rebuild {host.name}] {name} ({time.monotonic() - began:.0f}s)", flush=True)

    if reuse:
        name = reuse
    else:
        name = host_backup.stamp_now()
        run_pyinfra(inventory, "backup.py", [host.name], {"backup_name": name}, label=f"backup {host.name}")
        fetch_backup(state, host, name, to_dir)
    record = {"backup": name, "fresh": fresh, "host": host.name,
              "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    phase("backed-up", record)
    manifest = host_backup.read_manifest(str(host_dir / name))
    data_root = manifest["data_root"]

    source = (REPO / "edgefit" / "host_backup.py").read_text()
    teardown = f"python3 - teardown --data-root {shlex.quote(data_root)}" + (" --fresh" if fresh else "")
    host_command(state, host, teardown, timeout=900, stdin=source)
    phase("torn-down", record)
    run_pyinfra(inventory, "deploy.py", [host.name], label=f"deploy {host.name}")
    phase("deployed", record)
    if not fresh:
        run_pyinfra(inventory, "restore.py", [host.name], {"backup_from": str((host_dir / name).resolve())},
                    label=f"restore {host.name}")
        run_pyinfra(inventory, "deploy.py", [host.name], label=f"deploy {host.name}")
        phase("restored", record)
    # Done with the backup: a re-run from here must not restore it again over newer data.
    state_path.unlink(missing_ok=True)
    code = verify(inventory, [host.name])
    print(f"[rebuild {host.name}] done in {time.monotonic() - began:.0f}s; backup {host_dir / name}; "
          f"verify exit {code}", flush=True)
    return code
