"""Role "place_files": every changed file goes up in one archive, unpacked in one step.

The archive carries each file's mode and owner (the uid its container reads it as); unpacked
with the extraction time as mtime, which is how the next deploy knows a service still has to be
restarted for it. A new compose definition leaves a marker that `docker compose up` removes.
"""

import hashlib
import io
import shlex
import tarfile

from pyinfra.api import deploy
from pyinfra.operations import files, server

from edgefit.converge import COMPOSE_DEFINITION, COMPOSE_UP_PENDING, Changes
from edgefit.render import StackFile

INCOMING_DIR = "/var/lib/edgefit"


def archive(stack_files: list[StackFile]) -> bytes:
    """A gzip'd tar of the files at their destinations (relative to /), deterministic."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for stack_file in sorted(stack_files, key=lambda f: f.dest):
            data = stack_file.content.encode()
            info = tarfile.TarInfo(stack_file.dest.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), stack_file.mode, 0
            info.uid = info.gid = stack_file.owner_uid or 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@deploy("Place changed files")
def place_files(changes: Changes) -> None:
    if not changes.upload:
        return
    payload = archive(changes.upload)
    remote = f"{INCOMING_DIR}/incoming-{hashlib.sha256(payload).hexdigest()[:16]}.tar.gz"
    files.put(name=f"Upload {len(changes.upload)} changed file(s) in one archive", src=io.BytesIO(payload),
              dest=remote, mode="600")
    steps = [f"tar -xzmf {shlex.quote(remote)} -C / --same-owner --same-permissions --numeric-owner --no-overwrite-dir"]
    if any(f.dest in COMPOSE_DEFINITION for f in changes.upload):
        steps.append(f"touch {COMPOSE_UP_PENDING}")
    steps.append(f"rm -f {shlex.quote(remote)}")
    server.shell(name=f"Place {changes.upload_names()}", commands=[" && ".join(steps)])
