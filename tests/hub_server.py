"""A stand-in Hugging Face hub on 127.0.0.1 for tests: a real HTTP server speaking the part of
the hub's API that the real `huggingface_hub` client calls (no hub is reachable here).

The client reaches it through `HF_ENDPOINT` (read when huggingface_hub is imported, so set it
in the environment of a subprocess). It serves:
- `GET /api/models/{repo}/revision/{rev}`: the commit sha and file list;
- `GET /api/models/{repo}/tree/{rev}`: files with sizes (LFS entries for the weights);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: ETag, X-Repo-Commit, Content-Length, Range;
- `GET /api/whoami-v2`: the account of a valid token (for `huggingface_hub.login`).

And misbehaves on purpose: a gated repo answers 401 with `X-Error-Code: GatedRepo` unless the
request carries VALID_TOKEN; `drop_once` files lose the connection half-way on their first
download; `rate_bps` sends slowly so progress moves; a repo's `advertised` sizes claim more
bytes than any disk has (the full-disk case, refused before the first byte).

Run by hand: `python tests/hub_server.py` serves a tiny model as studio-test/tiny-model.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

VALID_TOKEN = "hf_studioTestToken0123456789"
USER = "studio-tester"


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    advertised: dict[str, int] = field(default_factory=dict)  # sizes claimed in metadata

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        return h.hexdigest()

    def size(self, name: str) -> int:
        return self.advertised.get(name, len(self.files[name]))


def tiny_model_files(weight_bytes: int = 4 * 2**20, seed: int = 0) -> dict[str, bytes]:
    """A tiny Llama-shaped model's files: config.json and a real safetensors of random fp16
    weights (`weight_bytes` of them), so a download has something sizeable to move."""
    import numpy as np
    from safetensors.numpy import save

    hidden = 64
    rows = max(1, weight_bytes // (2 * hidden))
    rng = np.random.default_rng(seed)
    weights = {"model.embed_tokens.weight": rng.standard_normal((rows, hidden)).astype("float16")}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": rows,
        "tie_word_embeddings": True,
    }
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": b'{"do_sample": false}',
        "model.safetensors": save(weights),
        "README.md": b"not downloaded: not a model file",
    }


class HubServer:
    """The stand-in hub, serving in a thread: `with HubServer(repos) as hub: hub.url`."""

    def __init__(
        self,
        repos: dict[str, Repo],
        *,
        rate_bps: float | None = None,
        drop_once: set[tuple[str, str]] | None = None,
    ) -> None:
        self.repos = repos
        self.rate_bps = rate_bps
        self.drop_once = set(drop_once or ())
        self.requests: list[dict[str, str]] = []  # method, path, range, auth: for assertions
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def log(self, **entry: str) -> None:
        with self.lock:
            self.requests.append(entry)

    def take_drop(self, repo_id: str, name: str) -> bool:
        with self.lock:
            if (repo_id, name) in self.drop_once:
                self.drop_once.discard((repo_id, name))
                return True
            return False


_API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:  # quiet: tests read hub.requests
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            auth = self.headers.get("Authorization", "")
            hub.log(method=self.command, path=path, range=self.headers.get("Range", ""), auth=auth)
            if path == "/api/whoami-v2":
                return self._whoami(auth)
            api, resolve = _API.match(path), _RESOLVE.match(path)
            repo_id = (api or resolve).group(1) if (api or resolve) else ""
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if repo.gated and auth != f"Bearer {VALID_TOKEN}":
                msg = f"Access to model {repo_id} is restricted. You must have access to it."
                return self._error(401, "GatedRepo", msg)
            if api and api.group(2) == "revision":
                return self._json(_revision(repo_id, repo))
            if api:
                return self._json(_tree(repo))
            if resolve:
                return self._file(repo_id, repo, resolve.group(3), head)
            return self._error(404, "EntryNotFound", f"no route for {path}")

        def _whoami(self, auth: str) -> None:
            if auth != f"Bearer {VALID_TOKEN}":
                return self._error(401, "", "Invalid credentials in Authorization header")
            token = {"displayName": "studio-test", "role": "read"}
            self._json({"name": USER, "type": "user", "auth": {"accessToken": token}})

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _file(self, repo_id: str, repo: Repo, name: str, head: bool) -> None:
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} not in {repo_id}")
            data, size = repo.files[name], repo.size(name)
            start = _range_start(self.headers.get("Range", ""))
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{_etag(name, data)}"')
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if head:
                return
            body = data[start:]
            if not start and hub.take_drop(repo_id, name):
                self._send(body[: len(body) // 2])
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client must resume
                return
            self._send(body)

        def _send(self, body: bytes) -> None:
            piece = 64 * 1024
            try:
                for i in range(0, len(body), piece):
                    self.wfile.write(body[i : i + piece])
                    if hub.rate_bps:
                        time.sleep(piece / hub.rate_bps)
            except (BrokenPipeError, ConnectionResetError):  # the client cancelled
                self.close_connection = True

    return Handler


def _range_start(header: str) -> int:
    match = re.match(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else 0


def _etag(name: str, data: bytes) -> str:
    """LFS files (the weights) are named by their sha256 on the hub; others by a git sha1."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _revision(repo_id: str, repo: Repo) -> dict[str, object]:
    return {
        "id": repo_id,
        "modelId": repo_id,
        "sha": repo.sha,
        "private": False,
        "gated": "manual" if repo.gated else False,
        "siblings": [{"rfilename": name} for name in sorted(repo.files)],
    }


def _tree(repo: Repo) -> list[dict[str, object]]:
    entries = []
    for name in sorted(repo.files):
        data, size = repo.files[name], repo.size(name)
        entry: dict[str, object] = {"type": "file", "path": name, "size": size}
        entry["oid"] = hashlib.sha1(data).hexdigest()
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": _etag(name, data), "size": size, "pointerSize": 134}
        entries.append(entry)
    return entries


def standard_repos(weight_bytes: int = 4 * 2**20) -> dict[str, Repo]:
    """The repos the tests use: a public tiny model, a gated one, one too big for any disk."""
    files = tiny_model_files(weight_bytes)
    return {
        "studio-test/tiny-model": Repo(files),
        "studio-test/gated-model": Repo(tiny_model_files(weight_bytes // 4, seed=1), gated=True),
        "studio-test/huge-model": Repo(
            tiny_model_files(2**16, seed=2), advertised={"model.safetensors": 10**15}
        ),
    }


if __name__ == "__main__":
    with HubServer(standard_repos(), rate_bps=2 * 2**20) as server:
        print(f"HF_ENDPOINT={server.url}", flush=True)
        threading.Event().wait()
