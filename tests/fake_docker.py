"""A stand-in for the `docker` command in verify's tests: answers ps, inspect, exec and events
from the JSON state file named by its first argument (written by tests/fake_host.py)."""
import json, os, sys
state_path = sys.argv[1]
args = sys.argv[2:]
state = json.load(open(state_path))
if state.get("docker_error"):
    print(state["docker_error"], file=sys.stderr)
    sys.exit(1)
command = args[0]
if command == "ps":  # --format '{{.ID}} {{.Label "com.docker.compose.service"}}'
    print("\n".join(f'{c["Id"]} {(c["Config"].get("Labels") or {}).get("com.docker.compose.service", "")}'
                    for c in state["containers"]))
elif command == "inspect":
    counter = state_path + ".inspects"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    if n == 0 and state.get("inspect_first_error"):  # dockerd busy: the CLI gives up on all of them
        print(state["inspect_first_error"], file=sys.stderr)
        sys.exit(1)
    views = state["containers"] if n == 0 else state.get("containers_end", state["containers"])
    print(json.dumps([c for c in views if c["Id"] in args[1:]]))
elif command == "exec":
    from fake_exec import exec_answer  # beside this file
    code, out, err = exec_answer(state, args[1], args[2:])
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(code)
elif command == "images":  # --digests --format "{{.Repository}}:{{.Tag}} {{.Repository}}@{{.Digest}}"
    for image in state.get("images", []):
        repository, _, tag = image["tag"].rpartition(":")
        print(f"{repository}:{tag} {repository}@{image.get('digest') or '<none>'}")
elif command == "events":
    for event in state.get("events", []):
        print(json.dumps(event))
else:
    sys.exit(2)
