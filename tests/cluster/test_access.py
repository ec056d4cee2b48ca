"""Access rules of a cluster without Ray: the front door takes the cluster's token secret and refuses other auth
settings, anonymous /health shows counts only, and hosts trust the cluster's nodes as proxies."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from cluster.front_door import ClusterError, cluster_settings
from cluster.placement import Host, HostTable
from cluster.status import cluster_health
from live.settings import AuthSettings, GuardSettings, load_settings
from signaling.guard import Guard

KEY = "operator-key-0123456789"
SECRET = "cluster-secret-0123456789"


def test_a_front_door_takes_the_cluster_secret_and_refuses_another_key():
    settings = load_settings("configs/tiny.yaml")
    mine = settings.model_copy(update={"server": settings.server.model_copy(
        update={"auth": AuthSettings(api_key=KEY)})})
    cluster = AuthSettings(api_key=KEY, token_secret=SECRET)
    assert cluster_settings(mine, cluster).server.auth == cluster
    with pytest.raises(ClusterError, match="differs from the cluster's in api_key"):
        cluster_settings(mine, AuthSettings(api_key="another-key-0123456789", token_secret=SECRET))
    with pytest.raises(ClusterError, match="in token_secret"):
        cluster_settings(cluster_settings(mine, cluster), cluster.model_copy(update={"token_secret": "x" * 16}))


def test_anonymous_health_counts_sessions_without_naming_them():
    table = HostTable()
    table.add(Host(node_id="n0", node_ip="10.0.0.1", slots=2))
    table.ready("n0", "http://10.0.0.1:1")
    table.settle(table.place(), "s1")
    snapshot = {"profile": "tiny", **table.snapshot()}
    admin = cluster_health(snapshot, "10.0.0.9:6379", admin=True)
    anonymous = cluster_health(snapshot, "10.0.0.9:6379", admin=False)
    assert [s["id"] for s in admin["sessions"]] == ["s1"] and admin["hosts"][0]["url"] == "http://10.0.0.1:1"
    assert anonymous["session_count"] == 1 and anonymous["hosts"][0]["sessions"] == 1
    assert not {"sessions", "cluster"} & anonymous.keys()
    assert not {"url", "node_id", "session_ids"} & anonymous["hosts"][0].keys()


def test_a_host_counts_the_client_behind_a_trusted_node():
    guard = Guard(GuardSettings(trusted_proxies=["10.0.0.250"]), "10.0.0.1")
    front_door = mock.Mock(**{"get_extra_info.return_value": ("10.0.0.2", 5000)})
    request = make_mocked_request("GET", "/", headers={"X-Forwarded-For": "203.0.113.7"}, transport=front_door)
    assert guard.client_address(request) == "10.0.0.2"
    guard.trust(["10.0.0.2"])
    assert guard.client_address(request) == "203.0.113.7"
