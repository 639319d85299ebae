"""Role "record": the plan of record goes up last, once the stack it describes is up.

/etc/edgefit/plan.json (rendered by render.py: the plan, and the sha256 of every file the
deploy placed; no secret value) is what `edgefit verify`, the verify timer and the tests judge
the host by. Written only after every earlier operation on the host succeeded, so it never
describes a deploy that stopped halfway.
"""

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import files

from edgefit.converge import Changes


@deploy("Plan of record")
def record_plan(changes: Changes) -> None:
    if changes.record:
        files.put(name=f"Plan of record {changes.record.dest}", src=StringIO(changes.record.content),
                  dest=changes.record.dest, mode=f"{changes.record.mode:o}")
