"""The data disk: which disk counts as empty (edgefit.facts.BlockDevice, from real `blkid -p`
output) and the host-side guard before mkfs (roles.volumes.format_command)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from edgefit.facts import BlockDevice
from roles.volumes import format_command, mount_command

# Recorded `blkid -p -o export` output (util-linux 2.38) and its exit status, as the fact's
# command prints them.
EXT4 = ["DEVNAME=/dev/vdb", "UUID=a2bf3466-e9d4-4792-ac56-472bdd2dfd96", "VERSION=1.0", "BLOCK_SIZE=4096",
        "TYPE=ext4", "USAGE=filesystem", "probe_status=0"]
LUKS = ["DEVNAME=/dev/vdb", "VERSION=1", "UUID=0b9a2d4e-1f6c-4c1e-9a4f-3d2b1c0a9e8f", "TYPE=crypto_LUKS",
        "USAGE=crypto", "probe_status=0"]
MBR = ["DEVNAME=/dev/vdb", "PTUUID=78563412", "PTTYPE=dos", "probe_status=0"]
RAID = ["DEVNAME=/dev/vdb", "UUID=3c1f0d3a-5a3b-8e4a-1a7c-2b9f3e4d5c6a", "TYPE=linux_raid_member",
        "USAGE=raid", "probe_status=0"]
NOTHING = ["probe_status=2"]
AMBIVALENT = ["probe_status=8"]  # more than one signature: blkid prints no TYPE
UNREADABLE = ["probe_status=unreadable"]


def processed(probe: list[str], mountpoint: str = "") -> dict:
    return BlockDevice().process(["exists=yes", "size_bytes=42949672960", *probe, f"mountpoint={mountpoint}"])


def test_only_a_disk_without_any_signature_is_empty():
    device = processed(NOTHING)
    assert device == {"exists": True, "size_gib": 40, "empty": True, "fstype": None, "signature": None,
                      "uuid": None, "mountpoint": None}


def test_a_filesystem_is_not_empty_and_has_its_type():
    device = processed(EXT4, "/srv/dify")
    assert (device["empty"], device["fstype"], device["uuid"], device["mountpoint"]) == (
        False, "ext4", "a2bf3466-e9d4-4792-ac56-472bdd2dfd96", "/srv/dify")


@pytest.mark.parametrize("probe,signature", [(LUKS, "crypto_LUKS"), (MBR, "dos"), (RAID, "linux_raid_member")])
def test_luks_partition_tables_and_raid_are_not_empty_and_not_a_filesystem(probe, signature):
    device = processed(probe)
    assert device["empty"] is False and device["fstype"] is None
    assert device["signature"] == signature


@pytest.mark.parametrize("probe", [AMBIVALENT, UNREADABLE, []])
def test_a_disk_the_probe_could_not_judge_is_not_empty(probe):
    device = processed(probe)
    assert device["empty"] is False and device["fstype"] is None and device["signature"]


def test_a_missing_disk():
    assert BlockDevice().process(["exists=no"]) == {"exists": False}


def test_the_fact_uses_the_low_level_probe_and_its_exit_status():
    command = BlockDevice().command("/dev/vdb")
    assert "blkid -p -o export /dev/vdb" in command and "probe_status=$?" in command
    assert "'/dev/x y'" in BlockDevice().command("/dev/x y")


# Real blkid on image files: the parser reads what blkid really prints.

def _image(tmp_path: Path, name: str, header: bytes = b"") -> Path:
    path = tmp_path / name
    path.write_bytes(header.ljust(8 * 1024 * 1024, b"\0"))
    return path


def _luks1_header() -> bytes:
    return (b"LUKS\xba\xbe" + struct.pack(">H", 1) + b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0")
            + b"sha256".ljust(32, b"\0") + struct.pack(">II", 4096, 64) + b"\0" * 52 + struct.pack(">I", 1000)
            + b"0b9a2d4e-1f6c-4c1e-9a4f-3d2b1c0a9e8f".ljust(40, b"\0"))


def _mbr() -> bytes:
    sector = bytearray(512)
    sector[440:444] = b"\x12\x34\x56\x78"
    sector[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 10000)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _probe(path: Path) -> list[str]:
    blkid = shutil.which("blkid") or "/usr/sbin/blkid"
    result = subprocess.run([blkid, "-p", "-o", "export", str(path)], capture_output=True, text=True)
    return [*result.stdout.splitlines(), f"probe_status={result.returncode}"]


@pytest.mark.skipif(not (shutil.which("blkid") or os.path.exists("/usr/sbin/blkid")), reason="util-linux blkid")
def test_real_blkid_output(tmp_path):
    assert processed(_probe(_image(tmp_path, "zeros")))["empty"] is True
    luks = processed(_probe(_image(tmp_path, "luks", _luks1_header())))
    assert (luks["empty"], luks["fstype"], luks["signature"]) == (False, None, "crypto_LUKS")
    mbr = processed(_probe(_image(tmp_path, "mbr", _mbr())))
    assert (mbr["empty"], mbr["fstype"], mbr["signature"]) == (False, None, "dos")
    # the old check, `test -z "$(blkid -o value -s TYPE DEV)"`, found no TYPE on the partition
    # table and would have formatted it
    plain = subprocess.run([shutil.which("blkid") or "/usr/sbin/blkid", "-o", "value", "-s", "TYPE",
                            str(tmp_path / "mbr")], capture_output=True, text=True)
    assert plain.stdout.strip() == ""


# The guard on the host, run with stand-ins for blkid and mkfs.ext4.

@pytest.mark.parametrize("blkid_status,formats", [(2, True), (0, False), (8, False), (4, False)])
def test_format_runs_only_when_blkid_p_finds_nothing(tmp_path, blkid_status, formats):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "blkid").write_text(f"#!/bin/sh\ntest \"$1\" = -p || exit 99\nexit {blkid_status}\n")
    (bin_dir / "mkfs.ext4").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/formatted\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", f"set -e; {format_command('/dev/vdb')}"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "formatted").exists() is formats
    if formats:
        assert (tmp_path / "formatted").read_text().split()[-1] == "/dev/vdb"


def test_mount_command_formats_only_when_asked_and_quotes_its_values():
    assert "mkfs" not in mount_command("/dev/vdb", "/srv/dify", False)
    command = mount_command("/dev/vdb", "/srv/dify", True)
    assert command.index("blkid -p /dev/vdb") < command.index("mkfs.ext4")
    odd = mount_command("/dev/x y", "/srv/a b", True)
    assert "'/dev/x y'" in odd and "'/srv/a b'" in odd and " /srv/a b " not in odd
