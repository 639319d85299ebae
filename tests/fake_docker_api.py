"""A stand-in for the Docker daemon's API on a unix socket, for the sampler's socket transport:
GET /containers/json, /containers/{id}/json, /images/json and /events, and exec (POST
/containers/{id}/exec, POST /exec/{id}/start with docker's multiplexed stream, GET
/exec/{id}/json), answered from the same JSON state file tests/fake_docker.py reads (written by
tests/fake_host.py). Counts the requests it served."""
from __future__ import annotations

import itertools
import json
import socketserver
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.fake_exec import exec_answer


class FakeDockerAPI:
    def __init__(self, socket_path: Path, state_path: Path):
        self.socket_path, self.state_path = socket_path, state_path
        self.requests: list[str] = []
        self.closing = threading.Event()  # set on exit: ends the delays and hangs it plays
        self.execs: dict[str, dict] = {}
        self.exec_ids = itertools.count(1)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                api.requests.append(url.path)
                state = json.loads(api.state_path.read_text())
                filters = json.loads(urllib.parse.parse_qs(url.query).get("filters", ["{}"])[0])
                if state.get("docker_error"):
                    return self.reply(500, {"message": state["docker_error"]})
                if url.path == "/containers/json":
                    wanted = set(filters.get("label", []))
                    found = [{"Id": c["Id"], "Labels": c["Config"].get("Labels") or {}} for c in state["containers"]
                             if wanted <= {f"{k}={v}" for k, v in (c["Config"].get("Labels") or {}).items()}]
                    return self.reply(200, found)
                if url.path.startswith("/containers/") and url.path.endswith("/json"):
                    container_id = url.path.split("/")[2]
                    inspects = sum(1 for p in api.requests if p == url.path)
                    if inspects <= state.get("inspect_delayed_times", 1) and \
                            container_id in state.get("inspect_first_delay", {}):
                        api.closing.wait(state["inspect_first_delay"][container_id])  # busy: restarting
                    views = state["containers"] if inspects == 1 else state.get("containers_end", state["containers"])
                    match = [c for c in views if c["Id"] == container_id]
                    return self.reply(200, match[0]) if match else self.reply(404, {"message": "No such container"})
                if url.path.startswith("/exec/") and url.path.endswith("/json"):
                    run = api.execs.get(url.path.split("/")[2])
                    return self.reply(200, {"ExitCode": run["code"], "Running": run["code"] is None}) if run \
                        else self.reply(404, {"message": "No such exec instance"})
                if url.path == "/images/json":
                    return self.reply(200, [{"RepoTags": [image["tag"]],
                                             "RepoDigests": [f"{image['tag'].rpartition(':')[0]}@{image['digest']}"]
                                             if image.get("digest") else []} for image in state.get("images", [])])
                if url.path == "/events":
                    body = "".join(json.dumps(event) + "\n" for event in state.get("events", []))
                    return self.reply(200, body)
                return self.reply(404, {"message": "page not found"})

            def do_POST(self):
                url = urllib.parse.urlparse(self.path)
                api.requests.append(f"POST {url.path}")
                state = json.loads(api.state_path.read_text())
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                parts = url.path.strip("/").split("/")
                if parts[0] == "containers" and parts[-1] == "exec":
                    if not any(c["Id"] == parts[1] for c in state["containers"]):
                        return self.reply(404, {"message": f"No such container: {parts[1]}"})
                    exec_id = f"exec{next(api.exec_ids)}"
                    api.execs[exec_id] = {"container": parts[1], "argv": payload["Cmd"], "code": None}
                    return self.reply(201, {"Id": exec_id})
                if parts[0] == "exec" and parts[-1] == "start" and parts[1] in api.execs:
                    run = api.execs[parts[1]]
                    code, out, err = exec_answer(state, run["container"], run["argv"], sleep=api.closing.wait)
                    run["code"] = code
                    stream = b"".join(bytes([kind, 0, 0, 0]) + len(data).to_bytes(4, "big") + data
                                      for kind, data in ((1, out.encode()), (2, err.encode())) if data)
                    # as dockerd: the connection is hijacked, the stream has no length, then it closes
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n"
                                     + stream)
                    self.close_connection = True
                    return None
                return self.reply(404, {"message": "page not found"})

            def reply(self, status: int, payload) -> None:
                body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except BrokenPipeError:
                    pass  # the sampler gave up waiting (a delayed inspect): as dockerd, answer no one

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            # server_close() joins every handler: no thread of this fake outlives its test (one
            # left sleeping in a hanging exec broke a later test's gevent patching of threading)
            daemon_threads = False
            block_on_close = True

        self.server = Server(str(socket_path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeDockerAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
