"""The stack's secrets: generated once, kept in a 0600 env file, never printed.

On a deployed host they live in /etc/edgefit/secrets.env, made by the secrets role on the host
itself; `edgefit render` makes (or reuses) one beside its output.
"""

from __future__ import annotations

import os
import secrets as random
from dataclasses import dataclass, fields
from pathlib import Path

from edgefit.checks import SECRET_MIN_LENGTH as MIN_LENGTH  # noqa: F401  (re-exported)
from edgefit.checks import UPSTREAM_DEFAULTS  # noqa: F401  (re-exported)
from edgefit.checks import CheckError, secret_value
from edgefit.safe_write import write_atomic


# Random bytes per secret (URL-safe base64: 4 characters per 3 bytes). 32 bytes = 43 characters;
# INIT_PASSWORD gets 18 bytes = 24 characters (144 bits), because Dify refuses an init password
# longer than INIT_PASSWORD_MAX_LENGTH (api/controllers/console/init_validate.py: max_length=30).
RANDOM_BYTES = 32
INIT_PASSWORD_BYTES = 18
INIT_PASSWORD_MAX_LENGTH = 30


def random_bytes(name: str) -> int:
    """How many random bytes the secret `name` (a field name, any case) is made of."""
    return INIT_PASSWORD_BYTES if name.lower() == "init_password" else RANDOM_BYTES


class SecretsError(ValueError):
    """A secrets file that is missing a value, or holds a weak or upstream-default one."""


@dataclass(frozen=True)
class Secrets:
    secret_key: str
    db_password: str  # Postgres' superuser (postgres): admin, backups, verify; never given to Dify
    db_app_password: str  # the role Dify's api, worker and beat log in as (edgefit.render DB_APP_ROLE)
    db_plugin_password: str  # the plugin daemon's own role, which owns only its database
    redis_password: str
    redis_broker_password: str
    pgbouncer_admin_password: str
    plugin_daemon_key: str
    plugin_inner_api_key: str
    sandbox_api_key: str
    vector_store_api_key: str  # weaviate or qdrant, when chosen
    # Dify's INIT_PASSWORD: /install (POST /console/api/init, then /console/api/setup) asks for it
    # before anyone can make the admin account. Dify takes at most 30 characters there.
    init_password: str

    def __repr__(self) -> str:  # never let a traceback or a debug print show a value
        return "Secrets(<hidden>)"

    @classmethod
    def generate(cls) -> Secrets:
        # token_urlsafe: no characters that need quoting in .env, URLs or pgbouncer's userlist
        return cls(**{f.name: random.token_urlsafe(random_bytes(f.name)) for f in fields(cls)})

    def to_env(self) -> str:
        return "".join(f"{f.name.upper()}={getattr(self, f.name)}\n" for f in fields(self))

    @classmethod
    def from_env(cls, text: str, source: str = "secrets") -> Secrets:
        values = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip().lower()] = value.strip()
        missing = [f.name.upper() for f in fields(cls) if not values.get(f.name)]
        if missing:
            raise SecretsError(f"{source}: missing {', '.join(missing)}")
        if len(values["init_password"]) > INIT_PASSWORD_MAX_LENGTH:
            raise SecretsError(f"{source}: INIT_PASSWORD must be at most {INIT_PASSWORD_MAX_LENGTH} characters "
                               "(Dify refuses a longer one at /install)")
        try:  # length, URL-safe characters, not upstream's defaults; messages never show a value
            return cls(**{f.name: secret_value(f.name.upper(), values[f.name]) for f in fields(cls)})
        except CheckError as error:
            raise SecretsError(f"{source}: {error}") from None


def load_or_create(path: Path) -> Secrets:
    """Reuse the secrets at path; make them (mode 0600, whole, never over an existing file) when absent."""
    if os.path.lexists(path):
        if path.is_dir():
            raise SecretsError(f"secrets file {path} is a directory; give the env file itself")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = (error.strerror or str(error)).lower() if isinstance(error, OSError) else "not UTF-8 text"
            raise SecretsError(f"secrets file {path} cannot be read ({reason})") from None
        return Secrets.from_env(text, str(path))
    created = Secrets.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, created.to_env(), 0o600, replace=False)
    return created
