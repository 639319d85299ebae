"""The Vagrantfile and tests/vm/config.py describe the same hosts (no VM needed)."""
import re

from tests.vm import config


def test_vagrantfile_hosts_match_config():
    vagrantfile = (config.REPO / "Vagrantfile").read_text()
    declared = {
        name: (int(cpus), int(memory))
        for name, cpus, memory in re.findall(r'"([\w-]+)"\s*=>\s*\{\s*cpus:\s*(\d+),\s*memory_mib:\s*(\d+)', vagrantfile)
    }
    assert declared == {h.name: (h.cpus, h.memory_mib) for h in config.HOSTS.values()}
    assert re.search(r"^DATA_DISK_GIB = (\d+)$", vagrantfile, re.M).group(1) == str(config.DATA_DISK_GIB)
    assert f'default_prefix = "{config.DOMAIN_PREFIX}"' in vagrantfile
    assert f'storage_pool_name = "{config.POOL_NAME}"' in vagrantfile
    assert f'management_network_name = "{config.MGMT_NETWORK}"' in vagrantfile


def test_box_key_changes_with_the_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "box"
    recipe.mkdir()
    (recipe / "build-box.sh").write_text("echo one\n")
    monkeypatch.setattr(config, "BOX_RECIPE_DIR", recipe)
    from tests.vm import box

    first = box.recipe_key()
    assert box.recipe_key() == first
    (recipe / "build-box.sh").write_text("echo two\n")
    assert box.recipe_key() != first
