"""Role "secrets": the stack's secrets, generated on the host once and never again.

/etc/edgefit/secrets.env (0600, root) is made on the host from its own /dev/urandom the first
time, and only keys that are missing are ever added: a re-run never regenerates a secret (that
would lock Dify out of its own database). Values are never printed or passed to an operation
that could show them: the file is read with a plain command whose input and output pyinfra does
not print (a fact's output is printed with --debug), under the same sudo/su arguments pyinfra
gives the host's operations. Every rendered file depends on them, so they are made while pyinfra
prepares the deploy, after every input check of the facts role has passed; under --dry they
are not made and throwaway values stand in.

Secrets follow the data: when the secrets file is missing but the data root (or the data disk)
already holds a Postgres cluster, new secrets would open neither that cluster nor the
credentials Dify encrypted with its SECRET_KEY, so the deploy refuses before writing anything
and says how to bring the old ones back.
"""

import shlex
import sys
from dataclasses import fields

from pyinfra import host, state
from pyinfra.api import DeployError, deploy

from edgefit.facts import SECRETS_PATH, PostgresCluster, parse_key_values
from edgefit.secrets import Secrets, SecretsError, random_bytes
from edgefit.settings import read_settings

SECRET_NAMES = [f.name.upper() for f in fields(Secrets)]
ABSENT = "@@EDGEFIT-NO-SECRETS-FILE@@"


def read_command() -> str:
    path = shlex.quote(SECRETS_PATH)
    return f"test -s {path} && cat {path} || echo {ABSENT}"


def parse_read(lines: list[str]) -> str | None:
    """The secrets file's text, or None when the host has none yet."""
    text = "\n".join(lines)
    return None if text.strip() == ABSENT else text + "\n"


def _run_quietly(command: str):
    """-> (ok, output): nothing of the command or its output is printed, whatever the verbosity."""
    from edgefit.remote import executor_arguments

    return host.run_shell_command(command, print_output=False, print_input=False,
                                  **executor_arguments(state, host))


def _read_secrets_file() -> str | None:
    ok, output = _run_quietly(read_command())
    if not ok:
        raise DeployError(f"{host.name}: could not read {SECRETS_PATH}; check that the SSH user is root or "
                          "has sudo (_sudo = True). Nothing was changed.")
    return parse_read(output.stdout_lines)


def _generate_missing_command() -> str:
    # Random bytes, URL-safe base64: no character needs quoting in .env, URLs or userlist.
    def one(name: str) -> str:
        return f"$(head -c {random_bytes(name)} /dev/urandom | base64 -w0 | tr '+/' '-_' | tr -d '=')"
    path = shlex.quote(SECRETS_PATH)
    adds = "; ".join(
        f"grep -q '^{name}=' {path} || echo \"{name}={one(name)}\" >> {path}" for name in SECRET_NAMES
    )
    return f"set -e; umask 077; mkdir -p /etc/edgefit; touch {path}; chmod 600 {path}; {adds}"


def refusal(host_name: str, secrets_text: str | None, cluster: str | None) -> str | None:
    """The sentence that stops the deploy when it would make new secrets over existing data."""
    if secrets_text is not None or cluster is None:
        return None
    return (f"{host_name}: {SECRETS_PATH} is missing but {cluster} shows an existing Postgres cluster, which new "
            "secrets could not open (nor decrypt the credentials Dify stored); copy the secrets.env of this "
            f"host's backup (edgefit backup keeps it in backups/{host_name}/STAMP/secrets.env) back to "
            f"{SECRETS_PATH} with mode 0600 and re-run the deploy, or move the data aside to start empty "
            "and then `edgefit restore`. Nothing was changed")


def _dry_run() -> bool:
    return "--dry" in sys.argv


@deploy("Secrets")
def ensure_secrets() -> Secrets:
    text = _read_secrets_file()
    present = parse_key_values((text or "").splitlines())
    missing = [name for name in SECRET_NAMES if not present.get(name)]
    if text is None:
        options = read_settings(host.data).options  # already checked by check_and_plan
        cluster = host.get_fact(PostgresCluster, data_root=options.data_root, device=options.data_disk)
        problem = refusal(host.name, text, cluster)
        if problem:
            raise DeployError(problem)
    if missing:
        if _dry_run():
            host.noop(f"would generate {len(missing)} secret(s) in {SECRETS_PATH} on the host")
            # Throwaway values for the missing ones only: the rest of the dry run shows just what they change.
            throwaway = Secrets.generate()
            text = (text or "") + "".join(f"{name}={getattr(throwaway, name.lower())}\n" for name in missing)
        else:
            ok, _ = _run_quietly(_generate_missing_command())
            if not ok:
                raise DeployError(f"{host.name}: could not write {SECRETS_PATH}; check that the SSH user "
                                  "is root or has sudo (_sudo = True). Nothing else was changed.")
            text = _read_secrets_file()
            host.noop(f"generated {len(missing)} secret(s) in {SECRETS_PATH} (0600); values are not shown")
    try:
        return Secrets.from_env(text, f"{host.name}:{SECRETS_PATH}")
    except SecretsError as error:
        raise DeployError(f"{error}. Fix or remove the offending line on the host; edgefit adds "
                          "missing keys but never overwrites one.") from None
