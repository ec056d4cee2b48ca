"""Sessions: one avatar stream each — its engine on a worker, its clock, input timeline, output and peers."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from PIL import Image

from live.engine.calibration import sessions_per_worker
from live.engine.worker import EngineHandle, EngineWorker, WorkerBusy, worker_devices
from live.loop_lag import LoopLagMonitor
from live.metrics import CounterRate, LiveGauges, ServerMetrics, SessionGauges
from live.native_memory import release_free_memory
from live.peer import OfferError, PeerLink, parse_offer
from live.settings import Settings
from live.sinks import Sink
from live.sinks.encoder import SharedAudioEncoder, SharedVideoEncoder
from live.sinks.rtmp import RtmpPush
from live.sinks.tracks import (
    AvatarAudioTrack,
    AvatarVideoTrack,
    check_h264_offer,
    prefer_h264,
    repeat_retransmissions,
    route_keyframe_requests,
)
from live.sinks.vcam import VirtualCamera, VirtualCameraError
from live.stream.audio_feed import INPUT_SLACK_S, AudioFeed
from live.stream.clock import SessionClock
from live.stream.output import SessionOutput
from model.audio_features import SAMPLE_RATE

log = logging.getLogger(__name__)

OUTPUT_MARGIN_FRAMES = 2
MAX_VIEWERS = 8
REAP_INTERVAL_S = 0.5
ENGINE_CLOSE_TIMEOUT_S = 30.0


class AdmissionError(RuntimeError):
    """No session can be started now (the server is full or the model is not loaded)."""


class EngineStartError(RuntimeError):
    """The engine could not start a session (e.g. it rejected the reference image)."""


class ViewerLimit(RuntimeError):
    """A session already has the maximum number of viewers."""


@dataclass
class SessionOptions:
    """What a new session looks like: reference image (None = built-in character) and prompt."""

    image: Image.Image | None = None
    image_name: str = "default"
    prompt: str = ""


class Session:
    """One avatar stream, from its talker's mic (WebSocket talker or WHIP ingest) to any number of viewers.

    Everything a session holds — engine (on its worker), tasks, peer connections — is released by :meth:`close`,
    whether the peer said goodbye, vanished (the manager's reaper) or the engine failed.
    """

    def __init__(self, manager: "SessionManager", kind: str, options: SessionOptions, handle: EngineHandle,
                 delay_s: float) -> None:
        """Wire a started engine to a new clock, input timeline and output; starts the output pump."""
        eng = handle.engine
        self.id = secrets.token_urlsafe(9)
        self.kind = kind
        self.options = options
        self.created = time.time()
        self.handle = handle
        self._manager = manager
        self._metrics = manager.metrics
        self._ice_servers = [s.with_credentials() for s in manager.settings.server.ice_servers]  # TURN: minted
        self.clock = SessionClock()
        self.feed = AudioFeed(handle, fps=eng.fps, delay_s=delay_s, metrics=self._metrics)
        self.output = SessionOutput(self.clock, eng.fps, self.feed, eng.ring, eng.width, eng.height, delay_s,
                                    self._metrics)
        self.video_encoder = SharedVideoEncoder(eng.width, eng.height, eng.fps, manager.settings.output,
                                                self._metrics, handle.worker.device)
        self.audio_encoder = SharedAudioEncoder()
        self.rtmp: RtmpPush | None = None
        self._rtmp_lock = asyncio.Lock()
        self.vcam: dict | None = None
        device = manager.settings.output.vcam_device
        camera = None
        if device:
            try:
                camera = VirtualCamera(device, eng.width, eng.height, eng.fps)
                self.vcam = {"device": device, "state": "on", "error": None}
            except VirtualCameraError as exc:
                log.warning("session %s: no virtual camera: %s", self.id, exc)
                self.vcam = {"device": device, "state": "error", "error": str(exc)}
        self.talker: PeerLink | None = None
        self.viewers: dict[str, PeerLink] = {}
        self.ended = asyncio.Event()
        self.end_reason = ""
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._generated_rate = CounterRate()
        loop = asyncio.get_running_loop()
        handle.on_error = lambda exc: loop.call_soon_threadsafe(
            self.spawn, self.close(f"engine error: {exc.__class__.__name__}: {exc}"))
        self.spawn(self.feed.run(self.clock))
        self.spawn(self.output.run())
        for sink in (self.video_encoder, self.audio_encoder, camera):
            if sink is not None:
                self.add_sink(sink)

    # ----- peers ----------------------------------------------------------------------------------------
    async def connect_talker(self, offer_sdp: str) -> str:
        """The talker's peer: its mic drives the avatar and it receives the avatar. Returns the SDP answer."""
        check_h264_offer(offer_sdp)
        link = PeerLink("talker", self._talker_gone, self._ice_servers)
        self._add_video(link)
        link.pc.addTransceiver(AvatarAudioTrack(self.audio_encoder), direction="sendrecv")
        return await self._connect(link, offer_sdp, refuse=())

    async def connect_ingest(self, offer_sdp: str) -> str:
        """A WHIP peer: its audio drives the avatar, it receives nothing. Returns the SDP answer."""
        link = PeerLink("ingest", self._talker_gone, self._ice_servers)
        return await self._connect(link, offer_sdp, refuse=("video",))

    async def add_viewer(self, offer_sdp: str) -> tuple[PeerLink, str]:
        """A WHEP viewer of this session: the video, and the voice if the offer has an audio section. Returns its
        link and the SDP answer."""
        if len(self.viewers) >= MAX_VIEWERS:
            raise ViewerLimit(f"session {self.id} already has {MAX_VIEWERS} viewers")
        check_h264_offer(offer_sdp)
        link = PeerLink("viewer", lambda lk, reason: self.spawn(self.remove_viewer(lk.id)), self._ice_servers)
        self._add_video(link)
        if "audio" in {m.kind for m in parse_offer(offer_sdp).media}:
            link.pc.addTransceiver(AvatarAudioTrack(self.audio_encoder), direction="sendonly")
        try:
            answer = await link.answer(offer_sdp)
        except BaseException:
            await link.close()
            raise
        self.viewers[link.id] = link
        return link, answer

    async def add_talker_candidate(self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None) -> None:
        """A trickled ICE candidate of the talker; raises ``OfferError`` when it is malformed or unusable."""
        if self.talker is None:
            raise OfferError("no talker connection to add an ICE candidate to")
        await self.talker.add_candidate(candidate, sdp_mid, sdp_mline_index)

    async def remove_viewer(self, viewer_id: str) -> bool:
        """Close one viewer; False if there is no such viewer."""
        link = self.viewers.pop(viewer_id, None)
        if link is None:
            return False
        await link.close()
        return True

    def _add_video(self, link: PeerLink) -> None:
        """The shared encoder's video on a new sendonly H.264 transceiver that routes PLI/FIR to the encoder."""
        transceiver = link.pc.addTransceiver(AvatarVideoTrack(self.video_encoder), direction="sendonly")
        prefer_h264(transceiver)
        route_keyframe_requests(transceiver, self.video_encoder)
        repeat_retransmissions(transceiver)

    async def _connect(self, link: PeerLink, offer_sdp: str, refuse: tuple[str, ...]) -> str:
        link.pc.on("track", lambda track: self._remote_track(link, track))
        self.talker = link
        try:
            return await link.answer(offer_sdp, refuse=refuse)
        except BaseException:
            self.talker = None
            await link.close()
            raise

    def _talker_gone(self, link: PeerLink, reason: str) -> None:
        self.spawn(self.close(reason))

    def _remote_track(self, link: PeerLink, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not any(t.get_name() == "mic" for t in self._tasks):
            self.spawn(self._read_mic(link, track), name="mic")
        else:
            link.drain(track)

    async def _read_mic(self, link: PeerLink, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            while True:
                frame = await track.recv()
                link.touch()
                for out in resampler.resample(frame):
                    self.feed.add_mic(out.to_ndarray().reshape(-1), self.clock.now())
        except MediaStreamError:
            pass

    # ----- control --------------------------------------------------------------------------------------
    def add_sink(self, sink: Sink) -> None:
        """Feed this session's output to ``sink`` until the session ends."""
        self.spawn(sink.run(self.output))

    async def start_rtmp(self, url: str) -> dict:
        """Push this session to ``url`` (replacing a running push); raises ``RtmpUrlError`` for a bad URL and
        ``RtmpRefused`` for a host that ``output.rtmp_allowed_hosts`` does not list.

        Returns the push status; the push connects and reconnects in a worker process of its own. Starts and stops
        run one at a time, so concurrent requests leave exactly one push (or none), never an orphan.
        """
        output = self._manager.settings.output
        push = RtmpPush(url, self.video_encoder, self.audio_encoder, output.rtmp_allowed_hosts, output.rtmp_audio_kbps)
        async with self._rtmp_lock:
            await self._stop_rtmp()
            if self._closing:
                push.status.state, push.status.error = "stopped", "the session is ending"
                return push.status.as_dict()
            self.rtmp = push
            push.start()
        log.info("session %s: RTMP push to %s", self.id, push.status.url)
        return push.status.as_dict()

    async def stop_rtmp(self) -> bool:
        """Stop the RTMP push; False if there was none."""
        async with self._rtmp_lock:
            return await self._stop_rtmp()

    async def _stop_rtmp(self) -> bool:
        push, self.rtmp = self.rtmp, None
        if push is None:
            return False
        await push.stop()
        return True

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt; it takes effect at the next block."""
        self.options.prompt = prompt
        self.handle.engine.set_prompt(prompt)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        """Run ``coro`` as a task owned by this session (cancelled when it closes)."""
        task = asyncio.ensure_future(coro)
        if name is not None:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closing

    async def last_activity(self) -> float:
        """Wall time of the latest sign of life of the talker (mic audio, signaling, receiver reports)."""
        return await self.talker.last_activity() if self.talker is not None else self.created

    async def close(self, reason: str) -> None:
        """End the session and free everything it holds (idempotent)."""
        if self._closing:
            return
        self._closing = True
        self.end_reason = reason
        log.info("session %s closed: %s", self.id, reason)
        self.output.close()
        self.video_encoder.close()
        self.handle.close()
        self.handle.on_error = None  # the handle's only reference back to this session
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await self.stop_rtmp()
        links = [lk for lk in (self.talker, *self.viewers.values()) if lk is not None]
        self.viewers.clear()
        await asyncio.gather(*(lk.close() for lk in links), return_exceptions=True)
        try:
            # The engine closes on its worker thread, after any block it is running.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.handle.closed)), ENGINE_CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("session %s: engine did not close within %s s", self.id, ENGINE_CLOSE_TIMEOUT_S)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.video_encoder.released)), ENGINE_CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("session %s: video encoder did not stop within %s s", self.id, ENGINE_CLOSE_TIMEOUT_S)
        await asyncio.to_thread(release_free_memory)
        self._manager.forget(self)
        self.ended.set()

    # ----- reporting ------------------------------------------------------------------------------------
    def info(self) -> dict:
        """The session as /health shows it."""
        delay = self.output.output_delay_s
        return {
            "id": self.id,
            "kind": self.kind,
            "age_s": round(time.time() - self.created, 1),
            "image": self.options.image_name,
            "prompt": self.options.prompt,
            "viewers": len(self.viewers),
            "input_started": self.feed.origin is not None,
            "latency_s": None if delay is None else round(delay, 3),
            "frames_generated": self.handle.frames_generated,
            "frames_sent": self.output.frames_sent,
            "frames_repeated": self.output.frames_repeated,
            "silence_filled_s": round(self.feed.filled_samples / SAMPLE_RATE, 2),
            "mic_dropped_s": round(self.feed.dropped_samples / SAMPLE_RATE, 2),
            "frames_withheld": self.feed.withheld_frames,
            "size": [self.handle.engine.width, self.handle.engine.height],
            "encoder": {"name": self.video_encoder.name, "frames_encoded": self.video_encoder.frames_encoded,
                        "frames_dropped": self.video_encoder.frames_dropped,
                        "keyframes": self.video_encoder.keyframes,
                        "consumers": len(self.video_encoder.packets)},
            "rtmp": None if self.rtmp is None else self.rtmp.status.as_dict(),
            "vcam": self.vcam,
        }

    def stream_info(self) -> dict:
        """What a peer needs to know of the stream it receives: frame rate, size and output delay."""
        choice = self.handle.worker.realtime
        return {"fps": self.output.fps, "width": self.handle.engine.width, "height": self.handle.engine.height,
                "latency_s": round(self.output.delay_s, 3),
                "realtime": None if choice is None else {"size_area": choice.size_area, "sustains": choice.sustains,
                                                         "fps_capacity": round(choice.fps_capacity, 1)}}

    def gauges(self) -> SessionGauges:
        """Live values for /metrics."""
        delay = self.output.output_delay_s
        return SessionGauges(
            session_id=self.id,
            viewers=len(self.viewers) + (1 if self.talker is not None and self.talker.role == "talker" else 0),
            ring_frames=len(self.handle.engine.ring),
            generated_fps=self._generated_rate.rate(self.handle.frames_generated),
            sent_fps=self.output.sent_meter.rate(),
            mouth_to_photon_s=self.output.delay_s if delay is None else delay,
            frames_sent=self.output.frames_sent,
            frames_encoded=self.video_encoder.frames_encoded,
            video_consumers=len(self.video_encoder.packets),
            rtmp_connected=None if self.rtmp is None else int(self.rtmp.connected),
            rtmp_reconnects=0 if self.rtmp is None else self.rtmp.status.reconnects,
        )


class SessionManager:
    """Owns the engine workers and every session; enforces ``max_sessions`` and reaps vanished peers."""

    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        """One worker per device of ``settings``; nothing starts until :meth:`start`."""
        self.settings = settings
        self.metrics = metrics
        devices = worker_devices(settings)
        sessions = sessions_per_worker(settings.server.max_sessions, len(devices))
        self.workers = [EngineWorker(settings.model_copy(update={"device": d}), metrics, sessions=sessions)
                        for d in devices]
        self.sessions: dict[str, Session] = {}
        self.loop_lag = LoopLagMonitor(metrics.loop_lag_seconds)
        self._starting = 0
        self._reaper: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        metrics.bind_live(self.live_gauges)

    async def start(self) -> None:
        """Load the models (on the worker threads) and start reaping."""
        for worker in self.workers:
            worker.start()
        results = await asyncio.gather(*(w.wait_ready() for w in self.workers), return_exceptions=True)
        for worker, result in zip(self.workers, results):
            if isinstance(result, BaseException):
                log.error("worker %s failed to load the model: %s", worker.device, result)
        self._reaper = asyncio.ensure_future(self._reap_forever())
        self._lag_task = asyncio.ensure_future(self.loop_lag.run())

    async def stop(self) -> None:
        """Close every session and stop the workers."""
        for task in (self._reaper, self._lag_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers))

    async def create(self, kind: str, options: SessionOptions) -> Session:
        """Start a session's engine on the least loaded worker; raises :class:`AdmissionError` when full."""
        limit = self.settings.server.max_sessions
        if len(self.sessions) + self._starting >= limit:
            self.metrics.sessions_rejected.inc()
            raise AdmissionError(f"server is full: {limit} of {limit} sessions are running; try again later")
        ready = [w for w in self.workers if w.ready]
        if not ready:
            errors = [f"{w.device}: {w.load_error}" for w in self.workers if w.load_error is not None]
            raise AdmissionError("model failed to load (" + "; ".join(errors) + ")" if errors
                                 else "model is still loading; try again in a moment")
        worker = min(ready, key=lambda w: w.engines)
        self._starting += 1
        try:
            handle = await worker.open(options.image, options.prompt, self.settings.seed)
        except WorkerBusy as exc:
            self.metrics.sessions_rejected.inc()
            raise AdmissionError(str(exc)) from None
        except Exception as exc:
            log.exception("engine start failed")
            raise EngineStartError(f"the avatar engine could not start: {exc.__class__.__name__}: {exc}") from exc
        finally:
            self._starting -= 1
        try:
            session = Session(self, kind, options, handle, self._delay_s(worker, handle))
        except Exception as exc:
            handle.close()
            log.exception("session outputs failed to start")
            raise EngineStartError(f"the session's outputs could not start: {exc.__class__.__name__}: {exc}") from exc
        self.sessions[session.id] = session
        self.metrics.sessions_started.inc()
        log.info("session %s started (%s), output delay %.3f s", session.id, kind, session.output.delay_s)
        return session

    def get(self, session_id: str) -> Session | None:
        """The running session with this id, if any."""
        return self.sessions.get(session_id)

    def forget(self, session: Session) -> None:
        """Called by a closing session."""
        self.sessions.pop(session.id, None)

    def _delay_s(self, worker: EngineWorker, handle: EngineHandle) -> float:
        """Output delay, sized for what this session needs: the engine's lookahead + block, the worker's pessimistic
        block time once for every engine on it now (this one included: their blocks take turns), input slack and
        a margin of frames. A session that starts alone on its worker does not pay for sessions that may never
        come; one that joins later pays for those already there. (Sized for ``max_sessions`` instead, a lone tiny
        session answered ~0.2 s later.)"""
        eng = handle.engine
        sharing = max(1, worker.engines)
        return (eng.latency_s + worker.block_estimate_s() * sharing + INPUT_SLACK_S
                + OUTPUT_MARGIN_FRAMES / eng.fps)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            await asyncio.gather(*(self._reap(s) for s in list(self.sessions.values())))

    async def _reap(self, session: Session) -> None:
        """Close the session if its talker went quiet, and drop viewers that did.

        ``reap_after_s`` is the deadline for a vanished peer's session to be gone with its engine freed, so the
        close starts early enough for the block its worker may be running to finish (never before half of it).
        """
        deadline = self.settings.server.reap_after_s
        limit = max(deadline / 2, deadline - REAP_INTERVAL_S - session.handle.worker.block_estimate_s())
        if session.closing:
            return
        try:
            now = time.time()
            quiet = now - await session.last_activity()
            if quiet > limit:
                self.metrics.sessions_reaped.inc()
                await session.close(f"peer vanished: nothing heard from it for {quiet:.1f} s")
                return
            for vid, link in list(session.viewers.items()):
                if now - await link.last_activity() > deadline:
                    await session.remove_viewer(vid)
        except Exception:  # noqa: BLE001 - the reaper must outlive any one session
            log.exception("reaping session %s failed", session.id)

    def live_gauges(self) -> LiveGauges:
        """Scrape-time values for /metrics."""
        return LiveGauges(sessions=[s.gauges() for s in self.sessions.values()],
                          engines_by_device={w.device: w.engines for w in self.workers},
                          loop_lag_p99_s=self.loop_lag.quantile(0.99))

    def health(self) -> dict:
        """The body of GET /health."""
        failed = [w for w in self.workers if w.load_error is not None]
        status = "error" if failed else ("ok" if all(w.ready for w in self.workers) else "starting")
        s = self.settings
        return {
            "status": status,
            "config": s.name,
            "source": str(s.source) if s.source else None,
            "model": {"fps": s.video.fps, "size_area": s.video.size_area, "steps": s.stream.steps,
                      "weights": str(s.checkpoint_dir or s.weights or "random")},
            "max_sessions": s.server.max_sessions,
            "event_loop_lag_p99_ms": round(self.loop_lag.quantile(0.99) * 1000, 2),
            "workers": [{"device": w.device, "ready": w.ready, "engines": w.engines,
                         "block_s": round(w.block_estimate_s(), 4),
                         "gpu_memory_gib": w.memory_gib(),
                         "realtime": (w.realtime.as_dict() if w.realtime is not None
                                      else {"mode": s.video.realtime, "size_area": s.video.size_area}),
                         **({"error": str(w.load_error)} if w.load_error is not None else {})}
                        for w in self.workers],
            "sessions": [sess.info() for sess in self.sessions.values()],
        }
