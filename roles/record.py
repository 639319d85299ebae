"""Role "record": the plan of record goes up last, once the stack it describes is up.

/etc/edgefit/plan.json (rendered by render.py: the plan, and the sha256 of every file the
deploy placed; no secret value) is what `edgefit verify`, the verify timer and the tests judge
the host by. Written only after every earlier operation on the host succeeded, so it never
describes a deploy that stopped halfway.
"""

from pyinfra.api import deploy
from pyinfra.operations import files

from edgefit.render import PLAN_OF_RECORD, StackFile, file_at
from roles.common import upload


@deploy("Plan of record")
def record_plan(rendered: list[StackFile]) -> None:
    files.directory(name="Directory /etc/edgefit", path="/etc/edgefit", mode="700")
    upload(file_at(rendered, PLAN_OF_RECORD))
