"""Deploy data for the Vagrant test hosts (inventory/vagrant.py): an air-gapped host with a
private registry, as a user would set it up.

The guests reach nothing beyond their SSH port, so every image comes from one `docker load`
tarball built here from Debian packages (tests/images/build.py; `scripts/demo` and the VM tests
build it), and host data points each service at its test image. The box already holds the images
of release 1 (tests/vm/preload.py), as a host an operator pre-loaded would: the deploy finds them
and loads nothing; an upgrade to another release uploads the tarball and loads what is missing. Dify's own images are stood in
for by tests/images/standin/ (clearly named *-standin); production defaults stay the pinned
upstream images of edgefit/images.py.
"""

import json

from tests.images.build import cache_root, recipe_hash

# The tarball of the current recipe (build_images() names it so).
_tarball = cache_root() / f"edgefit-test-images-{recipe_hash()[:16]}.tar.gz"
_manifest = _tarball.with_suffix("").with_suffix(".json")

edgefit_image_tarball = str(_tarball)
edgefit_images = json.loads(_manifest.read_text())["images_by_service"] if _manifest.exists() else {}
edgefit_docker_source = "preinstalled"  # the box has Debian's docker.io; the guest has no apt access
# The second virtual disk of each test host; empty on a fresh VM, so formatting is allowed.
edgefit_data_disk = "/dev/vdb"
edgefit_data_disk_format = True
# Software emulation is slow: api's first start alone can take minutes.
edgefit_health_timeout = 1500
