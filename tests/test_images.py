"""The test-VM images (tests/images/): archive format, the Dify stand-in, and the real build.

* The archive writer is checked on a tiny rootfs (fast, no root).
* The stand-in program runs on 127.0.0.1 with a sitecustomize.py on PYTHONPATH (no root, no
  services): /debug/gc must report the thresholds that sitecustomize set, in the serving pid.
* The real tarball (root + debootstrap; built once, then cached) is checked for structure,
  size and every image's config; its rootfs is run in a private namespace by
  tests/images/chroot_smoke.py (postgres initdb, pgbouncer, redis, nginx, squid, stand-ins).
* On the test VMs the deploy itself loads the tarball over SSH and waits for every image's
  healthcheck (tests/test_deploy_vm.py); the smoke test and verify's tests OOM-kill containers
  past their limits. (A separate VM test that started each image by hand beside the deployed
  stack cost ~5 minutes of the CI budget and proved nothing those do not.)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "images"))
import build  # noqa: E402  (tests/images/build.py)

STANDIN = REPO / "tests" / "images" / "standin" / "dify_standin.py"
EXPECTED_TAGS = {
    "edgefit-test/postgres:15", "edgefit-test/pgbouncer:1.18", "edgefit-test/redis:7.0",
    "edgefit-test/nginx:1.22", "edgefit-test/squid:5.7", "edgefit-test/dify-api-standin:1",
    "edgefit-test/dify-web-standin:1", "edgefit-test/dify-sandbox-standin:1",
    "edgefit-test/dify-plugin-daemon-standin:1",
}


# ---- archive format ------------------------------------------------------------------------

def read_archive(path: Path) -> dict:
    """Everything `docker load` relies on, read back from the archive; layer hashed while streaming."""
    configs, layers, names = {}, {}, []
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            names.append(member.name)
            if member.name.endswith("layer.tar"):
                h, size, members = hashlib.sha256(), 0, 0
                f = tar.extractfile(member)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
                layers[member.name] = {"sha256": h.hexdigest(), "size": size}
            elif member.isfile():
                data = tar.extractfile(member).read()
                if member.name == "manifest.json":
                    manifest = json.loads(data)
                elif member.name.endswith(".json") and "/" not in member.name:
                    configs[member.name] = data
    return {"manifest": manifest, "configs": configs, "layers": layers, "names": names}


def assert_loadable(archive: dict, expected_tags: set[str]) -> dict[str, dict]:
    """The checks `docker load` makes, plus ours: one entry per tag, all sharing one layer."""
    manifest, configs, layers = archive["manifest"], archive["configs"], archive["layers"]
    assert {t for e in manifest for t in e["RepoTags"]} == expected_tags
    assert len(manifest) == len(expected_tags), "one manifest entry per image"
    assert len(layers) == 1, f"every image must share ONE stored layer, got {sorted(layers)}"
    assert len(archive["names"]) == len(set(archive["names"])), "no member stored twice"
    (layer_name, layer), = layers.items()
    by_tag = {}
    for entry in manifest:
        blob = configs[entry["Config"]]
        # docker load names the image by the sha256 of its config bytes
        assert entry["Config"] == hashlib.sha256(blob).hexdigest() + ".json"
        assert entry["Layers"] == [layer_name]
        config = json.loads(blob)
        assert config["architecture"] == "amd64" and config["os"] == "linux"
        assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{layer['sha256']}"]}
        for key in ("Entrypoint", "Env", "User", "WorkingDir", "ExposedPorts"):
            assert key in config["config"], f"{entry['RepoTags']}: config lacks {key}"
        by_tag[entry["RepoTags"][0]] = config["config"]
    return by_tag


def test_archive_writer_on_a_tiny_rootfs(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "dev").mkdir()
    (rootfs / "dev" / "should-not-ship").write_text("x")
    (rootfs / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    (rootfs / "usr" / "bin" / "hello").chmod(0o755)
    os.symlink("usr/bin", rootfs / "bin")
    layer = tmp_path / "layer.tar"
    diff_id, size = build.write_layer(rootfs, layer)
    assert size == layer.stat().st_size and diff_id == hashlib.sha256(layer.read_bytes()).hexdigest()
    with tarfile.open(layer) as t:
        names = set(t.getnames())
    assert {"usr/bin/hello", "bin", "dev"} <= names and "dev/should-not-ship" not in names
    assert not any(n.startswith(("/", "./")) for n in names)

    out = tmp_path / "images.tar.gz"
    ids = build.write_archive(layer, diff_id, out)
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b", "gzip: docker load decompresses it itself"
    by_tag = assert_loadable(read_archive(out), EXPECTED_TAGS)
    assert set(ids) == EXPECTED_TAGS
    assert by_tag["edgefit-test/postgres:15"]["Entrypoint"] == ["docker-entrypoint.sh"]
    assert by_tag["edgefit-test/pgbouncer:1.18"]["User"] == "70:70"
    assert "STANDIN_ROLE=plugin_daemon" in by_tag["edgefit-test/dify-plugin-daemon-standin:1"]["Env"]
    # Same inputs, same bytes: a rebuild of an unchanged recipe is recognisable.
    again = tmp_path / "again.tar.gz"
    build.write_archive(layer, diff_id, again)
    assert again.read_bytes() == out.read_bytes()


def test_archive_check_catches_a_wrong_diff_id(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "x").write_text("1")
    layer = tmp_path / "layer.tar"
    diff_id, _ = build.write_layer(rootfs, layer)
    out = tmp_path / "bad.tar.gz"
    build.write_archive(layer, "0" * 64, out)
    with pytest.raises(AssertionError):
        assert_loadable(read_archive(out), EXPECTED_TAGS)


def test_recipe_hash_covers_every_recipe_file():
    files = {p.relative_to(REPO / "tests" / "images").as_posix() for p in build.recipe_files()}
    assert {"build.py", "setup-rootfs.sh", "standin/dify_standin.py", "docker-entrypoint.sh",
            "opt/edgefit-images/postgres/bin/docker-entrypoint.sh"} <= {f.removeprefix("overlay/") for f in files}


def test_every_service_edgefit_knows_has_a_test_image():
    from edgefit.images import DEFAULT_IMAGES, RUN_AS_UID

    by_service = {s: (tag, spec) for tag, spec in build.IMAGES.items() for s in spec["services"]}
    for service in ("api", "worker", "worker_beat", "web", "sandbox", "plugin_daemon", "db",
                    "pgbouncer", "redis", "redis_broker", "ssrf_proxy", "nginx"):
        assert service in DEFAULT_IMAGES and service in by_service, service
        if service in RUN_AS_UID:
            assert by_service[service][1]["run_as_uid"] == RUN_AS_UID[service], service


# ---- the Dify stand-in, on loopback ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class Standin:
    def __init__(self, tmp_path: Path, role: str, env: dict | None = None, python_args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MODE")}
        full_env.update({"STANDIN_ROLE": role, "STANDIN_PORT": str(self.port), "STANDIN_LISTEN": "127.0.0.1",
                         # closed loopback ports: nothing answers as DB or Redis
                         "DB_HOST": "127.0.0.1", "DB_PORT": str(free_port()), "REDIS_HOST": "127.0.0.1",
                         "REDIS_PORT": str(free_port()), "STANDIN_CHECK_TIMEOUT": "2", **(env or {})})
        self.log = open(tmp_path / f"standin-{role}-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, *python_args, str(STANDIN)], env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stand-in exited {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("stand-in did not listen within 15 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def standin(tmp_path):
    started = []

    def make(role="api", env=None, python_args=()):
        s = Standin(tmp_path, role, env, python_args)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def hook_dir(tmp_path):
    d = tmp_path / "python"
    d.mkdir()
    # what edgefit's sitecustomize does, reduced to the effect under test
    (d / "sitecustomize.py").write_text(
        "import gc, os\n"
        "v = os.environ.get('PYTHON_GC_THRESHOLD')\n"
        "if v:\n    gc.set_threshold(*(int(x) for x in v.split(',')))\n")
    return d


def test_standin_applies_sitecustomize_gc_threshold(standin, hook_dir):
    s = standin("api", {"PYTHONPATH": str(hook_dir), "PYTHON_GC_THRESHOLD": "5000,15,25"})
    status, body = get(s.url + "/debug/gc")
    assert status == 200
    assert body["threshold"] == [5000, 15, 25]
    assert body["pid"] == s.proc.pid, "thresholds of the serving process itself"
    assert body["sitecustomize"] == str(hook_dir / "sitecustomize.py")
    assert body["flags"] == {"isolated": 0, "no_site": 0}


def test_standin_under_python_I_ignores_the_hook(standin, hook_dir):
    # The counter-case: an isolated interpreter skips PYTHONPATH, so the hook cannot act.
    s = standin("api", {"PYTHONPATH": str(hook_dir), "PYTHON_GC_THRESHOLD": "5000,15,25"}, python_args=("-I",))
    _, body = get(s.url + "/debug/gc")
    assert body["threshold"] != [5000, 15, 25] and body["flags"]["isolated"] == 1


def test_api_health_is_503_until_db_and_redis_answer(standin):
    s = standin("api", {"CELERY_BROKER_URL": "redis://:x@127.0.0.1:1/1"})
    status, body = get(s.url + "/health")
    assert status == 503 and body["status"] == "unhealthy"
    assert set(body["checks"]) == {"db", "redis", "broker"}
    assert not any(c["ok"] for c in body["checks"].values())


def test_mode_picks_the_worker_role_on_loopback(standin):
    s = standin("api", {"MODE": "worker"})
    _, body = get(s.url + "/debug/gc")
    assert body["role"] == "worker"


@pytest.mark.parametrize("role,path", [("web", "/"), ("sandbox", "/health"), ("plugin_daemon", "/health/check")])
def test_roles_without_backing_services_answer_their_health_path(standin, role, path):
    env = {"DB_HOST": ""} if role == "plugin_daemon" else {}
    s = standin(role, env)
    status, body = get(s.url + path)
    assert status == 200
    if role == "plugin_daemon":
        assert body["code"] == 0
    assert get(s.url + "/no-such-path")[0] == 404


def test_allocate_holds_touched_memory_and_release_frees_it(standin):
    s = standin("sandbox")
    _, before = get(s.url + "/debug/gc")
    status, body = get(s.url + "/debug/allocate?mib=64")
    assert status == 200 and body["held_mib"] == 64
    # every page written: resident, not just reserved
    assert body["rss_bytes"] - before["rss_bytes"] > 60 * 2**20
    _, body = get(s.url + "/debug/allocate?mib=32")
    assert body["held_mib"] == 96
    _, released = get(s.url + "/debug/release")
    assert released["held_mib"] == 0 and released["rss_bytes"] < body["rss_bytes"] - 60 * 2**20
    assert get(s.url + "/debug/allocate?mib=-1")[0] == 400


def test_allocate_at_start(standin):
    s = standin("web", {"ALLOCATE_MIB_AT_START": "48"})
    _, body = get(s.url + "/debug/allocate?mib=0")
    assert body["held_mib"] == 48 and body["rss_bytes"] > 48 * 2**20


# ---- the real build (root, debootstrap; cached after the first run) -------------------------

def _can_build() -> str | None:
    if os.geteuid() != 0:
        return "building the images needs root"
    if not shutil.which("debootstrap"):
        return "debootstrap missing: scripts/setup installs scripts/deps/apt-images.txt"
    return None


@pytest.fixture(scope="session")
def built_tarball():
    reason = _can_build()
    if reason:
        pytest.skip(reason)
    return build.build_images()


def test_real_tarball_is_loadable_and_small(built_tarball):
    archive = read_archive(built_tarball)
    releases = set(build.RELEASES)  # the stand-in releases the upgrade tests use ride along
    by_tag = assert_loadable(archive, EXPECTED_TAGS | releases)
    (layer,) = archive["layers"].values()
    assert layer["size"] < 400 * 2**20, f"layer {layer['size'] / 2**20:.0f} MiB"
    for tag, spec in build.IMAGES.items():
        assert by_tag[tag]["Entrypoint"] == spec["entrypoint"]
        assert by_tag[tag]["User"] == spec["user"]
    info = json.loads(built_tarball.with_suffix("").with_suffix(".json").read_text())
    assert set(info["images"]) == EXPECTED_TAGS | releases
    assert not releases & set(info["images_by_service"].values())
    assert info["layer"]["diff_id"] == f"sha256:{layer['sha256']}"
    assert info["images_by_service"]["db"] == "edgefit-test/postgres:15"
    assert info["tarball_sha256"] == hashlib.sha256(built_tarball.read_bytes()).hexdigest()


def test_real_rootfs_has_the_upstream_users_and_paths(built_tarball):
    rootfs = build.rootfs_path(built_tarball.parent)
    passwd = {l.split(":")[0]: l.split(":") for l in (rootfs / "etc/passwd").read_text().splitlines()}
    assert passwd["postgres"][2] == "999" and passwd["redis"][2] == "999"
    assert passwd["pgbouncer"][2] == "70" and passwd["nginx"][2] == "101" and passwd["dify"][2] == "1001"
    for path in ("usr/lib/postgresql/15/bin/postgres", "usr/lib/postgresql/15/bin/pg_isready", "usr/sbin/pgbouncer",
                 "usr/bin/redis-server", "usr/bin/redis-cli", "usr/sbin/nginx", "usr/sbin/squid", "usr/bin/curl",
                 "usr/bin/wget", "usr/bin/envsubst", "opt/dify-standin/dify_standin.py"):
        assert (rootfs / path).exists(), path
    assert not (rootfs / "etc/ssl/private/ssl-cert-snakeoil.key").exists(), "no private key baked in"
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages")), "apt lists trimmed"


def test_real_rootfs_runs_every_image_in_a_private_namespace(built_tarball):
    rootfs = build.rootfs_path(built_tarball.parent)
    proc = subprocess.run([sys.executable, str(REPO / "tests/images/chroot_smoke.py"), str(rootfs)],
                          capture_output=True, text=True, timeout=540)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no report (rc {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    failed = {k: v for k, v in report["checks"].items() if not v["ok"]}
    assert not failed, json.dumps({"failed": failed, "logs": report["logs"]}, indent=1)[:6000]
    assert len(report["checks"]) >= 15
