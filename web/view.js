// Viewer page: watches /view/{session} over WHEP and reconnects on its own.
"use strict";

const video = document.getElementById("avatar");
const note = document.getElementById("note");
const sessionId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const RETRY_MS = 2000;

const bg = new URLSearchParams(location.search).get("bg");
if (bg) document.body.style.setProperty("--view-bg", bg);

let pc = null;
let resource = null;

function say(text) {
  note.textContent = text;
  note.hidden = !text;
}

async function connect() {
  pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.ontrack = (ev) => {
    stream.addTrack(ev.track);
    video.srcObject = stream;
    video.play().catch(() => {
      // Browsers refuse sound without a click; OBS does not. Play muted until someone clicks.
      video.muted = true;
      video.play();
      say("click for sound");
      document.addEventListener("click", () => { video.muted = false; say(""); }, { once: true });
    });
  };
  pc.onconnectionstatechange = () => {
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) retry("connection lost");
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 2000);
  });
  const resp = await fetch(`/whep/${encodeURIComponent(sessionId)}`, {
    method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" },
  });
  if (resp.status !== 201) {
    const body = await resp.json().catch(() => ({}));
    throw new Error(resp.status === 404 ? "waiting for the session to start…" : (body.message || resp.statusText));
  }
  resource = resp.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
  say("");
}

function retry(reason) {
  if (pc) pc.close();
  pc = null;
  resource = null;
  say(reason);
  setTimeout(start, RETRY_MS);
}

function start() {
  connect().catch((err) => retry(err.message || String(err)));
}

window.addEventListener("pagehide", () => {
  if (resource) fetch(resource, { method: "DELETE", keepalive: true });
});

if (!sessionId) say("no session id in the URL: open /view/<session id>");
else start();
