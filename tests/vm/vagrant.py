"""Running vagrant for the local box: inside the namespace, with the harness's environment."""
from __future__ import annotations

import os
from typing import Callable

from . import config
from .netns import netns_exec
from .proc import run


def vagrant_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EDGEFIT_BOX="local",
        EDGEFIT_CACHE=str(config.cache_dir()),
        VAGRANT_HOME=str(config.vagrant_home()),
        VAGRANT_DEFAULT_PROVIDER="libvirt",
        VAGRANT_CHECKPOINT_DISABLE="1",  # no version check over the network
        VAGRANT_BOX_UPDATE_CHECK_DISABLE="1",
        VAGRANT_NO_COLOR="1",
    )
    return env


def quiet_progress() -> Callable[[str], bool]:
    """vagrant prints a line per upload percent, many times over: keep each quarter once."""
    shown: set[str] = set()

    def echo(line: str) -> bool:
        if "Progress:" not in line:
            return True
        percent = line.rsplit("Progress:", 1)[1].strip().rstrip("%")
        if percent in {"0", "25", "50", "75", "100"} and percent not in shown:
            shown.add(percent)
            return True
        return False

    return echo


def vagrant(*args: str, timeout: float, echo: Callable[[str], bool] | None = None, check: bool = True) -> str:
    return run(netns_exec("vagrant", *args), timeout=timeout, label="vagrant", env=vagrant_env(),
               cwd=config.REPO, echo=echo or quiet_progress(), check=check)
