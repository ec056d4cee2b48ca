// Talk page: mic → server over WebRTC (signaling on /ws), avatar video + voice back, live stats.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  video: $("avatar"), placeholder: $("placeholder"), start: $("start"), stop: $("stop"), error: $("error"),
  images: $("images"), upload: $("upload"), prompt: $("prompt"), applyPrompt: $("apply-prompt"),
  viewLink: $("view-link"), state: $("st-state"), fps: $("st-fps"), latency: $("st-latency"),
  repeated: $("st-repeated"), session: $("st-session"), rtmpUrl: $("rtmp-url"), rtmpToggle: $("rtmp-toggle"),
  rtmp: $("st-rtmp"), access: $("access"), apiKey: $("api-key"), size: $("st-size"),
};

// "704×384", and what `realtime: auto` chose when the server picked the size for this GPU.
function describeSize(msg) {
  const size = `${msg.width}×${msg.height} at ${msg.fps} fps`;
  const rt = msg.realtime;
  if (!rt) return size;
  return `${size} (realtime auto: ${rt.size_area}, ${rt.fps_capacity} fps capacity` +
    (rt.sustains ? ")" : "; the GPU is slower than real time, frames repeat)");
}

let chosenImage = null; // a sample name or an upload id; null = the server's default character
let call = null; // {pc, ws, mic, meter, statsTimer, serverLatency, lastFrames, lastTime}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setState(text, cls) {
  ui.state.textContent = text;
  ui.state.className = cls || "";
}

// ----- reference images ------------------------------------------------------------------------------
function addImageChoice(name, label, url) {
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.image = name;
  button.title = label;
  button.setAttribute("aria-pressed", String(name === chosenImage));
  const img = document.createElement("img");
  img.src = url;
  img.alt = label;
  button.appendChild(img);
  button.addEventListener("click", () => chooseImage(name));
  ui.images.appendChild(button);
}

function chooseImage(name) {
  chosenImage = name;
  for (const b of ui.images.querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(b.dataset.image === name));
  }
}

async function loadSamples() {
  try {
    const samples = await (await fetch("/api/samples")).json();
    for (const s of samples) addImageChoice(s.name, s.name, s.url);
    if (samples.length) chooseImage(samples[0].name);
  } catch (err) {
    showError(`Could not list sample images: ${err}`);
  }
}

ui.upload.addEventListener("change", async () => {
  const file = ui.upload.files[0];
  ui.upload.value = "";
  if (!file) return;
  showError("");
  const resp = await fetch("/api/images", {
    method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
  });
  const body = await resp.json();
  if (!resp.ok) {
    showError(body.message || `Upload failed (${resp.status})`);
    return;
  }
  addImageChoice(body.image_id, file.name, URL.createObjectURL(file));
  chooseImage(body.image_id);
  if (body.warning) showError(`Uploaded, but ${body.warning}`);
});

// ----- session ---------------------------------------------------------------------------------------
function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

async function start() {
  showError("");
  ui.start.disabled = true;
  let config; // ice_servers: STUN/TURN from the server's settings (none needed on loopback/LAN); publish_needs_key
  try {
    const resp = await fetch("/api/config");
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    config = await resp.json();
  } catch (err) {
    showError(`Cannot read the server's configuration (/api/config): ${err.message || err}`);
    ui.start.disabled = false;
    return;
  }
  ui.access.hidden = !config.publish_needs_key;
  const key = config.publish_needs_key ? ui.apiKey.value.trim() : null;
  if (config.publish_needs_key && !key) {
    showError("This server starts sessions only with its API key: enter it under Access.");
    ui.start.disabled = false;
    return;
  }
  setState("getting microphone…");
  let mic;
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    showError(`Microphone unavailable: ${err.message || err}. The page needs http://localhost or https://.`);
    setState("idle");
    ui.start.disabled = false;
    return;
  }
  const pc = new RTCPeerConnection({ iceServers: config.ice_servers });
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  call = { pc, ws, mic, meter: new VoiceDelayMeter(mic), statsTimer: null, serverLatency: null, lastFrames: null,
           lastTime: null };

  pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const remote = new MediaStream();
  pc.ontrack = (ev) => {
    remote.addTrack(ev.track);
    if (ev.track.kind === "audio") call.meter.attachRemote(remote);
    ui.video.srcObject = remote;
    ui.placeholder.hidden = true;
    ui.video.play().catch(() => {});
  };
  pc.onconnectionstatechange = () => {
    const s = pc.connectionState;
    setState(s, s === "connected" ? "ok" : (s === "failed" ? "bad" : ""));
    if (s === "failed") showError("The media connection failed (a firewall may block UDP).");
  };
  pc.onicecandidate = (ev) => {
    // Candidates found after the offer went out (gathering was slow) are trickled.
    if (ev.candidate && call && call.answered && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "candidate", candidate: ev.candidate.candidate,
                               sdpMid: ev.candidate.sdpMid, sdpMLineIndex: ev.candidate.sdpMLineIndex }));
    }
  };

  ws.onmessage = (ev) => onServerMessage(JSON.parse(ev.data));
  ws.onclose = () => { if (call && call.ws === ws) stop("signaling connection closed"); };
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; }).catch(() => {
    showError("Cannot reach the server's signaling socket.");
  });
  if (ws.readyState !== WebSocket.OPEN) { stop(); return; }

  setState("connecting…");
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, 2000);
  ws.send(JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, image: chosenImage, key,
                           prompt: ui.prompt.value, rtmp: rtmpWanted ? ui.rtmpUrl.value.trim() : null }));
  ui.stop.disabled = false;
}

async function onServerMessage(msg) {
  if (!call) return;
  switch (msg.type) {
    case "answer":
      await call.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      call.answered = true;
      call.serverLatency = msg.latency_s;
      ui.session.textContent = msg.session_id;
      ui.size.textContent = describeSize(msg);
      ui.viewLink.href = msg.view_url; // carries the session's view token: whoever has the link can watch
      ui.viewLink.title = `Share to let others watch (OBS browser source, calls); valid until ${msg.expires_at}`;
      ui.viewLink.hidden = false;
      ui.applyPrompt.disabled = false;
      call.statsTimer = setInterval(updateStats, 1000);
      break;
    case "stats":
      if (msg.latency_s !== null) call.serverLatency = msg.latency_s;
      ui.repeated.textContent = `${msg.frames_repeated} of ${msg.frames_sent}`;
      showRtmp(msg.rtmp);
      break;
    case "rtmp":
      showRtmp(msg.rtmp);
      break;
    case "prompt":
      ui.applyPrompt.textContent = "Applied ✓";
      setTimeout(() => { ui.applyPrompt.textContent = "Apply to running session"; }, 1500);
      break;
    case "ended":
      stop(msg.reason === "bye" ? "" : `Session ended: ${msg.reason}`);
      break;
    case "error":
      showError(msg.message);
      if (!call.answered) stop(msg.message);
      break;
  }
}

async function updateStats() {
  if (!call) return;
  const report = await call.pc.getStats();
  let frames = null, jitter = null, rtt = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded;
    if (s.type === "inbound-rtp" && s.kind === "audio" && s.jitterBufferEmittedCount) {
      jitter = s.jitterBufferDelay / s.jitterBufferEmittedCount;
    }
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
      rtt = s.currentRoundTripTime;
    }
  });
  const now = performance.now();
  if (frames !== null && call.lastFrames !== null) {
    ui.fps.textContent = ((frames - call.lastFrames) * 1000 / (now - call.lastTime)).toFixed(1);
  }
  call.lastFrames = frames;
  call.lastTime = now;
  // Measured voice → mouth (this page's mic to the avatar's lip-synced voice as played here) when speech has
  // come back; until then the server's part alone.
  const measured = call.meter.delayS;
  const network = (jitter || 0) + (rtt || 0) / 2;
  if (measured !== null) {
    ui.latency.textContent = `${measured.toFixed(2)} s voice → mouth, measured` +
      (call.serverLatency === null ? "" : ` (server ${call.serverLatency.toFixed(2)} s, ` +
        `jitter buffer + network ${(network * 1000).toFixed(0)} ms)`);
  } else if (call.serverLatency !== null) {
    ui.latency.textContent = `measuring… (server ${call.serverLatency.toFixed(2)} s + network ` +
      `${(network * 1000).toFixed(0)} ms)`;
  }
}

// ----- RTMP push -----------------------------------------------------------------------------------------
let rtmpWanted = false; // whether the user asked for a push (sent with the offer, or as an rtmp message)

function showRtmp(status) {
  rtmpWanted = !!status;
  ui.rtmpToggle.textContent = status ? "Stop push" : "Start push";
  if (!status) { ui.rtmp.textContent = "off"; ui.rtmp.className = ""; return; }
  const extra = status.state === "live" ? ` ${status.live_s} s` :
    (status.error ? ` (${status.error}; ${status.reconnects} reconnects)` : "");
  ui.rtmp.textContent = `${status.state}${extra} → ${status.url}`;
  ui.rtmp.className = status.state === "live" ? "ok" : (status.state === "reconnecting" ? "bad" : "");
}

function toggleRtmp() {
  const url = ui.rtmpUrl.value.trim();
  if (!rtmpWanted && !url.startsWith("rtmp")) { showError("enter an rtmp:// URL first"); return; }
  showError("");
  if (call && call.answered && call.ws.readyState === WebSocket.OPEN) {
    call.ws.send(JSON.stringify({ type: "rtmp", url: rtmpWanted ? null : url }));
  } else {
    rtmpWanted = !rtmpWanted;  // applied with the next Start
    ui.rtmpToggle.textContent = rtmpWanted ? "Stop push" : "Start push";
    ui.rtmp.textContent = rtmpWanted ? "starts with the session" : "off";
  }
}

function stop(message) {
  if (message) showError(message);
  const c = call;
  call = null;
  if (c) {
    clearInterval(c.statsTimer);
    if (c.ws.readyState === WebSocket.OPEN) c.ws.send(JSON.stringify({ type: "bye" }));
    c.ws.onclose = null;
    c.ws.close();
    c.pc.close();
    c.mic.getTracks().forEach((t) => t.stop());
    c.meter.stop();
  }
  ui.video.srcObject = null;
  ui.placeholder.hidden = false;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.applyPrompt.disabled = true;
  ui.viewLink.hidden = true;
  ui.fps.textContent = "–";
  ui.latency.textContent = "–";
  ui.rtmp.className = "";
  ui.rtmp.textContent = rtmpWanted ? "starts with the session" : "off";
  setState("idle");
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => stop());
ui.rtmpToggle.addEventListener("click", toggleRtmp);
ui.applyPrompt.addEventListener("click", () => {
  if (call && call.ws.readyState === WebSocket.OPEN) {
    call.ws.send(JSON.stringify({ type: "prompt", prompt: ui.prompt.value }));
  }
});
loadSamples();
