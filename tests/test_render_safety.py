"""What the rendered configs refuse: the SSRF proxy's destination list, and nginx's server_name,
which a value can never turn into more than one name."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefit import checks
from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import render_stack
from edgefit.secrets import Secrets

TEST_SECRETS = Secrets(**{field.name: f"test-{field.name.replace('_', '-')}-000000000000000000"
                          for field in dataclasses.fields(Secrets)})


def rendered(name: str, **options) -> str:
    files = render_stack(make_plan(HostSize(2, 4096), Options(**options)), TEST_SECRETS)
    return next(f.content for f in files if f.path == name)


# ---------------------------------------------------------------------------------------------
# squid: the SSRF list

def denied_networks() -> list:
    conf = rendered("conf/ssrf_proxy/squid.conf")
    entries = [word for line in conf.splitlines() if line.startswith("acl to_private dst ")
               for word in line.split()[3:]]
    return [ipaddress.ip_network(entry, strict=True) for entry in entries]  # strict: no masked-away bits


def squid_denies(address: str) -> bool:
    """Squid's match: it keeps IPv4 as IPv4-mapped IPv6, so ::ffff:a.b.c.d is a.b.c.d."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in denied_networks() if network.version == ip.version)


# The issue's misses, then the rest of RFC 6890's special-purpose ranges (and multicast).
MUST_DENY = ["0.0.0.0/8", "100.64.0.0/10", "198.18.0.0/15", "64:ff9b::/96",
             "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
             "192.88.99.0/24", "192.168.0.0/16", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
             "::1/128", "::/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "2002::/16",
             "3fff::/20", "5f00::/16", "fc00::/7", "fec0::/10", "fe80::/10", "ff00::/8"]


@pytest.mark.parametrize("network", MUST_DENY)
def test_squid_denies_each_special_purpose_range(network):
    net = ipaddress.ip_network(network)
    for address in (net.network_address, net.broadcast_address, net.network_address + net.num_addresses // 2):
        assert squid_denies(str(address)), f"{address} ({network}) must be refused"


@pytest.mark.parametrize("address", ["::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:100.100.100.200",
                                     "::ffff:10.1.2.3", "::ffff:0.0.0.0", "::ffff:198.18.0.1"])
def test_squid_denies_ipv4_mapped_forms_through_its_ipv4_ranges(address):
    assert squid_denies(address)


def test_squid_lists_no_range_that_would_refuse_every_ipv4_destination():
    for network in denied_networks():
        if network.version == 6:  # ::ffff:0:0/96 or wider would hold every mapped IPv4 address
            assert not network.overlaps(ipaddress.ip_network("::ffff:0:0/96")), network


@pytest.mark.parametrize("address", ["1.1.1.1", "93.184.216.34", "8.8.8.8", "100.128.0.1", "198.20.0.1",
                                     "2606:4700:4700::1111", "2a00:1450:4001:82a::200e", "::ffff:1.1.1.1"])
def test_squid_lets_public_destinations_through(address):
    assert not squid_denies(address)


def test_squid_ranges_do_not_overlap():
    """Squid warns about (and drops) an entry inside another one."""
    networks = denied_networks()
    for i, one in enumerate(networks):
        for other in networks[i + 1:]:
            assert one.version != other.version or not one.overlaps(other), (one, other)


def test_squid_refuses_private_destinations_before_it_allows_anyone():
    access = [line for line in rendered("conf/ssrf_proxy/squid.conf").splitlines() if line.startswith("http_access")]
    assert access.index("http_access deny to_private") < access.index("http_access allow localnet")
    assert access[-1] == "http_access deny all"


@given(st.ip_addresses())
def test_squid_denies_every_address_that_is_not_global(ip):
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_global:
        assert squid_denies(str(ip)), ip


# ---------------------------------------------------------------------------------------------
# nginx: server_name

def test_nginx_serves_a_checked_domain_as_one_server_name():
    domain = checks.hostname("Dify.Example.com")
    conf = rendered("conf/nginx/nginx.conf", domain=domain)
    # one server for port 80 (the redirect) and one for 443, both for the checked name only
    assert re.findall(r"^\s*server_name (.*)$", conf, re.M) == ["dify.example.com;"] * 2
    assert conf.count("server {") == 2 and "autoindex" not in conf


def test_nginx_without_a_domain_answers_any_name():
    conf = rendered("conf/nginx/nginx.conf")
    assert re.findall(r"^\s*server_name (.*)$", conf, re.M) == ["_;"] * 2


@pytest.mark.parametrize("domain", ["x; } server { listen 81; autoindex on; root /; } #", "a.example\nautoindex on",
                                    "a.example;", "a.example b.example"])
def test_a_domain_that_could_add_to_nginx_is_refused_before_it_renders(domain):
    with pytest.raises(checks.CheckError):
        checks.hostname(domain)


def test_nginx_template_cannot_take_a_line_from_a_domain():
    """Even when a plan was made without the check, render_stack checks the domain again: a
    value with a newline, a space or a ';' never renders."""
    for bad in ("x; } server { autoindex on; } #", "a.example\nautoindex on;", "a.example b.example"):
        with pytest.raises(checks.CheckError):
            rendered("conf/nginx/nginx.conf", domain=bad)


@pytest.mark.parametrize("root", ["/srv/dify\n    privileged: true", "/srv/$(touch pwned)", "/srv/../etc"])
def test_compose_cannot_take_a_line_from_the_data_root(root):
    with pytest.raises(checks.CheckError):
        rendered("docker-compose.yml", data_root=root)


def test_compose_mounts_the_normalised_data_root():
    compose = rendered("docker-compose.yml", data_root="/data/dify/")
    assert "- /data/dify/postgres:/var/lib/postgresql/data" in compose and "/data/dify//" not in compose
