"""Role "tls": nginx's self-signed certificate, made on the host once and kept.

With edgefit_tls = "self-signed" (the default) nginx needs a certificate before it starts: the
host's own openssl makes one (P-256, ten years) for edgefit_domain or the host's name into
/etc/edgefit/tls/self-signed/ (0600), only when it is missing, so a re-deploy keeps it and
browsers that accepted it once are not asked again. Every deploy says it is self-signed (verify
does too). A provided certificate is a rendered file (edgefit/render.py) and needs nothing here.
"""

import ipaddress
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from edgefit import checks
from edgefit.plan import Plan
from edgefit.render import SELF_SIGNED_TLS_DIR

SELF_SIGNED_CERT = f"{SELF_SIGNED_TLS_DIR}/cert.pem"
SELF_SIGNED_KEY = f"{SELF_SIGNED_TLS_DIR}/key.pem"


def certificate_name(domain: str | None, host_name: str) -> str:
    """The name the certificate is for: the domain, else the host's name when it is a DNS name or
    an address, else localhost (an inventory name such as @vagrant/edge-small is neither)."""
    for candidate in (domain, host_name):
        if not candidate:
            continue
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
        try:
            return checks.hostname(candidate)
        except checks.CheckError:
            continue
    return "localhost"


def self_signed_command(name: str) -> str:
    """openssl on the host; written under temporary names and renamed, the certificate last, so a
    half-made pair is never taken for a finished one."""
    try:
        alt = f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        alt = f"DNS:{checks.hostname(name)}"
    directory, cert, key = (shlex.quote(p) for p in (SELF_SIGNED_TLS_DIR, SELF_SIGNED_CERT, SELF_SIGNED_KEY))
    return " && ".join([
        "set -e",
        "command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl",
        "umask 077",
        f"mkdir -p {directory}",
        f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 "
        f"-subj {shlex.quote('/CN=' + name)} -addext {shlex.quote('subjectAltName=' + alt)} "
        f"-keyout {key}.new -out {cert}.new 2>/dev/null",
        f"mv {key}.new {key}",
        f"mv {cert}.new {cert}",
    ])


@deploy("HTTPS certificate")
def make_certificate(plan: Plan, live: dict) -> None:
    if plan.tls != "self-signed":
        return
    name = certificate_name(plan.domain, host.name)
    host.noop(f"HTTPS uses a self-signed certificate for {name}: browsers will warn; set edgefit_tls = "
              "\"provided\" with your certificate and key to replace it")
    if SELF_SIGNED_CERT not in live["files"] or SELF_SIGNED_KEY not in live["files"]:
        server.shell(name=f"Self-signed certificate for {name} (made once, kept)",
                     commands=[self_signed_command(name)])
