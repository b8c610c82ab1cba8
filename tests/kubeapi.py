"""A stand-in for the Kubernetes API server, for tests: the wire protocol a client of one
node's labels meets, over real TLS, on 127.0.0.1.

It speaks what the API documents for these calls: bearer tokens (a set the test rotates and
revokes), `GET /api/v1/nodes` with a `metadata.name` field selector as a list (NodeList, or
PartialObjectMetadataList when the Accept header asks for it) and as a watch (`watch=1`,
`resourceVersion`, `allowWatchBookmarks`, `timeoutSeconds`: a chunked stream of JSON lines
`{"type", "object"}`), `GET /api/v1/namespaces/NS/pods/NAME`, one resourceVersion counter for
every change, BOOKMARK events, 410 Gone for a compacted resourceVersion (as an ERROR event or
as the response), and Status objects for 401, 403 and 404. Faults a test switches on: a watch
dropped mid-event, a slow drip, a line that never ends, a silent stream, a redirect.

It is not a kube-apiserver: no RBAC rules are evaluated (a test names what is forbidden), no
API priority and fairness, no watch cache, no etcd, no protobuf, no other resource or verb.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

META = "meta.k8s.io/v1"


# Certificates, made with openssl (a CA, and servers' certificates signed by it)


@dataclass(frozen=True)
class Cert:
    crt: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Cert:
    """A self-signed CA (EC P-256), valid for two days."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(crt),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return Cert(crt, key)


def make_server_cert(folder: Path, name: str, ca: Cert, san: str) -> Cert:
    """A server certificate signed by `ca` for `san` (e.g. IP:127.0.0.1)."""
    crt, key, csr = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=kube-apiserver",
        cwd=folder,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.crt),
        "-CAkey",
        str(ca.key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "2",
        "-extfile",
        str(ext),
        cwd=folder,
    )
    return Cert(crt, key)


@dataclass(frozen=True)
class Pki:
    """The cluster's CA and its server certificate; a wrong host's and another CA's."""

    ca: Cert
    server: Cert  # for IP:127.0.0.1, signed by ca
    wrong_host: Cert  # for DNS:elsewhere.invalid, signed by ca
    stranger: Cert  # for IP:127.0.0.1, signed by another CA


def make_pki(folder: Path) -> Pki:
    ca, other = make_ca(folder, "cluster-ca"), make_ca(folder, "other-ca")
    return Pki(
        ca,
        make_server_cert(folder, "server", ca, "IP:127.0.0.1"),
        make_server_cert(folder, "wrong-host", ca, "DNS:elsewhere.invalid"),
        make_server_cert(folder, "stranger", other, "IP:127.0.0.1"),
    )


# The API's objects


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A Status object, as the API server sends for a failure."""
    doc: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        doc["details"] = details
    return doc


@dataclass
class Node:
    name: str
    labels: dict[str, str]
    resource_version: int
    uid: str = "0d1e2c3b-0000-4000-8000-000000000001"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": str(self.resource_version),
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "labels": dict(self.labels),
        }

    def full(self) -> dict[str, Any]:
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": self.metadata(),
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {
                "capacity": {"cpu": "64", "nvidia.com/gpu": "8"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        }

    def partial(self) -> dict[str, Any]:
        return {"kind": "PartialObjectMetadata", "apiVersion": META, "metadata": self.metadata()}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    accept: str
    at: float = field(default_factory=time.monotonic)  # when it came

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")


@dataclass
class _Change:
    rv: int
    type: str
    node: Node


@dataclass
class Faults:
    """What the next requests meet. `watch` is used once by the next watch: drop (half an
    event, then the connection closes), drip (an event's start, then a byte every 0.1 s),
    giant (a line that never ends), silent (headers, then nothing)."""

    watch: str | None = None
    redirect: str | None = None  # answer every request 302 to this URL
    gone_as: str = "event"  # how a compacted resourceVersion is refused: event | response
    echo_token: bool = False  # a hostile 401 that quotes the token it was sent
    forbidden: set[str] = field(default_factory=set)  # resources: nodes, pods
    huge_list: bool = False  # a list of more than 4 MiB (a 5 MiB annotation)
    partial: bool = True  # serve metadata only when asked (False: as a server that cannot)


class KubeAPI:
    """The stand-in, serving on 127.0.0.1 from a thread of its own until close()."""

    def __init__(self, cert: Cert | None, tokens: set[str], namespace: str = "gpu") -> None:
        self.tokens = set(tokens)
        self.namespace = namespace
        self.faults = Faults()
        self.requests: list[Request] = []
        self.nodes: dict[str, Node] = {}
        self.pods: dict[tuple[str, str], str] = {}
        self.rv = 100
        self.compacted = 0  # a watch from below this is 410 Gone
        self._history: list[_Change] = []
        self._bookmarks = 0
        self._drops = 0
        self._closing = False
        self.cond = threading.Condition()
        context = None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert.crt, cert.key)
        self._server = _Server(("127.0.0.1", 0), _Handler, self, context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="kubeapi", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self._server.context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()  # joins every handler's thread
        self._thread.join(10)

    # What the test changes

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> int:
        return self._change("ADDED", Node(name, dict(labels or {}), 0))

    def label(self, name: str, changes: dict[str, str | None]) -> int:
        """Set (a str) or remove (None) the node's labels: one MODIFIED event."""
        with self.cond:
            node = self.nodes[name]
            new = dict(node.labels)
            for key, value in changes.items():
                if value is None:
                    new.pop(key, None)
                else:
                    new[key] = value
            return self._change("MODIFIED", Node(name, new, 0, node.uid))

    def delete_node(self, name: str) -> int:
        with self.cond:
            return self._change("DELETED", self.nodes[name])

    def bookmark(self) -> None:
        """Every open watch that allows bookmarks gets one, at the current resourceVersion."""
        with self.cond:
            self._bookmarks += 1
            self.cond.notify_all()

    def drop_watches(self) -> None:
        """Every open watch is cut in the middle of an event."""
        with self.cond:
            self._drops += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion seen so far is 410 Gone."""
        with self.cond:
            self.rv += 1
            self.compacted = self.rv
            self._history.clear()

    def watches(self) -> list[Request]:
        return [r for r in list(self.requests) if r.watch]

    def _change(self, kind: str, node: Node) -> int:
        with self.cond:
            self.rv += 1
            node.resource_version = self.rv
            if kind == "DELETED":
                del self.nodes[node.name]
            else:
                self.nodes[node.name] = node
            self._history.append(_Change(self.rv, kind, node))
            self.cond.notify_all()
            return self.rv


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = False  # server_close() joins the handlers: nothing outlives the test
    block_on_close = True

    def __init__(self, address: Any, handler: Any, api: KubeAPI, context: ssl.SSLContext | None):
        self.api = api
        self.context = context
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away is no error of the stand-in's; anything else is shown."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake, in the handler's thread: a client that refuses the certificate
        ends only its own connection."""
        request.settimeout(10)
        if self.context is not None:
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                request.close()
                return
        super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        api = self.server.api
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        accept = self.headers.get("Accept", "")
        request = Request("GET", url.path, query, token, accept)
        api.requests.append(request)
        if api.faults.redirect:
            return self._send(302, {"kind": "Status"}, location=api.faults.redirect)
        if token not in api.tokens:
            message = f"token {token} is not valid" if api.faults.echo_token else "Unauthorized"
            return self._send(401, status(401, "Unauthorized", message))
        parts = url.path.strip("/").split("/")
        if parts == ["api", "v1", "nodes"]:
            return self._nodes(request)
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            return self._pod(parts[3], parts[5])
        self._send(404, status(404, "NotFound", "the server could not find the requested resource"))

    def _forbidden(self, verb: str, resource: str, scope: str) -> bool:
        api = self.server.api
        if resource not in api.faults.forbidden:
            return False
        user = f"system:serviceaccount:{api.namespace}:gpu-agent"
        message = (
            f'{resource} is forbidden: User "{user}" cannot {verb} resource '
            f'"{resource}" in API group "" {scope}'
        )
        self._send(403, status(403, "Forbidden", message, kind=resource))
        return True

    def _pod(self, namespace: str, name: str) -> None:
        api = self.server.api
        if self._forbidden("get", "pods", f'in the namespace "{namespace}"'):
            return
        node = api.pods.get((namespace, name))
        if node is None:
            self._send(
                404, status(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
            )
            return
        self._send(
            200,
            {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
            },
        )

    def _nodes(self, request: Request) -> None:
        verb = "watch" if request.watch else "list"
        if self._forbidden(verb, "nodes", "at the cluster scope"):
            return
        selector = request.query.get("fieldSelector", "")
        key, _, name = selector.replace("==", "=").partition("=")
        if selector and key != "metadata.name":
            self._send(400, status(400, "BadRequest", f'field label not supported: "{key}"'))
            return
        pick = (lambda node: node.name == name) if selector else (lambda node: True)
        if request.watch:
            self._watch(request, pick)
        else:
            self._list(request, pick)

    def _list(self, request: Request, pick: Any) -> None:
        api = self.server.api
        partial = api.faults.partial and "as=PartialObjectMetadataList" in request.accept
        with api.cond:
            nodes = [n for n in api.nodes.values() if pick(n)]
            rv = str(api.rv)
        items = [n.partial() if partial else n.full() for n in nodes]
        if api.faults.huge_list:
            for item in items:
                item["metadata"]["annotations"] = {"padding": "x" * (5 << 20)}
        if partial:
            doc = {
                "kind": "PartialObjectMetadataList",
                "apiVersion": META,
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        else:
            doc = {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        self._send(200, doc)

    def _watch(self, request: Request, pick: Any) -> None:
        api = self.server.api
        partial = api.faults.partial and "as=PartialObjectMetadata;" in request.accept
        try:
            since = int(request.query.get("resourceVersion") or 0)
        except ValueError:
            self._send(400, status(400, "BadRequest", "invalid resourceVersion"))
            return
        if since < api.compacted and api.faults.gone_as == "response":
            self._send(
                410, status(410, "Expired", f"too old resource version: {since} ({api.compacted})")
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if since < api.compacted:
            self._chunk(
                _line(
                    "ERROR",
                    status(410, "Expired", f"too old resource version: {since} ({api.compacted})"),
                )
            )
            return self._end()
        fault, api.faults.watch = api.faults.watch, None
        if fault:
            return self._fault(fault)
        self._stream(request, pick, partial, since)

    def _stream(self, request: Request, pick: Any, partial: bool, since: int) -> None:
        api = self.server.api
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        end = time.monotonic() + timeout
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        with api.cond:
            seen_bookmarks, seen_drops = api._bookmarks, api._drops
        while True:
            with api.cond:
                while not (
                    api._closing
                    or api._drops != seen_drops
                    or api._bookmarks != seen_bookmarks
                    or any(c.rv > since for c in api._history)
                    or time.monotonic() >= end
                ):
                    api.cond.wait(max(0.0, min(0.1, end - time.monotonic())))
                if api._closing or time.monotonic() >= end:
                    break
                if api._drops != seen_drops:
                    return self._drop()
                changes = [c for c in api._history if c.rv > since]
                bookmark = api._bookmarks != seen_bookmarks
                seen_bookmarks, rv = api._bookmarks, api.rv
            for change in changes:
                since = change.rv
                if pick(change.node):
                    obj = change.node.partial() if partial else change.node.full()
                    self._chunk(_line(change.type, obj))
            if bookmark and bookmarks:
                kind = (
                    {"kind": "PartialObjectMetadata", "apiVersion": META}
                    if partial
                    else {"kind": "Node", "apiVersion": "v1"}
                )
                self._chunk(_line("BOOKMARK", {**kind, "metadata": {"resourceVersion": str(rv)}}))
                since = max(since, rv)
        self._end()

    def _fault(self, fault: str) -> None:
        api = self.server.api
        self.close_connection = True
        if fault == "drop":
            self._chunk(b'{"type":"MODIFIED","object":{"metadata":{"na')
            return self._drop()
        if fault == "giant":
            self._chunk(b'{"type":"MODIFIED","object":{"metadata":{"annotations":{"x":"')
        if fault == "drip":
            self._chunk(b'{"type":"MODIFIED","obj')
        block = b"a" * 65536 if fault == "giant" else b"e" if fault == "drip" else b""
        while not api._closing:
            try:
                if block:
                    self._chunk(block)
            except OSError:
                return  # the client went away
            time.sleep(0.001 if fault == "giant" else 0.1)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def _send(self, code: int, doc: dict[str, Any], location: str | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        content_type = "application/json"
        if doc.get("kind") == "PartialObjectMetadataList":
            content_type += ";as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def _line(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def write_account(folder: Path, token: str, ca: Cert | None, namespace: str = "gpu") -> Path:
    """A service account folder as the kubelet mounts it: token, ca.crt, namespace."""
    folder.mkdir(parents=True, exist_ok=True)
    rotate_token(folder, token)
    if ca is not None:
        (folder / "ca.crt").write_bytes(ca.crt.read_bytes())
    (folder / "namespace").write_text(namespace)
    return folder


def rotate_token(folder: Path, token: str) -> None:
    """Replace the token file at once, as the kubelet does (a rename, never a partial file)."""
    tmp = folder / ".token.new"
    tmp.write_text(token)
    os.replace(tmp, folder / "token")
