"""Small helpers the roles share: uploading a rendered file, and 'did any of these change'."""

from io import StringIO

from pyinfra.operations import files, server

from edgefit.render import StackFile


def upload(stack_file: StackFile):
    """Upload one rendered file; pyinfra compares checksums, so an unchanged file is no change.

    Ownership is set by uid after the upload (and only when the file changed), because
    pyinfra compares owners by name and a container's uid often has no name on the host.
    """
    dest = stack_file.dest
    put = files.put(
        name=f"Upload {dest}",
        src=StringIO(stack_file.content),
        dest=dest,
        mode=f"{stack_file.mode:o}",
    )
    if stack_file.owner_uid:
        server.shell(
            name=f"Owner of {dest}: uid {stack_file.owner_uid}",
            commands=[f"chown {stack_file.owner_uid}:{stack_file.owner_uid} {dest}"],
            _if=put.did_change,
        )
    return put


def any_changed(*operations):
    """A condition for _if=: true at execution time when any of the operations changed."""
    return lambda: any(operation.did_change() for operation in operations)

