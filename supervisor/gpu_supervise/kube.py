"""This node's GPU Operator labels, watched through the Kubernetes API from inside the pod.

NVIDIA's GPU Operator announces a GPU reset on the node's labels before it makes it:
mig-manager sets `nvidia.com/mig.config.state` to `pending` before it pauses its operands, and
the driver upgrade controller moves `nvidia.com/gpu-driver-upgrade-state` through its states up
to `pod-restart-required` (the driver pod restarts; the module unloads). One node, one watch:
list it (its resourceVersion), then watch from there, as kubelets and DaemonSets do.

A small client on the standard library (http.client, ssl, json): the official client costs half
a second of import and tens of MB, more than the supervisor's whole budget. All network I/O runs
in one daemon thread; what it learns reaches the caller through `notify`, called from that
thread with a NodeLabels or a KubeProblem.

Safety against a broken or hostile server: TLS verified against the service account's CA with
host name checking and no insecure fallback; plain http only to a loopback address; redirects
never followed; the token re-read at every connection (the kubelet rotates it), held only for
the request, and kept out of every message; a bound on a watch event's line, on a response's
size, on a byte's wait and on a whole connection's life.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .files import read_regular_file
from .text import clip

MIG_CONFIG_STATE = "nvidia.com/mig.config.state"
DRIVER_UPGRADE_STATE = "nvidia.com/gpu-driver-upgrade-state"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

MAX_LINE = 1 << 20  # one watch event; a longer line is a failure and a reconnect
MAX_RESPONSE = 4 << 20  # a list or a pod: metadata of one object is a few KiB
MAX_STATUS = 64 << 10  # the body of a failure: a Status object
MAX_FILE = 1 << 20  # the token, the CA, the namespace
WATCH_SECONDS = 300  # timeoutSeconds asked of the server, jittered by 10 %
REQUEST_SECONDS = 30.0  # a list or a get, from connect to the last byte
CONNECT_SECONDS = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_LAST = 30.0

LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
WATCH_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
RBAC_NODES = (
    'a ClusterRole with the rule {apiGroups: [""], resources: [nodes], '
    "verbs: [get, list, watch]}, bound to the pod's service account by a ClusterRoleBinding"
)
RBAC_PODS = (
    'a Role in namespace {ns} with the rule {{apiGroups: [""], resources: [pods], '
    "verbs: [get]}}, bound to the service account; or set NODE_NAME "
    "(env valueFrom fieldRef spec.nodeName) and no pod is read"
)


@dataclass(frozen=True)
class NodeLabels:
    """The two labels' values (None where the label is absent) as of `resource_version`."""

    mig_config_state: str | None
    driver_upgrade_state: str | None
    resource_version: str


@dataclass(frozen=True)
class KubeProblem:
    """Why the labels cannot be watched now, and what to fix. `kind` is one word (config,
    token, tls, connect, unauthorized, forbidden, not-found, no-node, node-deleted, http,
    protocol); a problem is reported once per change of kind, and the watcher keeps trying."""

    kind: str
    message: str


class KubeConfigError(ValueError):
    """A setting that can never work (not in a pod, a bad server address): one line."""


Event = NodeLabels | KubeProblem


class _Failure(Exception):
    """A request that failed; `kind` and `message` as in KubeProblem. A `quiet` one (a watch
    that broke off) is not reported: the watch resumes, and reports if that fails."""

    def __init__(self, kind: str, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.quiet = quiet


class _Gone(Exception):
    """410 Gone: the resourceVersion is compacted away; list again."""


@dataclass(frozen=True)
class Server:
    """Where the API server is: scheme, host (an address or a name) and port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_server(url: str) -> Server:
    """`https://HOST[:PORT]`, or `http://` to a loopback address only: the token travels in the
    clear over http. No path, user, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise KubeConfigError(f"API server {clip(url)!r}: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise KubeConfigError(f"API server {clip(url)!r}: expected https://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise KubeConfigError(f"API server {clip(url)!r}: only a scheme, a host and a port")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise KubeConfigError(
            f"API server {clip(url)!r}: http:// only to a loopback address (the token would "
            "travel in the clear); use https://"
        )
    return Server(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def _is_loopback(host: str) -> bool:
    """A literal loopback address: a name could resolve anywhere."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def in_cluster_server(env: dict[str, str]) -> Server:
    """The API server the kubelet names in every pod's environment."""
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    if not host:
        raise KubeConfigError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise KubeConfigError(f"KUBERNETES_SERVICE_PORT={clip(port)!r} is not a port")
    return parse_server(f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}")


def valid_node_name(name: str) -> bool:
    """A DNS subdomain, as node names are: nothing that could change the query."""
    return 0 < len(name) <= 253 and all(c.isascii() and (c.isalnum() or c in ".-") for c in name)


def labels_of(obj: Any, resource_version: str) -> NodeLabels:
    """The two labels of a Node or PartialObjectMetadata (a missing or odd one is None)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    labels = labels if isinstance(labels, dict) else {}

    def value(key: str) -> str | None:
        got = labels.get(key)
        return got if isinstance(got, str) else None

    return NodeLabels(value(MIG_CONFIG_STATE), value(DRIVER_UPGRADE_STATE), resource_version)


def resource_version_of(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


class Backoff:
    """Jittered exponential back-off: `first` doubling to `last`, each delay ±50 %."""

    def __init__(self, first: float, last: float, rng: random.Random) -> None:
        self._first, self._last, self._rng = first, last, rng
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    def next(self) -> float:
        base = min(self._last, self._first * 2 ** min(self._failures, 32))
        self._failures += 1
        return base * self._rng.uniform(0.5, 1.5)


class NodeWatcher:
    """Watch this node's labels in a daemon thread; `notify(event)` is called from it with a
    NodeLabels when the two labels' values change (and again once a problem has cleared), and
    with a KubeProblem when a new kind of failure stops the watch. `stop()` ends the thread."""

    def __init__(
        self,
        notify: Callable[[Event], None],
        *,
        server: str | None = None,
        node_name: str | None = None,
        env: dict[str, str] | None = None,
        account_dir: str = SERVICE_ACCOUNT,
        watch_seconds: int = WATCH_SECONDS,
        request_seconds: float = REQUEST_SECONDS,
        backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_LAST),
        rng: random.Random | None = None,
    ) -> None:
        env = dict(os.environ if env is None else env)
        self._server = parse_server(server) if server else in_cluster_server(env)
        node_name = node_name or env.get("NODE_NAME") or None
        if node_name is not None and not valid_node_name(node_name):
            raise KubeConfigError(f"NODE_NAME={clip(node_name)!r} is not a node name")
        self._node = node_name
        self._node_from_pod = node_name is None
        self._pod = env.get("HOSTNAME") or socket.gethostname()
        self._dir = account_dir
        self._rng = rng or random.Random()
        self._watch_seconds = max(1, watch_seconds)
        self._backoff = Backoff(backoff[0], backoff[1], self._rng)
        self._stopping = threading.Event()
        self._client = _Client(self._server, account_dir, request_seconds, self._stopping)
        self._reports = _Reports(notify)
        self._version: str | None = None  # where the watch resumes; None: list first
        self._thread = threading.Thread(target=self._run, name="kube-watch", daemon=True)

    def __repr__(self) -> str:
        return f"NodeWatcher({self._server}, node={self._node!r})"

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """End the thread: wake its wait, cut its connection. False if it outlived `timeout`."""
        self._stopping.set()
        self._client.cut(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # The thread

    def _run(self) -> None:
        gone = 0
        while not self._stopping.is_set():
            try:
                if self._step():
                    gone = 0
                    continue  # the server ended the watch at timeoutSeconds: resume at once
            except _Gone:
                self._version, gone = None, gone + 1
                if gone == 1:
                    continue  # list again at once; a server that keeps saying 410 waits
            except _Failure as failure:
                if self._stopping.is_set():
                    return
                if not failure.quiet:
                    self._reports.problem(failure.kind, failure.message)
            except Exception as exc:  # a bug must not end the watch, nor print a traceback
                self._reports.problem(
                    "protocol", f"the watch on {self._server} failed: {type(exc).__name__}"
                )
            self._stopping.wait(self._backoff.next())

    def _step(self) -> bool:
        """Find the node, list it if need be, and watch it from the last resourceVersion seen
        (it moves with every event); whether the watch ended as the server ends one."""
        if self._node is None:
            self._node = self._find_node()
        if self._version is None:
            self._version = self._list()
        return self._watch(self._version)

    def _find_node(self) -> str:
        """spec.nodeName of this pod (HOSTNAME, in the service account's namespace)."""
        path = os.path.join(self._dir, "namespace")
        try:
            namespace = read_regular_file(path, MAX_FILE).decode("utf-8", "replace").strip()
        except OSError as exc:
            raise _Failure(
                "config",
                f"set NODE_NAME (env valueFrom fieldRef spec.nodeName): "
                f"without it the pod is read, and {path} is unreadable "
                f"({_os_text(exc)})",
            ) from None
        if not valid_node_name(namespace) or not valid_node_name(self._pod):
            raise _Failure(
                "config",
                "set NODE_NAME (env valueFrom fieldRef spec.nodeName): "
                "the pod's name or namespace is not a name",
            )
        self._client.namespace = namespace
        what = f"pod {namespace}/{self._pod}"
        doc = self._client.get(
            f"/api/v1/namespaces/{namespace}/pods/{self._pod}", "application/json", what
        )
        spec = doc.get("spec") if isinstance(doc, dict) else None
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        if not isinstance(node, str) or not valid_node_name(node):
            raise _Failure("protocol", f"{what} has no spec.nodeName: set NODE_NAME")
        return node

    def _list(self) -> str:
        """List the node; report its labels; return the list's resourceVersion."""
        doc = self._client.get(self._nodes_path(), LIST_ACCEPT, f"node {self._node}")
        rv = resource_version_of(doc)
        items = doc.get("items") if isinstance(doc, dict) else None
        if rv is None or not isinstance(items, list):
            raise _Failure(
                "protocol",
                f"{self._server} sent a node list without metadata.resourceVersion or items",
            )
        mine = [i for i in items if isinstance(i, dict) and _name_of(i) == self._node]
        if not mine:
            raise _Failure(
                "no-node", f"no node named {self._node!r} in the API: " + self._node_hint()
            )
        self._backoff.reset()
        self._reports.report(labels_of(mine[0], resource_version_of(mine[0]) or rv))
        return rv

    def _node_hint(self) -> str:
        if self._node_from_pod:
            return "the pod's spec.nodeName names no node; set NODE_NAME"
        return "NODE_NAME must be the node's name (env valueFrom fieldRef spec.nodeName)"

    def _watch(self, resource_version: str) -> bool:
        """Follow the watch from `resource_version`, keeping the last one seen in _version;
        whether the stream ended as the server ends a watch (cleanly, after events or a
        second at least)."""
        timeout = max(1, round(self._watch_seconds * self._rng.uniform(0.9, 1.1)))
        rv = urllib.parse.quote(resource_version, safe="")
        query = f"&watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds={timeout}"
        life = 2.0 * timeout  # the server ends it at `timeout`: past twice that it is dead
        started = time.monotonic()
        exchange = self._client.open(
            self._nodes_path() + query, WATCH_ACCEPT, life, min(life, 300.0), f"node {self._node}"
        )
        lines = 0
        try:
            self._reports.resume()  # watching again: the problem has cleared
            while not self._stopping.is_set():
                line = self._client.read_line(exchange.response)
                if not line:
                    break
                lines += 1
                self._backoff.reset()
                self._version = self._event(line, self._version or resource_version)
        finally:
            self._client.close(exchange)
        return lines > 0 or time.monotonic() - started >= 1.0

    def _event(self, line: bytes, resource_version: str) -> str:
        """Act on one watch event; return the resourceVersion to resume from."""
        if not line.strip():
            return resource_version
        try:
            event = json.loads(line)
        except ValueError:
            raise _Failure(
                "protocol", f"{self._server} sent a watch event that is not JSON"
            ) from None
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _Failure("protocol", f"{self._server} sent a watch event without an object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise _Failure("http", f"the watch on {self._server} failed: " + _status_text(obj))
        rv = resource_version_of(obj) or resource_version
        if kind in ("ADDED", "MODIFIED") and _name_of(obj) == self._node:
            self._reports.report(labels_of(obj, rv))
        elif kind == "DELETED" and _name_of(obj) == self._node:
            self._reports.problem(
                "node-deleted",
                f"node {self._node!r} was deleted from the API; watching for its return",
            )
        return rv

    def _nodes_path(self) -> str:
        selector = urllib.parse.quote(f"metadata.name={self._node}", safe="")
        return f"/api/v1/nodes?fieldSelector={selector}"


class _Reports:
    """What the caller is told: labels when their values change, a problem once per change of
    kind, and the labels again once a problem has cleared."""

    def __init__(self, notify: Callable[[Event], None]) -> None:
        self._notify = notify
        self._reported: NodeLabels | str | None = None  # the last labels, or a problem's kind
        self._labels: NodeLabels | None = None  # the last labels seen

    def resume(self) -> None:
        """Watching again: report the last labels seen if a problem was reported since."""
        if not isinstance(self._reported, NodeLabels) and self._labels is not None:
            self.report(self._labels)

    def report(self, labels: NodeLabels) -> None:
        """Tell the caller the labels when their values changed, or a problem was reported."""
        self._labels = labels
        last = self._reported
        if isinstance(last, NodeLabels) and _values(last) == _values(labels):
            return
        self._reported = labels
        self._notify(labels)

    def problem(self, kind: str, message: str) -> None:
        """Tell the caller a problem, once per change of kind."""
        if self._reported == kind:
            return
        self._reported = kind
        self._notify(KubeProblem(kind, message))


class _Client:
    """The HTTP layer: one GET at a time to the API server, with a freshly read token and a
    verified TLS context, a bound on every read and on each connection's life; `cut` shuts the
    open connection down from any thread."""

    def __init__(
        self, server: Server, account_dir: str, request_seconds: float, stopping: threading.Event
    ) -> None:
        self._server = server
        self._account = _Account(account_dir)
        self._request_seconds = request_seconds
        self._stopping = stopping
        self.namespace = "?"  # the pod's, once read: named in the fix for a 403 on it
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # the connection now open, for cut

    def read_line(self, resp: http.client.HTTPResponse) -> bytes:
        """One event's line; b"" at the stream's clean end (its last chunk). A line past
        MAX_LINE is a _Failure; so, quietly (the watch resumes), is a connection cut within a
        line or between chunks, a silent server, or one that drips past the connection's life.
        (http.client's readline hands back what it had when the stream broke: an API server
        ends every event with a newline, and the last chunk sets chunk_left to None.)"""
        try:
            line = resp.readline(MAX_LINE + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise self._broke(type(exc).__name__) from None
        if len(line) > MAX_LINE:
            raise _Failure(
                "protocol",
                f"{self._server} sent a watch event longer than {MAX_LINE} bytes; reconnecting",
            )
        if line.endswith(b"\n") or (not line and resp.chunk_left is None):
            return line
        raise self._broke("cut within an event" if line else "cut between events")

    def _broke(self, how: str) -> _Failure:
        return _Failure("connect", f"the watch on {self._server} broke off ({how})", quiet=True)

    def get(self, path: str, accept: str, what: str) -> Any:
        """The JSON document at `path`, at most MAX_RESPONSE bytes, within request_seconds."""
        seconds = self._request_seconds
        exchange = self.open(path, accept, seconds, seconds, what)
        try:
            body = exchange.response.read(MAX_RESPONSE + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _Failure(
                "connect", f"reading {what} from {self._server} failed ({type(exc).__name__})"
            ) from None
        finally:
            self.close(exchange)
        if len(body) > MAX_RESPONSE:
            raise _Failure(
                "protocol", f"{self._server} sent more than {MAX_RESPONSE} bytes for {what}"
            )
        try:
            return json.loads(body)
        except ValueError:
            raise _Failure("protocol", f"{self._server} sent {what} that is not JSON") from None

    def open(self, path: str, accept: str, life: float, idle: float, what: str) -> _Exchange:
        """Connect, send the GET with a freshly read token, and return its 200 response. The
        connection is cut `life` seconds after it is made; a read waits `idle` seconds."""
        token = self._account.token()
        exchange = _Exchange(self._server)
        exchange.timer = threading.Timer(life, self.cut, (exchange,))
        exchange.timer.daemon = True
        try:
            exchange.conn.sock = self._connect(exchange)
            exchange.conn.sock.settimeout(idle)
            exchange.conn.request(
                "GET",
                path,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": accept,
                    "User-Agent": f"gpu-supervise/{__version__}",
                },
            )
            exchange.response = exchange.conn.getresponse()
            if exchange.response.status != 200:
                raise self._refusal(exchange.response, what, token)
        except ssl.SSLCertVerificationError as exc:
            self.close(exchange)
            raise _Failure(
                "tls",
                f"{self._server}'s certificate did not verify against "
                f"{self._account.ca_path()}: {exc.verify_message}",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close(exchange)
            if self._stopping.is_set():
                raise _Failure("connect", "stopping", quiet=True) from None
            raise _Failure(
                "connect", f"cannot reach the API server at {self._server}: {_os_text(exc)}"
            ) from None
        except BaseException:
            self.close(exchange)
            raise
        return exchange

    def _connect(self, exchange: _Exchange) -> socket.socket:
        """A connected socket (TLS-wrapped for https), made so that cut can reach it at every
        step: connect, handshake and every read after."""
        server = self._server
        context = self._account.tls_context() if server.scheme == "https" else None
        sock = socket.create_connection((server.host, server.port), timeout=CONNECT_SECONDS)
        if context is not None:
            try:
                sock = context.wrap_socket(
                    sock, server_hostname=server.host, do_handshake_on_connect=False
                )
            except BaseException:
                sock.close()
                raise
        with self._lock:
            self._sock = sock
        exchange.sock = sock
        exchange.timer.start()
        if self._stopping.is_set():
            raise OSError("stopping")
        if context is not None:
            sock.do_handshake()  # type: ignore[attr-defined]
        return sock

    def _refusal(self, resp: http.client.HTTPResponse, what: str, token: str) -> Exception:
        """The failure a non-200 answer means, with what to fix. The server's own words are
        shown (clipped), never the token, should a server echo it."""
        code = resp.status
        try:
            body = json.loads(resp.read(MAX_STATUS))
        except (OSError, ValueError, http.client.HTTPException):
            body = None
        detail = _status_text(body) if isinstance(body, dict) else f"{code}"
        detail = clip(detail.replace(token, "[token]"), 200)
        if code == 410:
            return _Gone()
        if code == 401:
            return _Failure(
                "unauthorized",
                f"the API server refused the service account "
                f"token ({detail}): the token at {os.path.join(self._account.dir, 'token')} "
                "must be the pod's current one",
            )
        if code == 403:
            fix = RBAC_NODES if what.startswith("node") else RBAC_PODS.format(ns=self.namespace)
            return _Failure(
                "forbidden", f"the service account may not read {what} ({detail}): add {fix}"
            )
        if code == 404:
            hint = "is KUBERNETES_SERVICE_HOST/PORT the cluster's API server?"
            if what.startswith("pod"):
                hint = (
                    "the pod's name is taken from HOSTNAME; set NODE_NAME (env valueFrom "
                    "fieldRef spec.nodeName) and no pod is read"
                )
            return _Failure("not-found", f"{what} not found at {self._server} ({detail}): {hint}")
        if 300 <= code < 400:
            return _Failure(
                "http",
                f"{self._server} answered {code} for {what}: a redirect, "
                "not followed; KUBERNETES_SERVICE_HOST/PORT must name the "
                "API server itself",
            )
        return _Failure("http", f"{self._server} answered {code} for {what} ({detail})")

    def cut(self, exchange: _Exchange | None) -> None:
        """Shut the open connection down (only `exchange`'s, if given), from any thread: a
        blocked TLS handshake or read returns at once, and fails. (A TCP connect still under
        way has no socket here yet: it ends within CONNECT_SECONDS.)"""
        with self._lock:
            sock = self._sock
            if sock is None or (exchange is not None and exchange.sock is not sock):
                return
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self, exchange: _Exchange) -> None:
        exchange.timer.cancel()
        with self._lock:
            if exchange.sock is not None and self._sock is exchange.sock:
                self._sock = None
        exchange.conn.close()
        if exchange.sock is not None:
            exchange.sock.close()


class _Account:
    """The service account's folder as the kubelet mounts it: its token and CA, each read afresh
    (the kubelet rewrites them)."""

    def __init__(self, folder: str) -> None:
        self.dir = folder

    def tls_context(self) -> ssl.SSLContext:
        """Verify against the service account's CA only, host name included; read afresh."""
        try:
            ca = read_regular_file(self.ca_path(), MAX_FILE).decode("ascii")
            context = ssl.create_default_context(cadata=ca)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise _Failure(
                "config",
                f"no usable CA certificate at {self.ca_path()} "
                f"({_os_text(exc)}): the pod must mount its service "
                "account (automountServiceAccountToken)",
            ) from None
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def ca_path(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    def token(self) -> str:
        """The service account token, read afresh: the kubelet rewrites it before it expires."""
        path = os.path.join(self.dir, "token")
        try:
            raw = read_regular_file(path, MAX_FILE)
        except OSError as exc:
            raise _Failure(
                "token",
                f"cannot read the service account token at {path} "
                f"({_os_text(exc)}): the pod must mount its service "
                "account (automountServiceAccountToken)",
            ) from None
        token = raw.strip()
        if not token or any(b < 0x21 or b > 0x7E for b in token):
            raise _Failure(
                "token",
                f"the file {path} holds no token ({len(raw)} bytes; "
                "expected one line of printable ASCII)",
            )
        return token.decode("ascii")


class _Exchange:
    """One request's connection, its socket, its response and the timer that ends its life."""

    def __init__(self, server: Server) -> None:
        self.timer: threading.Timer = None  # type: ignore[assignment]
        self.conn = http.client.HTTPConnection(
            server.host, server.port
        )  # _connect gives it a socket
        self.sock: socket.socket | None = None
        self.response: http.client.HTTPResponse = None  # type: ignore[assignment]


def _values(labels: NodeLabels) -> tuple[str | None, str | None]:
    return labels.mig_config_state, labels.driver_upgrade_state


def _name_of(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def _status_text(status: dict[str, Any]) -> str:
    """A Status object as one short line: code, reason, message."""
    parts = [str(status.get(k)) for k in ("code", "reason") if status.get(k) is not None]
    message = status.get("message")
    text = " ".join(parts) + (f": {message}" if isinstance(message, str) and message else "")
    return clip(text or "no Status", 200)


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return clip(str(exc) or type(exc).__name__, 120)
