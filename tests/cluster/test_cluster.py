"""Sessions over a real local Ray cluster: a head and two avatar nodes (``ray start`` on loopback addresses, 2 avatar
slots each, the tiny profile on CPU) and two front doors (``live-avatar serve --cluster``), driven by real aiortc
clients. Sessions land on both nodes and stream; a front door serves viewers of sessions another placed, with the view
token the session's host issued (the cluster shares one token secret and API key); a node that dies ends exactly
its sessions with a reason, and the next session goes to the survivor; a node that joins takes sessions at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from cli.client import WhepViewer, new_peer, talk
from live.settings import load_settings
from tests.cluster.local_cluster import FrontDoorProcess, LocalRayCluster
from tests.conftest import ARTIFACTS
from tests.server_helpers import API_KEY, get_json, get_text, metric, wait_until

NODES = ("127.0.0.3", "127.0.0.4")
NEW_NODE = "127.0.0.5"
SLOTS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster and two front doors with an API key (no token secret: the cluster draws one); everything it
    started is killed at the end (logs: artifacts/)."""
    settings = load_settings("configs/tiny.yaml")
    auth = settings.server.auth.model_copy(update={"api_key": API_KEY})
    settings = settings.model_copy(update={"video": settings.video.model_copy(update={"size_area": "64*64"}),
                                           "server": settings.server.model_copy(update={"auth": auth})})
    profile = tmp_path_factory.mktemp("cluster") / "tiny.yaml"
    profile.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude={"source"})))
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "cluster-tests.log", "w")
    ray_cluster = LocalRayCluster(log)
    doors: list[FrontDoorProcess] = []
    try:
        ray_cluster.start_head()
        for ip in NODES:
            ray_cluster.add_node(ip, SLOTS)
        doors = [FrontDoorProcess(ray_cluster, profile, log) for _ in range(2)]
        for door in doors:
            door.wait_hosts(len(NODES))
        yield ray_cluster, doors[0].url, doors[1].url
    finally:
        for door in doors:
            door.stop()
        ray_cluster.stop()
        log.close()


async def _host_of(front_door: str, session_id: str) -> str | None:
    health = await get_json(front_door + "/health")
    return next((s["host"] for s in health["sessions"] if s["id"] == session_id), None)


async def _idle(front_door: str) -> None:
    """Wait until the cluster runs no session (those of an earlier test have ended everywhere)."""
    async def check() -> bool:
        return (await get_json(front_door + "/health"))["sessions"] == []

    await wait_until(check, 30, "the cluster to run no session")


async def _settled(tasks: list[asyncio.Task]) -> None:
    """Cancel what is still running (a failed test) and give it time to hang up."""
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks, timeout=15)


async def _running(front_door: str, count: int) -> list[dict]:
    """Wait until ``count`` sessions run with input arriving; returns them (each with its ``host``)."""
    found: list[dict] = []

    async def check() -> bool:
        nonlocal found
        found = [s for s in (await get_json(front_door + "/health"))["sessions"] if s.get("input_started")]
        return len(found) == count

    await wait_until(check, 60, f"{count} sessions to run")
    return found


async def _new_session(front_door: str, known: set[str]) -> dict:
    """Wait until a session not in ``known`` runs with input arriving; returns it (with its ``host``)."""
    found: list[dict] = []

    async def check() -> bool:
        nonlocal found
        found = [s for s in (await get_json(front_door + "/health"))["sessions"]
                 if s.get("input_started") and s["id"] not in known]
        return bool(found)

    await wait_until(check, 60, "a new session to run")
    return found[0]


def _view_tokens(logs: list[list[dict]]) -> dict[str, str]:
    """Session id → the view token of its ``answer``, from the server messages of talkers."""
    return {m["session_id"]: m["view_token"] for log in logs for m in log if m.get("type") == "answer"}


async def _offer() -> str:
    pc = new_peer()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_sessions_land_on_both_nodes_and_any_front_door_serves_their_viewers(cluster, speech_wav):
    _, door_a, door_b = cluster
    await _idle(door_a)
    logs: list[list[dict]] = [[], []]
    talks = [asyncio.ensure_future(talk(door_a, speech_wav, seconds=12.0, messages=log)) for log in logs]
    try:
        sessions = await _running(door_a, 2)
        assert sorted(s["host"] for s in sessions) == list(NODES)  # least loaded: one per node
        anonymous = await get_json(door_b + "/health", headers={})
        assert anonymous["session_count"] == 2 and "sessions" not in anonymous  # counts only without the key
        async with aiohttp.ClientSession() as http:
            async with http.post(door_b + f"/whep/{sessions[0]['id']}", data=await _offer(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                assert resp.status == 401, await resp.text()  # watching needs the session's view token
        # The second front door finds the session in the cluster's registry and forwards the viewer to its host,
        # which accepts the view token it gave the talker through the first front door.
        viewer = WhepViewer(door_b, sessions[0]["id"], token=_view_tokens(logs)[sessions[0]["id"]])
        await viewer.start()
        await asyncio.sleep(3.0)
        assert await viewer.stop(time.time()) == 200
        assert len(viewer.recorder.video) >= 25, "the viewer got less than a second of video in 3 s"
        results = await asyncio.gather(*talks)
    finally:
        await _settled(talks)
    for result in results:
        assert not [m for m in result.server_messages if m.get("type") in ("ended", "error")]
        assert result.report.frames_ratio >= 0.75, result.report.summary()
    health = await get_json(door_b + "/health")
    assert health["status"] == "ok" and health["max_sessions"] == len(NODES) * SLOTS
    assert [h["node_ip"] for h in health["hosts"]] == list(NODES)
    assert metric(await get_text(door_b + "/metrics"), "live_avatar_cluster_sessions_placed_total") >= 2


async def test_a_dead_node_ends_exactly_its_sessions_and_the_next_goes_to_the_survivor(cluster, speech_wav):
    ray_cluster, door_a, door_b = cluster
    await _idle(door_a)
    logs: list[list[dict]] = [[], []]
    talks = [asyncio.ensure_future(talk(door_a, speech_wav, seconds=30.0, messages=log)) for log in logs]
    follow_up = None
    try:
        sessions = await _running(door_a, 2)
        doomed = next(s for s in sessions if s["host"] == NODES[1])
        await asyncio.to_thread(ray_cluster.kill_node, NODES[1])
        killed_at = time.monotonic()

        # The talker on the dead node hears why, at once; the other one does not.
        done, _ = await asyncio.wait(talks, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "no session ended within 15 s of its node's death"
        lost = done.pop().result()
        assert lost.session_id == doomed["id"]
        ended = [m for m in lost.server_messages if m.get("type") == "ended"]
        assert len(ended) == 1 and ended[0]["session_id"] == doomed["id"], ended
        assert f"avatar host {NODES[1]} died" in ended[0]["reason"], ended
        assert time.monotonic() - killed_at < 10

        # The next session goes to the survivor, which is then full: a third is refused like one full server does.
        follow_up = asyncio.ensure_future(talk(door_a, speech_wav, seconds=6.0))
        assert (await _new_session(door_a, {s["id"] for s in sessions}))["host"] == NODES[0]
        async with aiohttp.ClientSession() as http:
            async with http.post(door_b + "/whip", data=await _offer(),
                                 headers={"Content-Type": "application/sdp"}) as resp:
                body = await resp.json()
                assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0, body
                assert "full" in body["message"]

            # Once Ray has declared the node dead, every front door says what happened to its sessions.
            async def gone() -> bool:
                async with http.post(door_b + f"/whep/{doomed['id']}", data=await _offer(),
                                     headers={"Content-Type": "application/sdp",
                                              "Authorization": f"Bearer {_view_tokens(logs)[doomed['id']]}"}) as resp:
                    return resp.status == 410 and f"avatar host {NODES[1]} died" in (await resp.json())["message"]

            await wait_until(gone, 30, "the dead session's viewers to be told it ended")
        health = await get_json(door_b + "/health")
        assert [h["node_ip"] for h in health["hosts"]] == [NODES[0]]
        assert metric(await get_text(door_b + "/metrics"), "live_avatar_cluster_hosts_lost_total") == 1

        follow = await follow_up
        survivor = await [t for t in talks if not t.done()][0]
    finally:
        await _settled([*talks, *([follow_up] if follow_up else [])])
    for result in (follow, survivor):
        assert not [m for m in result.server_messages if m.get("type") in ("ended", "error")]
        assert result.report.frames_ratio >= 0.75, result.report.summary()


async def test_a_node_that_joins_takes_sessions_at_once(cluster, speech_wav):
    ray_cluster, door_a, door_b = cluster
    await _idle(door_a)
    ray_cluster.add_node(NEW_NODE, 1)

    async def joined() -> bool:
        hosts = (await get_json(door_b + "/health"))["hosts"]
        return any(h["node_ip"] == NEW_NODE and h["state"] == "ready" for h in hosts)

    await wait_until(joined, 90, f"the node on {NEW_NODE} to get a ready avatar host")
    # Least loaded per slot: the survivor (2 slots) takes the first session, the new node (1 slot) the second.
    talks = [asyncio.ensure_future(talk(door_a, speech_wav, seconds=6.0)) for _ in range(2)]
    try:
        sessions = await _running(door_a, 2)
        assert sorted(s["host"] for s in sessions) == [NODES[0], NEW_NODE]
        results = await asyncio.gather(*talks)
    finally:
        await _settled(talks)
    for result in results:
        assert not [m for m in result.server_messages if m.get("type") in ("ended", "error")]
        assert result.report.frames_ratio >= 0.75, result.report.summary()


def test_the_front_door_refuses_to_start_without_a_cluster(tmp_path):
    """A wrong address is one line naming it, not a traceback."""
    import subprocess

    from cli.server_process import serve_command

    proc = subprocess.run([*serve_command(), "serve", "--cluster", "127.0.0.9:9", "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot join the Ray cluster at 127.0.0.9:9" in proc.stderr
