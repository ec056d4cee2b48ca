"""A third-party WebRTC peer for the tests: GStreamer's webrtcbin publishes over WHIP and plays over WHEP.

Run with Debian's Python (``/usr/bin/python3``, where ``python3-gst-1.0`` lives), not the project's venv::

    /usr/bin/python3 tests/gst_peer.py http://127.0.0.1:8080 --seconds 6

``--check`` only says (exit status 0, or 1 and what is missing) whether every GStreamer element it uses is there.

It publishes a 440 Hz tone (Opus) to ``/whip``, plays the new session from ``/whep/{session}`` (H.264 + Opus
decoded by GStreamer) for ``--seconds``, ends both with ``DELETE`` and prints one JSON object: for each side the
HTTP status, the ICE/peer connection states reached and, for the player, the decoded video frames, their size and
the decoded audio's seconds and RMS level. Exit status 0 whenever the JSON could be written.
"""

from __future__ import annotations

import argparse
import array
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstSdp", "1.0")
    gi.require_version("GstWebRTC", "1.0")
    from gi.repository import Gst, GstSdp, GstWebRTC
except (ImportError, ValueError) as exc:
    print(f"GStreamer's Python bindings are missing ({exc}): Debian packages python3-gst-1.0 and "
          "gir1.2-gst-plugins-bad-1.0", file=sys.stderr)
    sys.exit(1)

ELEMENTS = {"webrtcbin": "gstreamer1.0-plugins-bad", "dtlssrtpenc": "gstreamer1.0-plugins-bad",
            "nicesrc": "gstreamer1.0-nice", "rtph264depay": "gstreamer1.0-plugins-good",
            "rtpopuspay": "gstreamer1.0-plugins-good", "rtpopusdepay": "gstreamer1.0-plugins-good",
            "opusenc": "gstreamer1.0-plugins-base", "opusdec": "gstreamer1.0-plugins-base",
            "audiotestsrc": "gstreamer1.0-plugins-base", "appsink": "gstreamer1.0-plugins-base",
            "videoconvert": "gstreamer1.0-plugins-base", "avdec_h264": "gstreamer1.0-libav"}
GATHER_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 15.0
H264_CAPS = ("application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
             "packetization-mode=(string)1,profile-level-id=(string)42e01f")
OPUS_CAPS = "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000"


class Peer:
    """One webrtcbin in its own pipeline, driven synchronously: offer, gather every candidate, apply the answer."""

    def __init__(self, description: str) -> None:
        element = Gst.parse_launch(description)
        if isinstance(element, Gst.Pipeline):
            self.pipe = element
        else:  # a lone element comes back as itself
            self.pipe = Gst.Pipeline.new()
            self.pipe.add(element)
        self.webrtc = self.pipe.get_by_name("pc")
        self.states: list[str] = []
        self._gathered = threading.Event()
        self._negotiate = threading.Event()
        self.webrtc.connect("on-negotiation-needed", lambda _element: self._negotiate.set())
        self.webrtc.connect("notify::ice-gathering-state", self._gathering)
        self.webrtc.connect("notify::connection-state", self._connection)

    def _gathering(self, element, _param) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            self._gathered.set()

    def _connection(self, element, _param) -> None:
        self.states.append(element.get_property("connection-state").value_nick)

    def offer(self) -> str:
        """Create and apply the offer; returns its SDP once every candidate is in it (WHIP/WHEP do not trickle)."""
        if not self._negotiate.wait(GATHER_TIMEOUT_S):
            raise RuntimeError("webrtcbin never asked for a negotiation")
        promise = Gst.Promise.new()
        self.webrtc.emit("create-offer", None, promise)
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None and reply.has_field("offer") else None
        if offer is None:
            raise RuntimeError(f"webrtcbin made no offer: {reply.to_string() if reply is not None else 'no reply'}")
        promise = Gst.Promise.new()
        self.webrtc.emit("set-local-description", offer, promise)
        promise.wait()
        if not self._gathered.wait(GATHER_TIMEOUT_S):
            raise RuntimeError("ICE gathering did not complete")
        return self.webrtc.get_property("local-description").sdp.as_text()

    def answer(self, sdp: str) -> None:
        """Apply the server's answer."""
        _, message = GstSdp.SDPMessage.new_from_text(sdp)
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        promise = Gst.Promise.new()
        self.webrtc.emit("set-remote-description", answer, promise)
        promise.wait()

    def wait_connected(self) -> bool:
        """Whether the peer connection reached ``connected`` within ``CONNECT_TIMEOUT_S``."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            if "connected" in self.states:
                return True
            if "failed" in self.states:
                return False
            time.sleep(0.05)
        return False

    def bus_errors(self) -> list[str]:
        """Error messages the pipeline posted."""
        errors = []
        bus = self.pipe.get_bus()
        while (msg := bus.pop_filtered(Gst.MessageType.ERROR)) is not None:
            errors.append(msg.parse_error()[0].message)
        return errors


def post_offer(url: str, sdp: str, token: str | None = None) -> tuple[int, str, dict]:
    """POST an SDP offer; returns the status, the body and the response headers."""
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=sdp.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def delete(url: str) -> int:
    """DELETE a WHIP/WHEP resource; returns the status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Player:
    """What the WHEP side decoded: video frames (and their size) and audio samples (and their energy)."""

    def __init__(self, peer: Peer) -> None:
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.audio_samples = 0
        self.audio_rate = 48000
        self.audio_square_sum = 0.0
        self._pipe = peer.pipe
        peer.webrtc.connect("pad-added", self._pad_added)

    def _pad_added(self, _element, pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        media = pad.get_current_caps().get_structure(0).get_string("media")
        chain = ("rtph264depay ! avdec_h264 ! videoconvert ! video/x-raw,format=I420" if media == "video"
                 else "rtpopusdepay ! opusdec ! audioconvert ! audioresample ! audio/x-raw,format=F32LE,channels=1")
        branch = Gst.parse_bin_from_description(f"queue ! {chain} ! appsink name=sink emit-signals=true sync=false",
                                                True)
        self._pipe.add(branch)
        branch.get_by_name("sink").connect("new-sample", self._video if media == "video" else self._audio)
        branch.sync_state_with_parent()
        pad.link(branch.get_static_pad("sink"))

    def _video(self, sink) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        s = sample.get_caps().get_structure(0)
        self.size = (s.get_value("width"), s.get_value("height"))
        self.frames += 1
        return Gst.FlowReturn.OK

    def _audio(self, sink) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        self.audio_rate = sample.get_caps().get_structure(0).get_value("rate")
        buffer = sample.get_buffer()
        ok, info = buffer.map(Gst.MapFlags.READ)
        if ok:
            values = array.array("f", bytes(info.data))
            buffer.unmap(info)
            self.audio_samples += len(values)
            self.audio_square_sum += sum(v * v for v in values)
        return Gst.FlowReturn.OK


def run(server: str, seconds: float) -> dict:
    """Publish over WHIP, play the session over WHEP for ``seconds``, hang up both; returns the report."""
    report: dict = {"gstreamer": Gst.version_string()}
    publisher = Peer("webrtcbin name=pc bundle-policy=max-bundle "
                     "audiotestsrc is-live=true wave=sine freq=440 volume=0.3 ! audioconvert ! audioresample ! "
                     f"opusenc ! rtpopuspay pt=111 ! {OPUS_CAPS} ! pc.")
    publisher.pipe.set_state(Gst.State.PLAYING)
    status, body, headers = post_offer(urljoin(server, "/whip"), publisher.offer())
    whip = report["whip"] = {"status": status}
    if status != 201:
        whip["error"] = body
        publisher.pipe.set_state(Gst.State.NULL)
        return report
    publisher.answer(body)
    whip["connected"] = publisher.wait_connected()
    whip_location = urljoin(server, headers["Location"])
    session_id = headers["Location"].split("?")[0].rstrip("/").rsplit("/", 1)[-1]

    viewer = Peer("webrtcbin name=pc bundle-policy=max-bundle")
    player = Player(viewer)
    for caps in (H264_CAPS, OPUS_CAPS):
        viewer.webrtc.emit("add-transceiver", GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
                           Gst.Caps.from_string(caps))
    viewer.pipe.set_state(Gst.State.PLAYING)
    status, body, headers = post_offer(urljoin(server, f"/whep/{session_id}"), viewer.offer(),
                                       token=headers.get("X-View-Token"))
    whep = report["whep"] = {"status": status}
    if status == 201:
        viewer.answer(body)
        whep["connected"] = viewer.wait_connected()
        time.sleep(seconds)
        rms = (player.audio_square_sum / player.audio_samples) ** 0.5 if player.audio_samples else 0.0
        whep.update(frames=player.frames, size=player.size, audio_s=round(player.audio_samples / player.audio_rate, 2),
                    audio_rms=round(rms, 4), states=viewer.states, errors=viewer.bus_errors())
        whep["delete"] = delete(urljoin(server, headers["Location"]))
    else:
        whep["error"] = body
    whip.update(states=publisher.states, errors=publisher.bus_errors(), delete=delete(whip_location))
    for peer in (viewer, publisher):
        peer.pipe.set_state(Gst.State.NULL)
    return report


def main() -> int:
    """Parse the arguments, run, print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", nargs="?", default="", help="server URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long to play over WHEP")
    parser.add_argument("--check", action="store_true", help="only check that every element is installed")
    args = parser.parse_args()
    Gst.init(None)
    if args.check:
        missing = sorted({f"{name} ({package})" for name, package in ELEMENTS.items()
                          if Gst.ElementFactory.find(name) is None})
        if missing:
            print("missing GStreamer elements: " + ", ".join(missing), file=sys.stderr)
        return 1 if missing else 0
    try:
        report = run(args.server.rstrip("/") + "/", args.seconds)
    except Exception as exc:  # noqa: BLE001 - the test reads the reason from the JSON
        report = {"error": f"{exc.__class__.__name__}: {exc}"}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
