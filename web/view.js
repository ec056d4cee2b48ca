// Viewer page for OBS browser sources and screen sharing into calls: watches /view/{session} over WHEP, fills the
// frame, and reconnects on its own (backing off while the session is not there).
//   ?token=…                                       the session's view token (the talk page's viewer link has it)
//   ?bg=transparent | ?bg=%23112233 | ?bg=112233   background (transparent for OBS keying; default black)
//   ?fit=cover                                     fill the frame by cropping (default: contain, letterboxed)
//   ?quiet=1                                       never show status notes (e.g. "waiting for the session…")
"use strict";

const video = document.getElementById("avatar");
const note = document.getElementById("note");
const sessionId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const params = new URLSearchParams(location.search);
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 10000;
const DISCONNECTED_GRACE_MS = 4000;

const bg = params.get("bg");
if (bg) document.body.style.setProperty("--view-bg", /^[0-9a-f]{3,8}$/i.test(bg) ? `#${bg}` : bg);
if (params.get("fit") === "cover") document.body.classList.add("cover");
const quiet = params.get("quiet") === "1";
const token = params.get("token");

let pc = null;
let resource = null;
let retryMs = RETRY_MIN_MS;
let graceTimer = null;

function say(text) {
  note.textContent = text;
  note.hidden = quiet || !text;
}

// A refusal that retrying cannot fix (a missing, wrong or expired token): shown even when quiet.
class Refused extends Error {}

function refuse(text) {
  note.textContent = text;
  note.hidden = false;
}

async function connect() {
  // STUN/TURN from the server's settings (server.ice_servers); none needed on loopback/LAN.
  const config = await fetch("/api/config");
  if (!config.ok) throw new Error(`cannot read the server's configuration (HTTP ${config.status})`);
  pc = new RTCPeerConnection({ iceServers: (await config.json()).ice_servers });
  const own = pc;
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
    if (pc !== own) return;
    const state = pc.connectionState;
    clearTimeout(graceTimer);
    if (state === "connected") retryMs = RETRY_MIN_MS;
    else if (state === "failed" || state === "closed") retry("connection lost; reconnecting…");
    else if (state === "disconnected") {
      graceTimer = setTimeout(() => pc === own && retry("connection lost; reconnecting…"), DISCONNECTED_GRACE_MS);
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 2000);
  });
  const resp = await fetch(`/whep/${encodeURIComponent(sessionId)}`, {
    method: "POST", body: pc.localDescription.sdp,
    headers: { "Content-Type": "application/sdp", "Authorization": `Bearer ${token}` },
  });
  if (resp.status !== 201) {
    const body = await resp.json().catch(() => ({}));
    const message = body.message || resp.statusText;
    if (resp.status === 401 || resp.status === 403) throw new Refused(`This viewer link does not work: ${message}`);
    throw new Error(resp.status === 404 ? "waiting for the session to start…" : message);
  }
  resource = resp.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
  say("");
}

function retry(reason) {
  clearTimeout(graceTimer);
  if (pc) pc.close();
  pc = null;
  if (resource) fetch(resource, { method: "DELETE" }).catch(() => {});
  resource = null;
  say(reason);
  setTimeout(start, retryMs);
  retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
}

function start() {
  connect().catch((err) => {
    if (!(err instanceof Refused)) { retry(err.message || String(err)); return; }
    if (pc) pc.close();
    pc = null;
    refuse(err.message);
  });
}

window.addEventListener("pagehide", () => {
  if (resource) fetch(resource, { method: "DELETE", keepalive: true });
});

if (!sessionId) refuse("no session id in the URL: open /view/<session id>?token=<view token>");
else if (!token) refuse("this viewer link has no ?token=…: copy the whole link from the talk page");
else start();
