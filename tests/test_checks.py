"""edgefit.checks: every value check, with the injection values of issue 10 and properties that
hold for any input (hypothesis)."""

from __future__ import annotations

import dataclasses
import posixpath
import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgefit import checks
from edgefit.checks import CheckError
from edgefit.secrets import Secrets, SecretsError


def refused(check, *args) -> str:
    with pytest.raises(CheckError) as caught:
        check(*args)
    message = str(caught.value)
    assert "\n" not in message, f"one line, got: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# data_root

@pytest.mark.parametrize("given_,normal", [
    ("/srv/dify", "/srv/dify"),
    ("/opt/dify", "/opt/dify"),
    ("/data/dify", "/data/dify"),
    ("/mnt/x", "/mnt/x"),
    ("/srv/dify/", "/srv/dify"),
    ("//srv//dify/./data", "/srv/dify/data"),
    ("/var/lib/dify", "/var/lib/dify"),
    ("/var/lib/dify/data", "/var/lib/dify/data"),
    ("/home/alice/dify", "/home/alice/dify"),
    ("/srv/dify-1.2_x", "/srv/dify-1.2_x"),
])
def test_data_root_accepts_and_normalises(given_, normal):
    assert checks.data_root(given_) == normal


@pytest.mark.parametrize("value,needle", [
    ("/srv/$(touch pwned)", "letters, digits"),
    ("/srv/`id`", "letters, digits"),
    ("/srv/dify\nprivileged: true", "letters, digits"),
    ("/srv/dify\n", "letters, digits"),
    ("/srv/di fy", "letters, digits"),
    ("/srv/dify;reboot", "letters, digits"),
    ("/srv/dify'", "letters, digits"),
    ("/srv/d:ify", "letters, digits"),
    ("/srv/%h", "letters, digits"),
    ("srv/dify", "absolute"),
    ("", "absolute"),
    ("/srv/../etc", "'..'"),
    ("/srv/dify/..", "'..'"),
    ("/", "absolute"),  # '/' alone is not in the class: a name is needed
    ("//", "share"),
    ("/var", "share"),
    ("/var/", "share"),
    ("/srv", "share"),
    ("/opt", "share"),
    ("/mnt", "share"),
    ("/home", "share"),
    ("/home/alice", "home directory"),
    ("/var/lib", "/var/lib/dify"),
    ("/var/lib/docker", "/var/lib/dify"),
    ("/var/lib/docker/volumes", "/var/lib/dify"),
    ("/var/lib/containerd", "/var/lib/dify"),
    ("/var/log/dify", "/var/lib/dify"),
    ("/var/tmp/dify", "/var/lib/dify"),
    ("/boot", "/boot"),
    ("/boot/dify", "/boot"),
    ("/root", "/root"),
    ("/root/dify", "/root"),
    ("/etc", "/etc"),
    ("/etc/dify", "/etc"),
    ("/usr/local/dify", "/usr"),
    ("/tmp/dify", "/tmp"),
    ("/proc/self", "/proc"),
    ("/sys/fs", "/sys"),
    ("/dev/shm/dify", "/dev"),
    ("/run/dify", "/run"),
    ("/lib64", "/lib64"),
    ("/bin", "/bin"),
    ("/sbin/x", "/sbin"),
    ("/" + "a" * 300, "at most"),
])
def test_data_root_refuses(value, needle):
    message = refused(checks.data_root, value)
    assert needle in message
    assert message.startswith("the data root")


def test_data_root_refuses_a_non_string():
    assert "string" in refused(checks.data_root, None)
    assert "string" in refused(checks.data_root, ["/srv/dify"])


def test_system_trees_are_refused_but_similar_names_are_not():
    for tree in checks.SYSTEM_TREES:
        refused(checks.data_root, tree)
        refused(checks.data_root, tree + "/dify")
    assert checks.data_root("/usrdata/dify") == "/usrdata/dify"
    assert checks.data_root("/etcetera") == "/etcetera"
    refused(checks.data_root, "/var/library/x")  # under /var only /var/lib/NAME


SAFE_CHARS = string.ascii_letters + string.digits + "._/-"


@given(st.text(alphabet=SAFE_CHARS + "$`;&|<> \n\t'\"\\:%#*?~!{}()[]=,é\x00", max_size=40))
def test_data_root_accepts_only_safe_normalised_paths(text):
    value = "/" + text
    try:
        normal = checks.data_root(value)
    except CheckError as error:
        assert "\n" not in str(error)
        return
    assert checks.SAFE_PATH.fullmatch(normal)
    assert normal == posixpath.normpath(normal) and not normal.startswith("//")
    assert ".." not in normal.split("/")
    assert set(text) <= set(SAFE_CHARS)
    assert checks.data_root(normal) == normal  # idempotent


@given(st.text(alphabet=SAFE_CHARS, min_size=1, max_size=30),
       st.characters(blacklist_characters=SAFE_CHARS),
       st.text(alphabet=SAFE_CHARS, max_size=30))
def test_data_root_refuses_any_character_outside_the_class(before, bad, after):
    with pytest.raises(CheckError):
        checks.data_root(f"/srv/{before}{bad}{after}")


# ---------------------------------------------------------------------------------------------
# device_path

@pytest.mark.parametrize("given_,normal", [
    ("/dev/vdb", "/dev/vdb"),
    ("/dev/disk/by-id/virtio-data_1", "/dev/disk/by-id/virtio-data_1"),
    ("/dev//nvme1n1", "/dev/nvme1n1"),
    ("/dev/mapper/vg0-data", "/dev/mapper/vg0-data"),
])
def test_device_path_accepts(given_, normal):
    assert checks.device_path(given_) == normal


@pytest.mark.parametrize("value", ["vdb", "/dev", "/dev/", "/srv/disk", "/dev/../etc/passwd", "/dev/vdb; mkfs /dev/vda",
                                   "/dev/$(id)", "/dev/vdb\n", "/devx/vdb", None])
def test_device_path_refuses(value):
    assert refused(checks.device_path, value).startswith("the data disk")


# ---------------------------------------------------------------------------------------------
# hostname

@pytest.mark.parametrize("given_,normal", [
    ("dify.example.com", "dify.example.com"),
    ("Dify.Example.COM", "dify.example.com"),
    ("dify.example.com.", "dify.example.com"),
    ("localhost", "localhost"),
    ("a", "a"),
    ("1st-host.example", "1st-host.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("192.0.2.10", "192.0.2.10"),
    ("a" * 63 + ".example", "a" * 63 + ".example"),
])
def test_hostname_accepts(given_, normal):
    assert checks.hostname(given_) == normal


@pytest.mark.parametrize("value", [
    "x; } server { listen 81; autoindex on; root /; } #",
    "dify.example.com;",
    "dify.example.com\nserver_name evil",
    "dify.example.com\n",
    "dify example.com",
    "-dify.example.com",
    "dify-.example.com",
    "dify..example.com",
    ".example.com",
    "*.example.com",
    "dify_1.example.com",
    "dify.exämple.com",
    "a" * 64 + ".example",
    ".".join(["a" * 63] * 4),  # 255 characters
    "",
    ".",
    "1.2.3.999",
    "10.0.0",
    None,
    42,
])
def test_hostname_refuses(value):
    assert refused(checks.hostname, value).startswith("the host name")


@given(st.text(max_size=80))
def test_an_accepted_hostname_is_lowercase_labels_only(text):
    try:
        name = checks.hostname(text)
    except CheckError:
        return
    assert re.fullmatch(r"[a-z0-9.-]+", name) and len(name) <= 253
    assert all(1 <= len(label) <= 63 and label[0] != "-" and label[-1] != "-" for label in name.split("."))
    assert checks.hostname(name) == name


# ---------------------------------------------------------------------------------------------
# https_url

@pytest.mark.parametrize("given_,normal", [
    ("https://download.docker.com/linux/debian", "https://download.docker.com/linux/debian"),
    ("https://download.docker.com/linux/debian/", "https://download.docker.com/linux/debian"),
    ("HTTPS://Mirror.LAN:8443/docker-ce/", "https://mirror.lan:8443/docker-ce"),
    ("https://192.0.2.7/docker", "https://192.0.2.7/docker"),
    ("https://[2001:db8::7]:443/docker", "https://[2001:db8::7]:443/docker"),
    ("https://mirror.lan", "https://mirror.lan"),
    ("https://mirror.lan/~docker/a+b_c", "https://mirror.lan/~docker/a+b_c"),
])
def test_https_url_accepts(given_, normal):
    assert checks.https_url(given_) == normal


@pytest.mark.parametrize("value,needle", [
    ("http://download.docker.com/linux/debian", "https://"),
    ("ftp://mirror.lan/docker", "https://"),
    ("mirror.lan/docker", "https://"),
    ("https://mirror.lan/docker;curl evil|sh", "letters, digits"),
    ("https://mirror.lan/docker;reboot", "letters, digits"),
    ("https://mirror.lan/$(id)", "letters, digits"),
    ("https://mirror.lan/`id`", "letters, digits"),
    ("https://mirror.lan/a b", "letters, digits"),
    ("https://mirror.lan/a'b", "letters, digits"),
    ('https://mirror.lan/a"b', "letters, digits"),
    ("https://mirror.lan/docker\n", "letters, digits"),
    ("https://mirror.lan/docker?x=1", "letters, digits"),
    ("https://mirror.lan/docker#x", "letters, digits"),
    ("https://mirror.lan/a&b", "letters, digits"),
    ("https://user@mirror.lan/docker", "letters, digits"),
    ("https://user:pw@mirror.lan/docker", "letters, digits"),
    ("https://mirror.lan/%24(id)", "letters, digits"),
    ("https://mirror.lan/d[1]", "'['"),
    ("https://", "host"),
    ("https:///docker", "host"),
    ("https://-bad.lan/docker", "host"),
    ("https://bad_host.lan/docker", "host"),
    ("https://mirror.lan:0/docker", "port"),
    ("https://mirror.lan:99999/docker", "cannot be read"),
    ("https://mirror.lan:x/docker", "cannot be read"),
    ("https://[not-ipv6]/docker", "cannot be read"),
])
def test_https_url_refuses(value, needle):
    message = refused(checks.https_url, value)
    assert needle in message and message.startswith("the URL")


@given(st.text(max_size=60))
def test_an_accepted_url_holds_no_shell_character(text):
    for candidate in (text, "https://" + text):
        try:
            url = checks.https_url(candidate)
        except CheckError:
            continue
        assert url.startswith("https://")
        assert not set(url) & set(" \t\n'\"`$;&|<>()\\*?#!=@%{}")
        assert checks.https_url(url) == url


# ---------------------------------------------------------------------------------------------
# size_mib, timespan

@pytest.mark.parametrize("text,upper,mib", [("4G", 8192, 4096), ("512M", 1024, 512), ("1.5GiB", 2048, 1536),
                                             ("8G", 8192, 8192)])
def test_size_mib_accepts(text, upper, mib):
    assert checks.size_mib(text, upper) == mib


@pytest.mark.parametrize("text,upper,needle", [("9G", 8192, "between 1 and 8192 MiB"), ("4", 8192, "unit"),
                                                ("4X", 8192, "unit"), ("0M", 8192, "zero"),
                                                ("1T", 1024 * 1024 - 1, "between")])
def test_size_mib_refuses(text, upper, needle):
    assert needle in refused(checks.size_mib, text, upper)


def test_size_mib_returns_a_number_so_surrounding_space_cannot_travel():
    assert checks.size_mib(" 4G\n", 8192) == 4096


def test_size_mib_lower_bound():
    assert "between 1024 and 4096" in refused(checks.size_mib, "512M", 4096, 1024)
    assert checks.size_mib("1G", 4096, 1024) == 1024


@pytest.mark.parametrize("text", ["5min", "300s", "1h", "30sec", "2hr", "10m", "604800s"])
def test_timespan_accepts(text):
    assert checks.timespan(text) == text


@pytest.mark.parametrize("text,needle", [("5", "unit"), ("5 min", "unit"), ("5min\n", "unit"), ("5min; reboot", "unit"),
                                         ("-5min", "unit"), ("5days", "unit"), ("0s", "between"),
                                         ("604801s", "between"), ("", "unit"), (300, "string")])
def test_timespan_refuses(text, needle):
    assert needle in refused(checks.timespan, text)


def test_timespan_bounds_are_the_callers():
    assert checks.timespan("30s", lower_s=30) == "30s"
    assert "between 60 and 3600" in refused(checks.timespan, "30s", 60, 3600)


# ---------------------------------------------------------------------------------------------
# secret_value, and the secrets file that uses it

GOOD_SECRET = "Ab3_-" * 5  # 25 characters of the URL-safe class


def test_secret_value_accepts_generated_and_urlsafe_values():
    assert checks.secret_value("SECRET_KEY", GOOD_SECRET) == GOOD_SECRET
    generated = Secrets.generate()
    for field in dataclasses.fields(Secrets):
        value = getattr(generated, field.name)
        assert checks.secret_value(field.name, value) == value


@pytest.mark.parametrize("value,needle", [
    ("short-but-fine", "24 or more"),
    ("a" * 23, "24 or more"),
    ("abc+def/ghi=" * 3, "letters, digits"),  # plain base64: breaks URLs
    ("abc@def:ghi" * 3, "letters, digits"),   # breaks redis://:PASSWORD@host
    ("a" * 30 + " b", "letters, digits"),
    ("a" * 30 + '"', "letters, digits"),
    ("a" * 30 + "$HOME", "letters, digits"),
    ("a" * 30 + "#", "letters, digits"),
    ("a" * 30 + "\n", "letters, digits"),
    ("a" * 30 + "%2F", "letters, digits"),
    *[(default, "upstream") for default in sorted(checks.UPSTREAM_DEFAULTS)],
])
def test_secret_value_refuses_without_showing_the_value(value, needle):
    message = refused(checks.secret_value, "DB_PASSWORD", value)
    assert needle in message and "DB_PASSWORD" in message
    assert value.strip() not in message


def test_secret_value_refuses_a_non_string():
    assert "string" in refused(checks.secret_value, "DB_PASSWORD", 123456789012345678901234567)


@given(st.text(max_size=60))
@example("sec")  # in the message's own example, secrets.token_urlsafe: not a leak
def test_an_accepted_secret_survives_unquoted(value):
    try:
        checks.secret_value("X", value)
    except CheckError as error:
        # Never shown: the message is one of the fixed ones, whatever the value. (A substring
        # test failed on "sec", which the message's own example, secrets.token_urlsafe, holds.)
        fixed = {refused(checks.secret_value, "X", sample)
                 for sample in (123, sorted(checks.UPSTREAM_DEFAULTS)[0], "")}
        assert str(error) in fixed, "a refused secret is never shown"
        return
    assert len(value) >= checks.SECRET_MIN_LENGTH
    assert re.fullmatch(r"[A-Za-z0-9_-]+", value)


def _secrets_text(**replace: str) -> str:
    values = {field.name: f"test-{field.name.replace('_', '-')}-000000000000000000"
              for field in dataclasses.fields(Secrets)}
    values["init_password"] = "test-init-password-00000000000"  # Dify takes at most 30 characters
    values.update(replace)
    return "".join(f"{name.upper()}={value}\n" for name, value in values.items())


def test_a_secrets_file_with_url_breaking_or_weak_values_is_refused():
    assert Secrets.from_env(_secrets_text(), "given").db_password.startswith("test-db-password")
    for bad in ("p@ss/word+with:chars=xxxxxxxxxxxx", "tooshort", "difyai123456"):
        with pytest.raises(SecretsError) as caught:
            Secrets.from_env(_secrets_text(redis_password=bad), "given.env")
        message = str(caught.value)
        assert message.startswith("given.env: REDIS_PASSWORD") and bad not in message
