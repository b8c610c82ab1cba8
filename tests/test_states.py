"""The supervisor's states change in one place, along a table of edges: an impossible
transition is a bug, raised at once (the last resort stops the agent's tree and exits 70)."""

from __future__ import annotations

import os

import pytest

from gpu_supervise.config import Settings
from gpu_supervise.supervise import EDGES, State, StateError, Supervisor


@pytest.fixture
def supervisor():
    sup = Supervisor(Settings(), ["true"], pid=os.getpid(), env={})
    yield sup
    sup.inbox.close()


def test_every_edge_of_the_table_is_taken(supervisor: Supervisor):
    for old, new in EDGES:
        supervisor.state = old
        supervisor._change_state(new)
        assert supervisor.state is new


@pytest.mark.parametrize(
    ("old", "new"),
    [(old, new) for old in State for new in State if (old, new) not in EDGES],
)
def test_a_transition_without_an_edge_is_refused(supervisor: Supervisor, old: State, new: State):
    supervisor.state = old
    with pytest.raises(StateError, match=f"from {old.value} to {new.value}"):
        supervisor._change_state(new)
    assert supervisor.state is old


def test_the_exit_is_a_state_with_its_code(supervisor: Supervisor):
    supervisor.state = State.HOLDING
    supervisor._exit(143, "stopped by SIGTERM while holding")
    assert supervisor.state is State.EXITING
    assert supervisor.outcome == (143, "stopped by SIGTERM while holding")
    with pytest.raises(StateError):
        supervisor._exit(1, "a second exit")
    assert supervisor.outcome == (143, "stopped by SIGTERM while holding")
