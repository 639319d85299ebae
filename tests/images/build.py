"""Build edgefit's TEST images from Debian packages, without a Docker engine.

The test VMs can pull nothing, so every image the stack needs is built here and brought in
over SSH with ONE `docker load`:

    python tests/images/build.py [--out DIR]          # prints the tarball's path
    ssh root@HOST docker load < "$(python tests/images/build.py)"

One debootstrap'd Debian 12 rootfs (Postgres 15, PgBouncer, Redis, nginx, squid, python3 and
the Dify stand-in program) becomes ONE layer; every image (edgefit-test/postgres:15, ...) is
that layer plus its own config (Entrypoint, Cmd, Env, User, ...), written in the classic
`docker save` format (manifest.json, <image id>.json, <layer>/layer.tar), gzip-compressed,
which `docker load` reads directly. The layer is stored once on the host.

Each image honours the contract of the upstream image it stands for, so one compose file runs
with either (see IMAGES below and tests/images/README.md). Dify's own images are replaced by
tests/images/standin/dify_standin.py, a stand-in that is clearly NOT Dify.

Cache: ${EDGEFIT_CACHE:-$HOME/.cache/edgefit}/images/ (or --out DIR / build_images(DIR)), keyed by a hash of the recipe files
(this file, setup-rootfs.sh, overlay/, standin/); the debootstrap stage is cached separately,
keyed by the package list, so editing an entrypoint does not download Debian again.
Needs root (debootstrap, chroot) and the packages in scripts/deps/apt-images.txt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "postgresql-15", "postgresql-client-15", "pgbouncer",
    "redis-server", "redis-tools",
    "nginx-light", "gettext-base",  # envsubst, as the official nginx image's template step
    "squid", "ssl-cert",  # make-ssl-cert: Dify's ssrf_proxy entrypoint regenerates a snakeoil cert
    "python3", "python3-psycopg2", "python3-redis", "python3-psutil",
    "curl", "wget", "procps", "ca-certificates",
]
PG_BIN = "/usr/lib/postgresql/15/bin"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STANDIN = "/opt/dify-standin/dify_standin.py"
PRUNE_AFTER_S = 24 * 3600  # other recipes' tarballs and rootfs go once nobody built them for this long
LAYER_EPOCH = 1_700_000_000  # fixed mtime of the archive's own members (not of rootfs files)
SHARED_ENV = ["LANG=C.UTF-8", "EDGEFIT_TEST_IMAGE=1"]


def _standin(role: str, port: int, health: str, user: str) -> dict:
    return {
        "entrypoint": ["python3", STANDIN],  # no -I/-S: a sitecustomize.py on PYTHONPATH runs
        "cmd": [],
        "env": [f"PATH={BASE_PATH}", f"STANDIN_ROLE={role}", "PYTHONUNBUFFERED=1"],
        "user": user,
        "workdir": "/app/api" if role == "api" else "/app",
        "ports": [port],
        "health": ["curl", "-fsS", f"http://127.0.0.1:{port}{health}"],
    }


# tag -> config. "service" is the key edgefit uses in host data `images = {...}`.
IMAGES: dict[str, dict] = {
    "edgefit-test/postgres:15": {
        "stands_for": "postgres:15 / pgvector/pgvector:*-pg15 (Debian-based; no pgvector extension here)",
        "services": ["db"],
        "entrypoint": ["docker-entrypoint.sh"], "cmd": ["postgres"],
        "env": [f"PATH=/opt/edgefit-images/postgres/bin:{PG_BIN}:{BASE_PATH}", "PG_MAJOR=15",
                "PGDATA=/var/lib/postgresql/data"],
        "user": "", "workdir": "/", "ports": [5432], "volumes": ["/var/lib/postgresql/data"],
        "stop_signal": "SIGINT", "run_as_uid": 999,
        "health": ["pg_isready", "-h", "127.0.0.1", "-U", "postgres"],
    },
    "edgefit-test/pgbouncer:1.18": {
        "stands_for": "edoburu/pgbouncer (PgBouncer 1.18 from Debian, not 1.24)",
        "services": ["pgbouncer"],
        "entrypoint": ["/entrypoint.sh"], "cmd": ["/usr/bin/pgbouncer", "/etc/pgbouncer/pgbouncer.ini"],
        "env": [f"PATH={PG_BIN}:{BASE_PATH}"],
        "user": "70:70", "workdir": "/", "ports": [5432, 6432], "run_as_uid": 70,
        "health": ["pg_isready", "-h", "127.0.0.1", "-p", "6432"],
    },
    "edgefit-test/redis:7.0": {
        "stands_for": "redis:7 (Redis 7.0 from Debian)",
        "services": ["redis", "redis_broker"],
        "entrypoint": ["docker-entrypoint.sh"], "cmd": ["redis-server"],
        "env": [f"PATH=/opt/edgefit-images/redis/bin:{BASE_PATH}"],
        "user": "", "workdir": "/data", "ports": [6379], "volumes": ["/data"], "run_as_uid": 999,
        "health": ["redis-cli", "-h", "127.0.0.1", "ping"],
    },
    "edgefit-test/nginx:1.22": {
        "stands_for": "nginx (nginx-light 1.22 from Debian)",
        "services": ["nginx"],
        "entrypoint": ["/docker-entrypoint.sh"], "cmd": ["nginx", "-g", "daemon off;"],
        "env": [f"PATH={BASE_PATH}"],
        "user": "", "workdir": "/", "ports": [80], "stop_signal": "SIGQUIT", "run_as_uid": 0,
        "health": ["curl", "-fsS", "http://127.0.0.1/"],
    },
    "edgefit-test/squid:5.7": {
        "stands_for": "ubuntu/squid (squid 5.7 from Debian)",
        "services": ["ssrf_proxy"],
        "entrypoint": ["/usr/local/bin/entrypoint.sh"], "cmd": ["-f", "/etc/squid/squid.conf", "-NYC"],
        "env": [f"PATH={BASE_PATH}"],
        "user": "", "workdir": "/", "ports": [3128], "run_as_uid": 0,
        # squid has no health endpoint of its own: a proxied request to a closed loopback
        # port gets squid's own error page (an HTTP status) only when squid answers.
        "health": ["sh", "-c", "curl -s -o /dev/null -w '%{http_code}' -x http://127.0.0.1:3128 "
                               "http://127.0.0.1:1/ | grep -qE '^[1-5][0-9][0-9]$'"],
    },
    "edgefit-test/dify-api-standin:1": {
        "stands_for": "langgenius/dify-api (api, worker, beat by MODE) - STAND-IN, not Dify",
        "services": ["api", "worker", "worker_beat"], "run_as_uid": 1001,
        **_standin("api", 5001, "/health", "1001:1001"),
    },
    "edgefit-test/dify-web-standin:1": {
        "stands_for": "langgenius/dify-web - STAND-IN, not Dify",
        "services": ["web"], "run_as_uid": 1001,
        **_standin("web", 3000, "/", "1001:1001"),
    },
    "edgefit-test/dify-sandbox-standin:1": {
        "stands_for": "langgenius/dify-sandbox - STAND-IN, not Dify",
        "services": ["sandbox"], "run_as_uid": 0,
        **_standin("sandbox", 8194, "/health", ""),
    },
    "edgefit-test/dify-plugin-daemon-standin:1": {
        "stands_for": "langgenius/dify-plugin-daemon - STAND-IN, not Dify",
        "services": ["plugin_daemon"], "run_as_uid": 0,
        **_standin("plugin_daemon", 5002, "/health/check", ""),
    },
}


# Stand-in "releases" of Dify's api image, to prove upgrades (tests/test_upgrade_vm.py): the same
# layer with STANDIN_RELEASE set. 2 migrates the schema and serves; 3-broken migrates and then
# fails its healthcheck. Loaded with the others, but no service uses them by default.
RELEASES: dict[str, dict] = {
    f"edgefit-test/dify-api-standin:{name}": {
        **IMAGES["edgefit-test/dify-api-standin:1"],
        "stands_for": f"langgenius/dify-api, a {'broken ' if 'broken' in name else ''}newer release - STAND-IN, not Dify",
        "env": IMAGES["edgefit-test/dify-api-standin:1"]["env"] + [f"STANDIN_RELEASE={name}"],
    }
    for name in ("2", "3-broken")
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the tarball: cache_dir itself when given, else
    ${EDGEFIT_CACHE:-$HOME/.cache/edgefit}/images."""
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("EDGEFIT_CACHE") or Path.home() / ".cache" / "edgefit"
    return Path(base) / "images"


def recipe_files() -> list[Path]:
    files = [HERE / "build.py", HERE / "setup-rootfs.sh", HERE / "standin" / "dify_standin.py"]
    files += sorted(p for p in (HERE / "overlay").rglob("*") if p.is_file() or p.is_symlink())
    return files


def recipe_hash() -> str:
    h = hashlib.sha256()
    for path in recipe_files():
        rel = path.relative_to(HERE).as_posix()
        h.update(f"{rel}\0{os.access(path, os.X_OK)}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def base_key() -> str:
    recipe = json.dumps({"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "packages": sorted(PACKAGES)})
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _run(cmd: list[str], log: Path | None = None, **kw) -> None:
    if log is None:
        subprocess.run(cmd, check=True, **kw)
        return
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def ensure_base_rootfs(root: Path, say=print) -> Path:
    """The debootstrap'd rootfs, as Debian installed it (cached by package list)."""
    base = root / f"base-{base_key()}"
    if (base / "complete").exists():
        return base / "rootfs"
    if os.geteuid() != 0:
        raise PermissionError("building the test images needs root (debootstrap, chroot)")
    if not shutil.which("debootstrap"):
        raise FileNotFoundError("debootstrap not found: install scripts/deps/apt-images.txt (scripts/setup)")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    say(f"debootstrap {SUITE} with {len(PACKAGES)} packages into {base}/rootfs (about a minute)")
    t0 = time.monotonic()
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
          str(base / "rootfs"), MIRROR], log=base / "debootstrap.log")
    (base / "complete").write_text(f"{time.monotonic() - t0:.1f}\n")
    return base / "rootfs"


def prepare_rootfs(base_rootfs: Path, rootfs: Path, log: Path) -> None:
    """A copy of the base rootfs with the overlay, the stand-in and setup-rootfs.sh applied."""
    shutil.rmtree(rootfs, ignore_errors=True)
    _run(["cp", "-a", "--reflink=auto", str(base_rootfs), str(rootfs)])
    _run(["cp", "-a", "--no-preserve=ownership", f"{HERE / 'overlay'}/.", str(rootfs)])
    (rootfs / "opt" / "dify-standin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "standin" / "dify_standin.py", rootfs / STANDIN.lstrip("/"))
    shutil.copy2(HERE / "setup-rootfs.sh", rootfs / "tmp" / "setup-rootfs.sh")
    _run(["chroot", str(rootfs), "/bin/bash", "/tmp/setup-rootfs.sh"], log=log,
         env={"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
    (rootfs / "tmp" / "setup-rootfs.sh").unlink()


def write_layer(rootfs: Path, layer_path: Path) -> tuple[str, int]:
    """The rootfs as one uncompressed layer tar; returns (sha256 hex, size)."""
    names = sorted(p.name for p in rootfs.iterdir())
    # Docker mounts its own /dev, /proc, /sys; device nodes and temp files stay out.
    _run(["tar", "-C", str(rootfs), "-cf", str(layer_path), "--numeric-owner", "--sort=name",
          "--exclude=dev/*", "--exclude=proc/*", "--exclude=sys/*", "--exclude=tmp/*",
          "--exclude=var/tmp/*", *names])
    h = hashlib.sha256()
    with open(layer_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), layer_path.stat().st_size


def image_config(tag: str, spec: dict, diff_id: str, created: str) -> dict:
    config = {
        "Env": spec["env"] + SHARED_ENV,
        "Entrypoint": spec["entrypoint"],
        "Cmd": spec["cmd"] or None,
        "User": spec["user"],
        "WorkingDir": spec["workdir"],
        "ExposedPorts": {f"{p}/tcp": {} for p in spec["ports"]},
        "Labels": {
            "io.edgefit.test-image": "true",
            "io.edgefit.stands-for": spec["stands_for"],
            "org.opencontainers.image.description": f"edgefit TEST image {tag}: Debian 12 packages; NOT an upstream image",
        },
    }
    if spec.get("volumes"):
        config["Volumes"] = {v: {} for v in spec["volumes"]}
    if spec.get("stop_signal"):
        config["StopSignal"] = spec["stop_signal"]
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": "edgefit tests/images/build.py (debootstrap bookworm)"}],
    }


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), LAYER_EPOCH, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(layer_path: Path, diff_id: str, out: Path, images: dict[str, dict] | None = None,
                  created: str = "2024-01-01T00:00:00Z", compresslevel: int = 6) -> dict[str, str]:
    """A `docker load` archive (classic `docker save` layout) in which every image of
    `images` has the one layer at layer_path. Returns {tag: image id}."""
    images = IMAGES if images is None else images
    layer_dir = diff_id  # one layer: its directory name only has to be unique in the archive
    manifest, repositories, ids, configs = [], {}, {}, {}
    for tag, spec in images.items():
        blob = json.dumps(image_config(tag, spec, diff_id, created), sort_keys=True,
                          separators=(",", ":")).encode()
        image_id = hashlib.sha256(blob).hexdigest()
        configs[f"{image_id}.json"] = blob
        ids[tag] = image_id
        manifest.append({"Config": f"{image_id}.json", "RepoTags": [tag], "Layers": [f"{layer_dir}/layer.tar"]})
        repo, version = tag.rsplit(":", 1)
        repositories.setdefault(repo, {})[version] = layer_dir
    legacy_json = json.dumps({"id": layer_dir, "created": created, "os": "linux", "architecture": "amd64"}).encode()
    tmp = out.with_name(out.name + ".part")
    # gzip.GzipFile with mtime=0 keeps the compressed bytes a function of the content only.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dir_info = tarfile.TarInfo(layer_dir)
        dir_info.type, dir_info.mode, dir_info.mtime = tarfile.DIRTYPE, 0o755, LAYER_EPOCH
        tar.addfile(dir_info)
        _add_bytes(tar, f"{layer_dir}/VERSION", b"1.0")
        _add_bytes(tar, f"{layer_dir}/json", legacy_json)
        info = tarfile.TarInfo(f"{layer_dir}/layer.tar")
        info.size, info.mtime, info.mode = layer_path.stat().st_size, LAYER_EPOCH, 0o644
        with open(layer_path, "rb") as f:
            tar.addfile(info, f)
        for name, blob in configs.items():
            _add_bytes(tar, name, blob)
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
        _add_bytes(tar, "repositories", json.dumps(repositories).encode())
    tmp.replace(out)
    return ids


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tarball_path(cache_dir=None) -> Path:
    """Where the tarball for the current recipe is (or will be) cached."""
    return cache_root(cache_dir) / f"edgefit-test-images-{recipe_hash()[:16]}.tar.gz"


def rootfs_path(cache_dir=None) -> Path:
    """The prepared rootfs the current tarball was made from (kept for chroot checks)."""
    return cache_root(cache_dir) / f"rootfs-{recipe_hash()[:16]}"


def build_images(cache_dir: str | os.PathLike | None = None, say=print) -> Path:
    """Build (or reuse) the `docker load` tarball of every edgefit-test image; returns its path.
    A manifest JSON with the tags and per-service image info lies beside it (same name, .json)."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = recipe_hash()[:16]
    out = root / f"edgefit-test-images-{key}.tar.gz"
    info_path = out.with_suffix("").with_suffix(".json")
    if out.exists() and info_path.exists():
        return out
    t0 = time.monotonic()
    base_rootfs = ensure_base_rootfs(root, say)
    t_base = time.monotonic() - t0
    work = root / f"work-{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rootfs = work / "rootfs"
    say(f"preparing rootfs {rootfs}")
    prepare_rootfs(base_rootfs, rootfs, work / "setup.log")
    say("writing the layer")
    layer = work / "layer.tar"
    diff_id, layer_size = write_layer(rootfs, layer)
    say(f"layer sha256:{diff_id} {layer_size / 2**20:.0f} MiB; compressing the archive")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ids = write_archive(layer, diff_id, out, images={**IMAGES, **RELEASES}, created=created)
    seconds = time.monotonic() - t0
    by_service = {}
    for tag, spec in IMAGES.items():
        for service in spec["services"]:
            by_service[service] = tag
    info = {
        "tarball": out.name,
        "tarball_sha256": _file_sha256(out),
        "tarball_bytes": out.stat().st_size,
        "recipe_hash": recipe_hash(),
        "built_at": created,
        "build_seconds": round(seconds, 1),
        "debootstrap_seconds": round(t_base, 1),
        "layer": {"diff_id": f"sha256:{diff_id}", "uncompressed_bytes": layer_size},
        "load_command": f"ssh root@HOST docker load < {out}",
        # Host data for the test VMs: edgefit's `images = {...}` overrides, service -> tag.
        "images_by_service": by_service,
        "images": {
            tag: {
                "image_id": f"sha256:{ids[tag]}",
                "stands_for": spec["stands_for"],
                "services": spec["services"],
                "entrypoint": spec["entrypoint"],
                "cmd": spec["cmd"],
                "user": spec["user"],
                "run_as_uid": spec["run_as_uid"],
                "workdir": spec["workdir"],
                "ports": spec["ports"],
                "health": spec["health"],
            }
            for tag, spec in {**IMAGES, **RELEASES}.items()
        },
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    layer.unlink()
    # Keep the prepared rootfs of the newest build (chroot checks in tests/test_images.py);
    # older rootfs and tarballs of other recipes go once stale.
    keep = root / f"rootfs-{key}"
    shutil.rmtree(keep, ignore_errors=True)
    rootfs.rename(keep)
    (work / "setup.log").rename(root / f"setup-{key}.log")
    shutil.rmtree(work, ignore_errors=True)
    # Only what nobody built for a day: another checkout sharing this cache (a worktree, a
    # second clone) may be deploying its own tarball right now.
    stale_before = time.time() - PRUNE_AFTER_S
    for old in root.iterdir():
        if old.name.startswith(("rootfs-", "edgefit-test-images-", "work-", "setup-")) and key not in old.name \
                and old.stat().st_mtime < stale_before:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    latest = root / "latest.json"
    latest.write_text(json.dumps({"tarball": str(out), "manifest": str(info_path)}) + "\n")
    say(f"built {out} ({out.stat().st_size / 2**20:.0f} MiB compressed, layer {layer_size / 2**20:.0f} MiB) in {seconds:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for the tarball and its caches (default ${EDGEFIT_CACHE:-~/.cache/edgefit}/images)")
    args = parser.parse_args(argv)
    path = build_images(args.out, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
