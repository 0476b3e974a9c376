#!/usr/bin/env python3
"""A local stand-in for the Hugging Face hub, for the README's examples and for checking that
slm and Python's huggingface_hub share one cache. Serves folders or files as model repos with the
subset of the hub API both clients use: model info with siblings (blobId, LFS sha256/size),
`resolve/{rev}/{file}` (LFS files redirect to /cdn/{sha256} with X-Repo-Commit, X-Linked-Etag,
X-Linked-Size), HEAD and Range. The Rust tests use their own mock (crates/slm/tests/support).

    python tools/mock_hub.py --port 8765 \
        --repo sentence-transformers/all-MiniLM-L6-v2=../shared/assets/models/all-MiniLM-L6-v2
    HF_ENDPOINT=http://127.0.0.1:8765 slm pull sentence-transformers/all-MiniLM-L6-v2
"""
import argparse
import hashlib
import http.server
import json
import os
import re


def load_repo(path):
    files = {}
    if os.path.isfile(path):
        items = [(os.path.basename(path), path)]
    else:
        items = []
        for root, _, names in os.walk(path):
            for n in names:
                full = os.path.join(root, n)
                items.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    for name, full in sorted(items):
        data = open(full, "rb").read()
        lfs = len(data) > 1_000_000 or name.endswith((".safetensors", ".gguf", ".bin"))
        files[name] = {
            "data": data,
            "lfs": lfs,
            "sha256": hashlib.sha256(data).hexdigest(),
            "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        }
    commit = hashlib.sha1(("".join(f["oid"] for f in files.values())).encode()).hexdigest()
    return {"commit": commit, "files": files}


REPOS = {}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path} range={self.headers.get('Range')}", flush=True)

    def send(self, status, headers=(), body=b""):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0].replace("%2F", "/")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            repo = REPOS.get(m.group(1))
            if repo is None:
                return self.send(404, [("X-Error-Code", "RepoNotFound")])
            if m.group(2) not in ("main", repo["commit"]):
                return self.send(404, [("X-Error-Code", "RevisionNotFound")])
            siblings = []
            for name, f in repo["files"].items():
                s = {"rfilename": name, "size": len(f["data"]), "blobId": f["oid"]}
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": len(f["data"]), "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"id": m.group(1), "sha": repo["commit"], "siblings": siblings})
            return self.send(200, [("Content-Type", "application/json")], body.encode())
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if m:
            for repo in REPOS.values():
                for f in repo["files"].values():
                    if f["sha256"] == m.group(1):
                        return self.data(f["data"], [("ETag", f'"{f["sha256"]}"')])
            return self.send(404)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = REPOS.get(m.group(1))
            if repo is None:
                return self.send(404, [("X-Error-Code", "RepoNotFound")])
            if m.group(2) not in ("main", repo["commit"]):
                return self.send(404, [("X-Error-Code", "RevisionNotFound")])
            f = repo["files"].get(m.group(3))
            if f is None:
                return self.send(404, [("X-Error-Code", "EntryNotFound")])
            headers = [("X-Repo-Commit", repo["commit"])]
            if f["lfs"]:
                headers += [
                    ("X-Linked-Etag", f'"{f["sha256"]}"'),
                    ("X-Linked-Size", str(len(f["data"]))),
                    ("ETag", f'"{f["oid"]}"'),
                    ("Location", f"http://{self.headers['Host']}/cdn/{f['sha256']}"),
                ]
                return self.send(302, headers)
            return self.data(f["data"], headers + [("ETag", f'"{f["oid"]}"')])
        self.send(404)

    def data(self, data, headers):
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self.send(416, headers)
            headers = headers + [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")]
            return self.send(206, headers, data[start:])
        self.send(200, headers, data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repo", action="append", default=[], help="ORG/NAME=PATH (folder or file)")
    a = ap.parse_args()
    for spec in a.repo:
        repo_id, path = spec.split("=", 1)
        REPOS[repo_id] = load_repo(path)
        print(f"{repo_id}: {len(REPOS[repo_id]['files'])} files, commit {REPOS[repo_id]['commit']}")
    http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
