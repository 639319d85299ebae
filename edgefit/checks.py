"""Pure checks of single values before they reach a shell, a config file or a host.

Each check takes a value and returns it normalised, or raises CheckError with one sentence that
says what is wrong and what is accepted. Standard library only, no I/O: the settings table and
the command line call them; quoting where a value is used stays the caller's job.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from urllib.parse import urlsplit

from edgefit.units import SizeError, parse_mib


class CheckError(ValueError):
    """A value that must not be used; the message is one sentence naming the fix."""


# Characters a path may hold: nothing a shell, fstab, a systemd unit or YAML reads specially
# (no space, quote, '$', '`', ';', '%', ':', '#', newline).
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")  # used with fullmatch
MAX_PATH_LENGTH = 255

# Trees that belong to the system: a data root may be neither one of them nor inside one.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found",
                "/proc", "/root", "/run", "/sbin", "/snap", "/sys", "/tmp", "/usr")
# Top-level directories that other things share: refused themselves, accepted below them
# (/srv/dify, /opt/dify, /mnt/x). /var is the exception, see data_root.
SHARED_TOP = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/var", "/data")
# /var/lib/<name> is a package's own state directory (FHS); these names are the system's.
SYSTEM_VAR_LIB = ("docker", "containerd", "dpkg", "apt", "systemd", "ucf", "polkit-1", "sudo", "snapd",
                  "private", "misc", "dhcp", "pam", "ntp", "chrony", "lxc", "lxd", "libvirt", "kubelet",
                  "rancher", "cni", "postgresql", "mysql", "redis", "nginx")


def _shown(value: object) -> str:
    """A value as it may appear in a one-line message: repr (escapes newlines), bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _string(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise CheckError(f"{what} must be a string, got {type(value).__name__} {_shown(value)}")
    return value


def _safe_absolute_path(what: str, path: object, example: str) -> str:
    """The shared part of data_root and device_path: safe characters, no '..', normalised."""
    path = _string(what, path)
    if len(path) > MAX_PATH_LENGTH:
        raise CheckError(f"{what} is {len(path)} characters long; at most {MAX_PATH_LENGTH} are accepted")
    if not SAFE_PATH.fullmatch(path):
        raise CheckError(f"{what} {_shown(path)} must be an absolute path of letters, digits and . _ / - "
                         f"only, e.g. {example}")
    if ".." in path.split("/"):
        raise CheckError(f"{what} {_shown(path)} must not contain '..'; give the real path, e.g. {example}")
    return "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading '//'


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def data_root(path: object) -> str:
    """Where the stack's data lives (bind mounts, the data disk's mount point).

    Accepted: a normalised absolute path of [A-Za-z0-9._/-] with no '..', that is not '/', not a
    shared top-level directory itself (/srv, /opt, /mnt, /home, /data, /var, ...), not inside a
    system tree (/etc, /usr, /boot, /root, /tmp, /run, ...), not a user's home itself
    (/home/NAME), and under /var only a package directory of its own: /var/lib/NAME[/...] where
    NAME is not the system's (/var/lib/dify is accepted; /var/lib/docker, /var/log are not).
    """
    what = "the data root"
    normal = _safe_absolute_path(what, path, "/srv/dify")
    example = "use a directory of its own such as /srv/dify, /opt/dify or /data/dify"
    for tree in SYSTEM_TREES:
        if _inside(normal, tree):
            raise CheckError(f"{what} {_shown(normal)} is inside the system directory {tree}; {example}")
    if normal in SHARED_TOP:
        raise CheckError(f"{what} {_shown(normal)} is a directory other things share; {example}")
    parts = normal.split("/")[1:]
    if parts[0] == "home" and len(parts) == 2:
        raise CheckError(f"{what} {_shown(normal)} is a user's home directory; {example}")
    if parts[0] == "var":
        if len(parts) < 3 or parts[1] != "lib" or parts[2] in SYSTEM_VAR_LIB:
            raise CheckError(f"{what} {_shown(normal)} belongs to the system; under /var only a package "
                             f"directory of its own such as /var/lib/dify is accepted, else {example}")
    return normal


def device_path(path: object) -> str:
    """A block device for the data disk: /dev/NAME[/...] of [A-Za-z0-9._/-], normalised, no '..'."""
    what = "the data disk"
    normal = _safe_absolute_path(what, path, "/dev/vdb")
    if not normal.startswith("/dev/") or normal == "/dev":
        raise CheckError(f"{what} {_shown(normal)} must be a device path under /dev, e.g. /dev/vdb "
                         "or /dev/disk/by-id/NAME")
    return normal


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def hostname(name: object) -> str:
    """A DNS name as RFC 1123 has it, lowercased (one trailing dot is dropped): labels of 1-63
    letters, digits and '-', not starting or ending with '-', 253 characters at most. A name
    whose last label is all digits must be an IPv4 address (1.2.3.4 is accepted, 1.2.3.999 not)."""
    what = "the host name"
    name = _string(what, name)
    accepted = ("give a DNS name: labels of 1-63 letters, digits or '-' (not starting or ending "
                "with '-') joined by dots, e.g. dify.example.com")
    normal = name.lower()
    if normal.endswith("."):
        normal = normal[:-1]
    if not normal or len(normal) > 253:
        raise CheckError(f"{what} {_shown(name)} is empty or longer than 253 characters; {accepted}")
    labels = normal.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise CheckError(f"{what} {_shown(name)} is not a DNS name; {accepted}")
    if labels[-1].isdigit():  # no top-level domain is all digits: this is meant as an address
        try:
            ipaddress.IPv4Address(normal)
        except ValueError:
            raise CheckError(f"{what} {_shown(name)} ends in a number but is no IPv4 address; "
                             f"{accepted}") from None
    return normal


# URL characters that mean nothing to a shell: no quote, space, ';', '&', '|', '$', '`', '(',
# '<', '\', '*', '?', '#', '!', '=', '@' (userinfo) or '%' (no escapes to hide any of them).
_SAFE_URL = re.compile(r"[A-Za-z0-9._~:/\[\]+-]+")
_SAFE_URL_PATH = re.compile(r"[A-Za-z0-9._~/+-]*")  # no '[': a shell would glob it


def https_url(url: object) -> str:
    """An https URL to fetch packages or keys from: https only, a valid host name or IP address,
    an optional port, a path of [A-Za-z0-9._~/+-]; no user, query or fragment. Returned with
    the scheme and host lowercased and without a trailing '/'."""
    what = "the URL"
    url = _string(what, url)
    example = "e.g. https://download.docker.com/linux/debian"
    if not _SAFE_URL.fullmatch(url):
        raise CheckError(f"{what} {_shown(url)} may hold only letters, digits and . _ ~ : / [ ] + - "
                         f"(no spaces, quotes, user names, queries or shell characters), {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise CheckError(f"{what} {_shown(url)} cannot be read ({error}); give {example}") from None
    if parts.scheme.lower() != "https":
        raise CheckError(f"{what} {_shown(url)} must use https://, so that what is fetched cannot be "
                         f"changed on the way, {example}")
    host = parts.hostname or ""
    try:
        host = str(ipaddress.ip_address(host))
        netloc_host = f"[{host}]" if ":" in host else host
    except ValueError:
        try:
            host = netloc_host = hostname(host)
        except CheckError:
            raise CheckError(f"{what} {_shown(url)} has no valid host name or IP address, {example}") from None
    if not _SAFE_URL_PATH.fullmatch(parts.path):
        raise CheckError(f"{what} {_shown(url)} may use '[' and ']' only around an IPv6 address, {example}")
    if port == 0:
        raise CheckError(f"{what} {_shown(url)} has port 0; give a port from 1 to 65535 or none")
    netloc = netloc_host + (f":{port}" if port else "")
    return f"https://{netloc}{parts.path.rstrip('/')}"


def size_mib(text: object, upper: int, lower: int = 1) -> int:
    """A size with a unit ('4G', '512M', '1.5GiB') in MiB, between lower and upper MiB."""
    try:
        mib = parse_mib(str(text))
    except SizeError as error:
        raise CheckError(str(error)) from None
    if not lower <= mib <= upper:
        raise CheckError(f"size {_shown(text)} is {mib} MiB; between {lower} and {upper} MiB is accepted")
    return mib


_TIMESPAN = re.compile(r"(\d+)(s|sec|m|min|h|hr)")
_SPAN_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def timespan_seconds(text: str) -> int:
    """'5min' -> 300 (for a span timespan() accepted)."""
    match = _TIMESPAN.fullmatch(text)
    return int(match.group(1)) * _SPAN_SECONDS[match.group(2)]


def timespan(text: object, lower_s: int = 1, upper_s: int = 7 * 86400) -> str:
    """A systemd time span of one number and one unit (s, sec, m, min, h, hr), e.g. 5min,
    between lower_s and upper_s seconds. Returned as given."""
    what = "the time span"
    text = _string(what, text)
    match = _TIMESPAN.fullmatch(text)
    if not match:
        raise CheckError(f"{what} {_shown(text)} must be a number and a unit such as 300s, 5min or 1h")
    seconds = timespan_seconds(text)
    if not lower_s <= seconds <= upper_s:
        raise CheckError(f"{what} {_shown(text)} is {seconds} s; between {lower_s} and {upper_s} s is accepted")
    return text


# Upstream Dify's .env.example ships these; a stack running with one of them is open to anyone
# who has read that file.
UPSTREAM_DEFAULTS = frozenset({
    "difyai123456",
    "sk-9f73s3ljTXVcMT3Blb3ljTqtsKiGHXVcMT3BlbkFJLK7U",
    "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi",
    "QaHbTe77CtuXmsfyhR7+vRjI/+XbV1AaFy691iy+kGDv2Jvy0/eAh8Y1",
    "dify-sandbox",
})
SECRET_MIN_LENGTH = 24
# What survives unquoted in a URL (redis://:PASSWORD@...), a .env line and pgbouncer's userlist:
# URL-safe base64, as the secrets are generated.
_SECRET_CHARACTERS = re.compile(r"[A-Za-z0-9_-]+")


def secret_value(name: str, value: object) -> str:
    """A secret: SECRET_MIN_LENGTH+ characters of [A-Za-z0-9_-], not one of upstream's published
    defaults. Messages name the secret, never its value."""
    if not isinstance(value, str):
        raise CheckError(f"{name} must be a string")
    if value in UPSTREAM_DEFAULTS:
        raise CheckError(f"{name} is one of upstream Dify's published defaults; generate a random one, "
                         "e.g. with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if len(value) < SECRET_MIN_LENGTH or not _SECRET_CHARACTERS.fullmatch(value):
        raise CheckError(f"{name} must be {SECRET_MIN_LENGTH} or more characters of letters, digits, "
                         "'_' and '-' only (so it survives unquoted in URLs, .env files and pgbouncer's "
                         "userlist), e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return value


def tls_pair(certificate: str, key: str) -> tuple[str, str]:
    """A provided certificate and key (control-machine paths, checked to exist before): both PEM,
    the key unencrypted, and the certificate's public key the key's. -> their texts. Messages
    name the files, never show the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    texts = []
    for label, path in (("edgefit_tls_certificate", certificate), ("edgefit_tls_key", key)):
        try:
            texts.append(open(path, encoding="ascii").read())
        except (OSError, UnicodeDecodeError) as error:
            reason = (error.strerror or str(error)).lower() if isinstance(error, OSError) else "not PEM text"
            raise CheckError(f"{label} {path} cannot be read ({reason})") from None
    try:
        cert = x509.load_pem_x509_certificate(texts[0].encode())
    except ValueError:
        raise CheckError(f"edgefit_tls_certificate {certificate} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(texts[1].encode(), password=None)
    except (ValueError, TypeError):
        raise CheckError(f"edgefit_tls_key {key} is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    if cert.public_key().public_bytes(encoding, public) != private.public_key().public_bytes(encoding, public):
        raise CheckError(f"edgefit_tls_key {key} is not the key of edgefit_tls_certificate {certificate}")
    return texts[0], texts[1]
