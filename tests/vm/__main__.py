"""scripts/vm: bring the test hosts up and down.

    scripts/vm up [HOST...]     build/reuse the box, boot the hosts (default edge-small)
    scripts/vm down             destroy the hosts, stop the daemons, remove the namespace
    scripts/vm status           what is up, and whether it answers SSH
    scripts/vm ssh HOST [CMD]   a shell or command on a host
    scripts/vm vagrant ARGS...  any vagrant command with the local box, inside the namespace
"""
from __future__ import annotations

import argparse
import os
import sys

from . import config, harness
from .proc import CommandFailed
from .ssh import ssh_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="boot test hosts")
    up.add_argument("hosts", nargs="*", metavar="HOST", help=f"one of {', '.join(config.HOSTS)}")
    up.add_argument("--wait-docker", action="store_true", help="also wait until Docker answers")
    commands.add_parser("down", help="destroy everything up started")
    commands.add_parser("status", help="show what is up")
    ssh = commands.add_parser("ssh", help="ssh to a host")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    passthrough = commands.add_parser("vagrant", help="run vagrant with the local box in the namespace")
    passthrough.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, libvirtd)")
    try:
        if args.command == "up":
            hosts = harness.up(args.hosts, wait_for_docker=args.wait_docker)
            for name, entry in hosts.items():
                print(f"{name}: ssh -p {entry['ssh_port']} -i {entry['ssh_key']} root@127.0.0.1")
            print(f"pyinfra inventory: inventory/vagrant.py (hosts in {config.hosts_file()})")
            return 0
        if args.command == "down":
            harness.down()
            return 0
        if args.command == "status":
            return harness.status()
        if args.command == "ssh":
            entry = harness.read_hosts().get(args.host)
            if entry is None:
                parser.error(f"{args.host} is not up (scripts/vm up {args.host})")
            cmd = ssh_command(entry, " ".join(args.cmd))
            if not args.cmd:  # an interactive shell
                cmd = [cmd[0], "-t", *cmd[1:-1]]
            os.execvp(cmd[0], cmd)
        if args.command == "vagrant":
            from .netns import netns_exec
            from .vagrant import vagrant_env

            os.chdir(config.REPO)
            cmd = netns_exec("vagrant", *args.args)
            os.execvpe(cmd[0], cmd, vagrant_env())
    except (CommandFailed, TimeoutError, RuntimeError) as err:
        print(f"scripts/vm {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
