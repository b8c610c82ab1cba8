"""The node-label watcher (gpu_supervise.kube) against the stand-in API server (kubeapi.py):
real TLS, real sockets on 127.0.0.1, the API's wire protocol, and the faults a real cluster
and a hostile server bring."""

from __future__ import annotations

import http.client
import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from gpu_supervise import kube
from gpu_supervise.kube import KubeConfigError, KubeProblem, NodeLabels, NodeWatcher
from kubeapi import META, KubeAPI, Pki, make_pki, rotate_token, write_account

TOKEN = "eyJhbGciOiJSUzI1NiJ9.first-secret-token-7f3a"
NEW_TOKEN = "eyJhbGciOiJSUzI1NiJ9.second-secret-token-c41d"
NODE = "gpu-node-1"
MIG = kube.MIG_CONFIG_STATE
UPGRADE = kube.DRIVER_UPGRADE_STATE
WAIT = 60.0  # generous: two shared CPUs


class Seen:
    """What the watcher reported, in order; next() waits for the next one that matches."""

    def __init__(self) -> None:
        self.events: list[kube.Event] = []
        self._cond = threading.Condition()
        self._pos = 0

    def __call__(self, event: kube.Event) -> None:
        assert threading.current_thread().name == "kube-watch"
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def next(self, match: Callable[[Any], bool] = lambda e: True, what: str = "") -> Any:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                for i in range(self._pos, len(self.events)):
                    if match(self.events[i]):
                        self._pos = i + 1
                        return self.events[i]
                left = deadline - time.monotonic()
                assert left > 0, f"no {what or 'event'} within {WAIT} s; seen {self.events}"
                self._cond.wait(left)

    def labels(self, mig: str | None, upgrade: str | None = None) -> NodeLabels:
        def match(e: Any) -> bool:
            return isinstance(e, NodeLabels) and (e.mig_config_state, e.driver_upgrade_state) == (
                mig,
                upgrade,
            )

        return self.next(match, f"labels {mig}/{upgrade}")

    def problem(self, kind: str) -> KubeProblem:
        return self.next(lambda e: isinstance(e, KubeProblem) and e.kind == kind, kind)

    def problems(self) -> list[KubeProblem]:
        return [e for e in self.events if isinstance(e, KubeProblem)]


def wait_until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not within {WAIT} s: {what}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def account(tmp_path: Path, pki: Pki) -> Path:
    return write_account(tmp_path / "serviceaccount", TOKEN, pki.ca)


@pytest.fixture
def servers() -> Iterator[list[KubeAPI]]:
    made: list[KubeAPI] = []
    yield made
    for api in made:
        api.close()


@pytest.fixture
def api(pki: Pki, servers: list[KubeAPI]) -> KubeAPI:
    api = KubeAPI(pki.server, {TOKEN})
    servers.append(api)
    api.add_node(NODE, {MIG: "success", "kubernetes.io/hostname": NODE})
    api.add_node("other-node", {MIG: "success"})
    return api


@pytest.fixture
def start(account: Path) -> Iterator[Callable[..., tuple[NodeWatcher, Seen]]]:
    """Start a watcher (stopped at the end, promptly, its token never shown)."""
    made: list[tuple[NodeWatcher, Seen]] = []

    def make(api: KubeAPI, **kw: Any) -> tuple[NodeWatcher, Seen]:
        seen = Seen()
        kw.setdefault("node_name", NODE)
        kw.setdefault("env", {})
        kw.setdefault("account_dir", str(account))
        kw.setdefault("watch_seconds", 30)
        kw.setdefault("backoff", (0.05, 0.4))
        kw.setdefault("rng", random.Random(7))
        watcher = NodeWatcher(seen, server=kw.pop("server", api.url), **kw)
        watcher.start()
        made.append((watcher, seen))
        return watcher, seen

    yield make
    for watcher, seen in made:
        assert watcher.stop(10), "the watcher's thread outlived stop()"
        for shown in [repr(watcher), *(repr(e) for e in seen.events)]:
            assert TOKEN not in shown and NEW_TOKEN not in shown
    assert not [t for t in threading.enumerate() if t.name == "kube-watch"]


def test_labels_from_the_list_then_each_change_from_the_watch(api: KubeAPI, start):
    _, seen = start(api)
    first = seen.labels("success")
    assert first.resource_version == str(api.nodes[NODE].resource_version)
    wait_until(api.watches, "a watch")
    api.label("other-node", {MIG: "pending"})  # another node: not ours
    api.label(NODE, {"unrelated": "x"})  # a change of another label: nothing to say
    api.label(NODE, {MIG: "pending"})
    assert seen.labels("pending").resource_version == str(api.rv)
    api.label(NODE, {UPGRADE: "pod-restart-required"})
    seen.labels("pending", "pod-restart-required")
    api.label(NODE, {MIG: None, UPGRADE: None})
    seen.labels(None, None)
    assert len([e for e in seen.events if isinstance(e, NodeLabels)]) == 4
    assert not seen.problems()
    lists = [r for r in api.requests if not r.watch]
    assert [r.query["fieldSelector"] for r in lists] == [f"metadata.name={NODE}"]
    assert lists[0].accept.startswith("application/json;as=PartialObjectMetadataList;")
    watch = api.watches()[0]
    assert watch.query["resourceVersion"] == first.resource_version or int(
        watch.query["resourceVersion"]
    ) >= int(first.resource_version)
    assert watch.query["allowWatchBookmarks"] == "true"
    assert watch.query["fieldSelector"] == f"metadata.name={NODE}"
    assert 27 <= int(watch.query["timeoutSeconds"]) <= 33  # ~30, jittered
    assert "as=PartialObjectMetadata;" in watch.accept


def test_the_full_node_serves_too(pki: Pki, servers, start):
    """A server that ignores the metadata-only Accept sends whole Nodes: same labels."""
    api = KubeAPI(pki.server, {TOKEN})
    servers.append(api)
    api.faults.partial = False
    api.add_node(NODE, {MIG: "success"})
    _, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    api.label(NODE, {MIG: "pending"})
    seen.labels("pending")


def test_the_node_name_comes_from_the_pod(api: KubeAPI, start):
    api.pods[("gpu", "agent-pod-x")] = NODE
    _, seen = start(api, node_name=None, env={"HOSTNAME": "agent-pod-x"})
    seen.labels("success")
    assert api.requests[0].path == "/api/v1/namespaces/gpu/pods/agent-pod-x"
    assert api.requests[1].query["fieldSelector"] == f"metadata.name={NODE}"


def test_a_bookmark_moves_the_resume_point(api: KubeAPI, start):
    watcher, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    api.label("other-node", {MIG: "pending"})  # the version moves on, unseen by our watch
    api.bookmark()
    bookmarked = str(api.rv)
    wait_until(lambda: watcher._version == bookmarked, "the bookmark taken in")
    api.drop_watches()
    wait_until(lambda: len(api.watches()) >= 2, "a second watch")
    assert api.watches()[1].query["resourceVersion"] == bookmarked
    assert len([r for r in api.requests if not r.watch]) == 1  # resumed, not listed again


@pytest.mark.parametrize("gone_as", ["event", "response"])
def test_410_gone_lists_again(api: KubeAPI, start, gone_as: str):
    api.faults.gone_as = gone_as
    _, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    api.compact()  # the watch's resourceVersion is gone...
    api.drop_watches()  # ...and it must resume
    wait_until(lambda: len([r for r in api.requests if not r.watch]) >= 2, "a second list")
    wait_until(lambda: len(api.watches()) >= 3, "a watch after the second list")
    api.label(NODE, {MIG: "pending"})
    seen.labels("pending")
    assert not seen.problems()


def test_a_dropped_watch_resumes_from_the_last_version(api: KubeAPI, start):
    _, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    changed = api.label(NODE, {MIG: "pending"})
    seen.labels("pending")
    api.faults.watch = "drop"  # the next watch, too, breaks off within an event
    api.drop_watches()
    wait_until(lambda: len(api.watches()) >= 3, "two more watches")
    assert [r.query["resourceVersion"] for r in api.watches()[1:3]] == [str(changed)] * 2
    api.label(NODE, {MIG: "success"})
    seen.labels("success")
    assert len([r for r in api.requests if not r.watch]) == 1
    assert not seen.problems()  # a watch that breaks off is no problem: it resumes


def test_a_rotated_token_is_read_again(api: KubeAPI, start, account: Path):
    _, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    api.tokens = {NEW_TOKEN}  # the old token is revoked before the file has the new one
    api.drop_watches()
    problem = seen.problem("unauthorized")
    assert "token" in problem.message and str(account / "token") in problem.message
    rotate_token(account, NEW_TOKEN)
    seen.labels("success")  # watching again: the problem has cleared
    api.label(NODE, {MIG: "pending"})
    seen.labels("pending")
    assert api.requests[-1].token == NEW_TOKEN
    assert len(seen.problems()) == 1


@pytest.mark.parametrize(
    ("forbid", "node_name", "kind", "words"),
    [
        ("nodes", NODE, "forbidden", ["ClusterRole", "nodes", "get, list, watch"]),
        ("pods", None, "forbidden", ["Role", "pods", "get", "NODE_NAME"]),
        ("", "no-such-node", "no-node", ["NODE_NAME"]),
        ("", None, "not-found", ["NODE_NAME"]),  # no such pod
    ],
)
def test_a_refusal_is_one_problem_with_its_fix_and_retried(
    api: KubeAPI, start, forbid: str, node_name: str | None, kind: str, words: list[str]
):
    if forbid:
        api.faults.forbidden.add(forbid)
    api.pods[("gpu", "agent-pod-x")] = NODE
    env = {"HOSTNAME": "agent-pod-x" if forbid == "pods" else "gone-pod"}
    _, seen = start(api, node_name=node_name, env=env)
    problem = seen.problem(kind)
    for word in words:
        assert word in problem.message
    count = len(api.requests)
    wait_until(lambda: len(api.requests) >= count + 3, "retries")
    assert seen.problems() == [problem]  # once per change of kind, not per retry
    api.faults.forbidden.clear()
    api.pods[("gpu", "gone-pod")] = NODE
    if kind == "no-node":
        api.add_node("no-such-node", {MIG: "pending"})
    seen.next(lambda e: isinstance(e, NodeLabels), "labels once fixed")


def test_401_is_one_problem_and_a_hostile_echo_never_shows_the_token(api: KubeAPI, start):
    api.tokens = set()
    api.faults.echo_token = True
    _, seen = start(api)
    problem = seen.problem("unauthorized")
    assert TOKEN not in problem.message and "[token]" in problem.message
    count = len(api.requests)
    wait_until(lambda: len(api.requests) >= count + 3, "retries")
    assert seen.problems() == [problem]


def test_retries_wait_longer_and_longer(api: KubeAPI, start):
    """Between two refused requests the watcher waits at least half its back-off delay (0.1 s
    doubling to 0.8 s): lower bounds only, which a slow machine cannot break."""
    api.faults.forbidden.add("nodes")
    _, seen = start(api, backoff=(0.1, 0.8))
    seen.problem("forbidden")
    wait_until(lambda: len(api.requests) >= 7, "six retries")
    times = [r.at for r in api.requests[:7]]
    for n, (a, b) in enumerate(zip(times, times[1:])):
        assert b - a >= 0.5 * min(0.8, 0.1 * 2**n), (n, b - a)


def test_backoff_doubles_to_its_cap_with_jitter():
    backoff = kube.Backoff(0.5, 30.0, random.Random(1))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        base = min(30.0, 0.5 * 2**n)
        assert 0.5 * base <= delay <= 1.5 * base
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next() <= 0.75


@pytest.mark.parametrize("cert", ["stranger", "wrong_host"])
def test_a_certificate_that_does_not_verify_is_refused(pki: Pki, servers, start, cert: str):
    api = KubeAPI(getattr(pki, cert), {TOKEN})
    servers.append(api)
    api.add_node(NODE, {MIG: "success"})
    _, seen = start(api)
    problem = seen.problem("tls")
    assert ("IP address mismatch" if cert == "wrong_host" else "certificate") in problem.message
    time.sleep(1.0)  # retries come, every one of them verified
    assert api.requests == []  # no request, no token: never an insecure retry
    assert not [e for e in seen.events if isinstance(e, NodeLabels)]


def test_plain_http_only_to_a_loopback_address(servers, start, account: Path):
    for url in (
        "http://10.0.0.1",
        "http://kubernetes.default.svc:80",
        "ftp://127.0.0.1",
        "https://127.0.0.1/api",
        "https://user@127.0.0.1",
    ):
        with pytest.raises(KubeConfigError):
            NodeWatcher(lambda e: None, server=url, node_name=NODE, env={})
    api = KubeAPI(None, {TOKEN})
    servers.append(api)
    api.add_node(NODE, {MIG: "success"})
    _, seen = start(api)
    seen.labels("success")


def test_the_in_cluster_address_and_node_name():
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert str(kube.in_cluster_server(env)) == "https://10.96.0.1:443"
    assert str(kube.in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1"})) == (
        "https://[fd00::1]:443"
    )
    for bad in ({}, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "x"}):
        with pytest.raises(KubeConfigError):
            kube.in_cluster_server(bad)
    with pytest.raises(KubeConfigError, match="NODE_NAME"):
        NodeWatcher(lambda e: None, env={**env, "NODE_NAME": "a&watch=1"})


def test_a_redirect_is_not_followed(api: KubeAPI, pki: Pki, servers, start):
    elsewhere = KubeAPI(pki.server, {TOKEN})
    servers.append(elsewhere)
    api.faults.redirect = elsewhere.url + "/api/v1/nodes"
    _, seen = start(api)
    problem = seen.problem("http")
    assert "302" in problem.message and "redirect" in problem.message
    time.sleep(0.5)
    assert elsewhere.requests == []  # the token went nowhere else


def test_a_line_that_never_ends_is_cut_at_the_limit(api: KubeAPI, start):
    api.faults.watch = "giant"
    _, seen = start(api)
    seen.labels("success")
    problem = seen.problem("protocol")
    assert str(kube.MAX_LINE) in problem.message
    api.label(NODE, {MIG: "pending"})
    seen.labels("pending")  # and it watches on


def test_a_list_past_the_limit_is_refused(api: KubeAPI, start):
    api.faults.huge_list = True
    _, seen = start(api)
    problem = seen.problem("protocol")
    assert str(kube.MAX_RESPONSE) in problem.message
    api.faults.huge_list = False
    seen.labels("success")


@pytest.mark.parametrize("fault", ["drip", "silent"])
def test_a_dripping_or_silent_watch_is_given_up_and_resumed(api: KubeAPI, start, fault: str):
    """A byte every 0.1 s keeps each read alive; the watch's life (twice timeoutSeconds)
    still ends it."""
    api.faults.watch = fault
    _, seen = start(api, watch_seconds=1)
    seen.labels("success")
    wait_until(lambda: len(api.watches()) >= 2, "a new watch after the stalled one")
    api.label(NODE, {MIG: "pending"})
    seen.labels("pending")


def test_stop_ends_a_watch_at_once(api: KubeAPI, start):
    api.faults.watch = "silent"
    watcher, seen = start(api)
    seen.labels("success")
    wait_until(api.watches, "a watch")
    time.sleep(0.3)
    assert watcher.stop(5)


def test_a_bad_token_file_is_a_problem_not_a_crash(api: KubeAPI, start, account: Path):
    (account / "token").write_bytes(b"abc\r\nX-Evil: 1")
    _, seen = start(api)
    problem = seen.problem("token")
    assert "abc" not in problem.message
    rotate_token(account, TOKEN)
    seen.labels("success")


SCHEMAS = "1.30.0"


def schema_check(doc: Any, name: str) -> None:
    """`doc` against the API's own JSON schema `name` (kubernetes-validate's strict schemas:
    no field the API does not define)."""
    from kubernetes_validate import utils

    folder = f"kubernetes-json-schema/v{SCHEMAS}-local-strict"
    schema = utils.schema_contents(f"{folder}/{name}.json", SCHEMAS)
    defs = utils.schema_contents(f"{folder}/_definitions.json", SCHEMAS)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(doc)


def fetch(api: KubeAPI, pki: Pki, path: str, accept: str = "application/json") -> Any:
    """What the stand-in sends for `path`: the status and the body's lines, as JSON."""
    context = ssl.create_default_context(cafile=str(pki.ca.crt))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", int(api.url.rsplit(":", 1)[1]), context=context, timeout=WAIT
    )
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
        resp = conn.getresponse()
        return resp.status, [json.loads(line) for line in resp.read().splitlines()]
    finally:
        conn.close()


def test_the_stand_ins_objects_are_the_apis(api: KubeAPI, pki: Pki):
    """Node, NodeList, Status and watch events as the stand-in sends them on the wire validate
    against the API's schemas; the metadata-only forms carry an ObjectMeta and a ListMeta."""
    selector = f"fieldSelector=metadata.name%3D{NODE}"
    code, [nodes] = fetch(api, pki, f"/api/v1/nodes?{selector}")
    assert code == 200 and nodes["kind"] == "NodeList" and len(nodes["items"]) == 1
    schema_check(nodes, "nodelist-v1")
    code, [partial] = fetch(api, pki, f"/api/v1/nodes?{selector}", kube.LIST_ACCEPT)
    assert partial["kind"] == "PartialObjectMetadataList" and partial["apiVersion"] == META
    schema_check({**partial, "kind": "NodeList", "apiVersion": "v1", "items": []}, "nodelist-v1")
    for item in partial["items"]:
        assert set(item) == {"kind", "apiVersion", "metadata"}
        schema_check({"kind": "Node", "apiVersion": "v1", "metadata": item["metadata"]}, "node-v1")
    api.label(NODE, {MIG: "pending"})
    api.compact()
    api.label(NODE, {MIG: "success"})
    code, events = fetch(
        api,
        pki,
        f"/api/v1/nodes?{selector}&watch=1&resourceVersion={api.compacted}&timeoutSeconds=1",
    )
    assert code == 200 and [e["type"] for e in events] == ["MODIFIED"]
    for event in events:
        schema_check(event, "watchevent-meta-v1")
        schema_check(event["object"], "node-v1")
    code, [gone] = fetch(api, pki, f"/api/v1/nodes?{selector}&watch=1&resourceVersion=1")
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410
    schema_check(gone, "watchevent-meta-v1")
    schema_check(gone["object"], "status-meta-v1")
    api.faults.forbidden.add("nodes")
    code, [refused] = fetch(api, pki, f"/api/v1/nodes?{selector}")
    assert code == 403
    schema_check(refused, "status-meta-v1")
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        schema_check({**nodes["items"][0], "labels": {}}, "node-v1")
