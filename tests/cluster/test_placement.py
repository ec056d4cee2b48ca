"""The host table without Ray: least-loaded placement, reservations, polls, hosts that die."""

from __future__ import annotations

from cluster.placement import FAILED, READY, UNREACHABLE, Host, HostTable, Located, Placement, Refusal


def _table(*slots: int) -> HostTable:
    table = HostTable()
    for i, n in enumerate(slots):
        table.add(Host(node_id=f"n{i}", node_ip=f"10.0.0.{i}", slots=n))
        table.ready(f"n{i}", f"http://10.0.0.{i}:1")
    return table


def _health(*ids: str, status: str = "ok") -> dict:
    return {"status": status, "workers": [], "sessions": [{"id": i} for i in ids]}


def test_sessions_go_to_the_least_loaded_host_and_a_full_cluster_refuses():
    table = _table(2, 2)
    first = table.place(now=0)
    second = table.place(now=0)
    assert isinstance(first, Placement) and isinstance(second, Placement)
    assert {first.node_id, second.node_id} == {"n0", "n1"}
    table.settle(first, "a", now=0)
    table.settle(second, "b", now=0)
    assert {table.place(now=0).node_id, table.place(now=0).node_id} == {"n0", "n1"}  # reservations count as load
    refusal = table.place(now=0)
    assert isinstance(refusal, Refusal) and refusal.full and "full" in refusal.message
    assert table.rejected_total == 1 and table.placed_total == 4


def test_a_reservation_that_is_never_settled_expires():
    table = _table(1)
    table.place(now=0)
    assert isinstance(table.place(now=1), Refusal)
    assert isinstance(table.place(now=120), Placement)


def test_a_poll_keeps_sessions_bound_since_it_was_sent_and_learns_the_others():
    table = _table(4)
    placement = table.place(now=0)
    table.settle(placement, "new", now=10)
    table.observe("n0", _health("whip"), asked_at=5)  # sent before "new" was bound: it does not know it yet
    assert set(table.hosts["n0"].sessions) == {"new", "whip"}
    table.observe("n0", _health("whip"), asked_at=20)  # "new" ended on the host
    assert set(table.hosts["n0"].sessions) == {"whip"}
    assert table.locate("whip") == Located(url="http://10.0.0.0:1", node_id="n0")


def test_only_ready_hosts_take_sessions_and_the_refusal_says_why():
    table = _table(2, 2)
    table.fail("n0", UNREACHABLE, "no answer")
    table.observe("n1", {**_health(status="error"), "workers": [{"error": "weights missing"}]}, asked_at=0)
    assert table.hosts["n1"].state == FAILED
    refusal = table.place(now=0)
    assert isinstance(refusal, Refusal) and not refusal.full
    assert "unreachable (no answer)" in refusal.message and "weights missing" in refusal.message
    table.observe("n0", _health(), asked_at=0)
    assert table.hosts["n0"].state == READY and table.place(now=0).node_id == "n0"


def test_a_host_that_dies_ends_exactly_its_sessions_with_the_reason():
    table = _table(2, 2)
    table.observe("n0", _health("a"), asked_at=0)
    table.observe("n1", _health("b"), asked_at=0)
    assert table.drop("n1", "avatar host 10.0.0.1 died") == ["b"]
    assert table.locate("b") == Located(ended="avatar host 10.0.0.1 died")
    assert table.locate("a").node_id == "n0"
    assert table.locate("nope") is None
    snap = table.snapshot()
    assert [h["node_ip"] for h in snap["hosts"]] == ["10.0.0.0"]
    assert snap["hosts_lost_total"] == 1 and snap["slots"] == 2 and snap["free_slots"] == 1
    assert table.place(now=0).node_id == "n0"
