"""Prometheus metrics of the server: counters fed by sessions and workers, live gauges read at scrape time."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ENCODE_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1)
BLOCK_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.48, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)


class RateMeter:
    """Events per second over a sliding window; memory is bounded by ``max_events``."""

    def __init__(self, window_s: float = 2.0, max_events: int = 512) -> None:
        """Count events of the last ``window_s`` seconds (at most ``max_events`` of them are remembered)."""
        self._window = window_s
        self._events: deque[tuple[float, int]] = deque(maxlen=max_events)

    def add(self, n: int = 1, now: float | None = None) -> None:
        """Record ``n`` events now."""
        self._events.append((time.monotonic() if now is None else now, n))

    def rate(self, now: float | None = None) -> float:
        """Events per second over the window."""
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] < now - self._window:
            self._events.popleft()
        return sum(n for _, n in self._events) / self._window


class CounterRate:
    """Rate of a growing counter, from samples taken whenever someone asks (e.g. at each scrape).

    The baseline is the newest sample at least ``window_s`` old, so sparse scrapes give the average since the
    previous one and frequent ones a ``window_s`` average.
    """

    def __init__(self, window_s: float = 2.0) -> None:
        """Average over at least ``window_s`` seconds."""
        self._window = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, count: int, now: float | None = None) -> float:
        """Record ``count`` now and return the counter's rate per second."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, count))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


@dataclass
class SessionGauges:
    """Live values of one session, read when /metrics is scraped."""

    session_id: str
    viewers: int
    ring_frames: int
    generated_fps: float
    sent_fps: float
    mouth_to_photon_s: float
    frames_sent: int = 0
    frames_encoded: int = 0
    video_consumers: int = 0
    rtmp_connected: int | None = None
    rtmp_reconnects: int = 0


@dataclass
class LiveGauges:
    """Everything /metrics reads at scrape time."""

    sessions: list[SessionGauges] = field(default_factory=list)
    engines_by_device: dict[str, int] = field(default_factory=dict)
    loop_lag_p99_s: float = 0.0


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], LiveGauges]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        live = self._read()
        yield GaugeMetricFamily("live_avatar_sessions", "Sessions running now.", value=len(live.sessions))
        per_session = [
            ("live_avatar_viewers", "Peers receiving the session's avatar (talker + WHEP viewers).", "viewers"),
            ("live_avatar_ring_occupancy_frames", "Frames waiting in the session's frame ring.", "ring_frames"),
            ("live_avatar_generated_fps", "Frames generated per second (2 s window).", "generated_fps"),
            ("live_avatar_sent_fps", "Frames sent per second (2 s window).", "sent_fps"),
            ("live_avatar_mouth_to_photon_seconds",
             "Estimated delay from mic audio reaching the server to the frame showing it leaving the server "
             "(generation latency plus output delay); the network and the player's jitter buffer add to it.",
             "mouth_to_photon_s"),
        ]
        for name, doc, attr in per_session:
            fam = GaugeMetricFamily(name, doc, labels=["session"])
            for s in live.sessions:
                fam.add_metric([s.session_id], getattr(s, attr))
            yield fam
        for name, doc, attr in [
            ("live_avatar_session_frames_sent", "Video frames the session's output published.", "frames_sent"),
            ("live_avatar_session_frames_encoded",
             "Video frames the session's shared encoder encoded (once per frame, whatever the number of consumers).",
             "frames_encoded"),
            ("live_avatar_rtmp_reconnects", "Times the session's RTMP push reconnected.", "rtmp_reconnects"),
        ]:
            counter = CounterMetricFamily(name, doc, labels=["session"])
            for s in live.sessions:
                counter.add_metric([s.session_id], getattr(s, attr))
            yield counter
        consumers = GaugeMetricFamily("live_avatar_video_consumers",
                                      "Consumers of the session's encoded video (WebRTC senders, RTMP).",
                                      labels=["session"])
        rtmp = GaugeMetricFamily("live_avatar_rtmp_connected", "1 while the session's RTMP push is connected.",
                                 labels=["session"])
        for s in live.sessions:
            consumers.add_metric([s.session_id], s.video_consumers)
            if s.rtmp_connected is not None:
                rtmp.add_metric([s.session_id], s.rtmp_connected)
        yield consumers
        yield rtmp
        engines = GaugeMetricFamily("live_avatar_engines", "Stream engines held by each worker.", labels=["device"])
        for device, n in live.engines_by_device.items():
            engines.add_metric([device], n)
        yield engines
        yield GaugeMetricFamily("live_avatar_event_loop_lag_p99_seconds",
                                "99th percentile of the event loop's lag over about the last minute.",
                                value=live.loop_lag_p99_s)


class ServerMetrics:
    """The server's metrics, in a registry of their own so several servers can live in one process."""

    def __init__(self) -> None:
        """Create the counters and histograms; call :meth:`bind_live` to add the scrape-time gauges."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_started = Counter("live_avatar_sessions_started", "Sessions started.", registry=r)
        self.sessions_rejected = Counter("live_avatar_sessions_rejected",
                                         "Sessions refused because max_sessions were running.", registry=r)
        self.sessions_reaped = Counter("live_avatar_sessions_reaped",
                                       "Sessions closed because their peer vanished.", registry=r)
        self.frames_generated = Counter("live_avatar_frames_generated", "Frames generated by the engines.",
                                        registry=r)
        self.frames_sent = Counter("live_avatar_frames_sent", "Video frames published to the output tracks.",
                                   registry=r)
        self.frames_repeated = Counter("live_avatar_frames_repeated",
                                       "Video ticks that repeated the last frame because generation was late.",
                                       registry=r)
        self.frames_encoded = Counter("live_avatar_frames_encoded",
                                      "Video frames encoded by the sessions' shared H.264 encoders.", registry=r)
        self.frames_encode_dropped = Counter("live_avatar_frames_encode_dropped",
                                             "Video frames dropped because a shared encoder fell behind.",
                                             registry=r)
        self.encode_seconds = Histogram("live_avatar_encode_seconds", "Wall time of one shared H.264 encode "
                                        "(RGB to YUV conversion included).", buckets=ENCODE_BUCKETS, registry=r)
        self.audio_filled_seconds = Counter("live_avatar_audio_filled_seconds",
                                            "Silence inserted into the input because no mic audio arrived.",
                                            registry=r)
        self.audio_dropped_seconds = Counter("live_avatar_audio_dropped_seconds",
                                             "Input audio not given to the engine to keep latency bounded.",
                                             registry=r)
        self.block_seconds = Histogram("live_avatar_block_seconds", "Wall time of one generated block.",
                                       buckets=BLOCK_BUCKETS, registry=r)
        self.loop_lag_seconds = Histogram("live_avatar_event_loop_lag_seconds",
                                          "How much later than asked the event loop woke a 10 ms sleeper.",
                                          buckets=LAG_BUCKETS, registry=r)

    def bind_live(self, read: Callable[[], LiveGauges]) -> None:
        """Register the scrape-time gauges, read through ``read``."""
        self.registry.register(_LiveCollector(read))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
