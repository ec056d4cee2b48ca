// Voice → avatar delay, measured in the page: the lag between the microphone's level and the level of the
// avatar's voice as this browser plays it (after the network and the jitter buffer). The server sends the
// talker's own voice back, delayed exactly like the video and lip-synced with it, so this lag is the
// mouth-to-photon delay the talker sees. Nothing is estimated: both levels are sampled here, on one clock.
"use strict";

class VoiceDelayMeter {
  // mic: the MediaStream sent to the server. Levels are sampled every `stepMs`; the lag is searched up to
  // `maxLagMs` over the last `windowMs`.
  constructor(mic, { stepMs = 10, windowMs = 8000, maxLagMs = 3000 } = {}) {
    this.stepMs = stepMs;
    this.size = Math.round((windowMs + maxLagMs) / stepMs);
    this.maxLag = Math.round(maxLagMs / stepMs);
    this.ctx = new AudioContext();
    this.mic = this._analyser(mic);
    this.remote = null;
    this.levels = { mic: [], remote: [] };
    this.delayS = null; // the latest measured delay (seconds), null until speech has come back once
    this.timer = setInterval(() => this._sample(), stepMs);
  }

  // The remote stream with the avatar's voice (call once its audio track has arrived).
  attachRemote(stream) {
    if (this.remote || !stream.getAudioTracks().length) return;
    this.remote = this._analyser(stream);
  }

  stop() {
    clearInterval(this.timer);
    this.ctx.close().catch(() => {});
  }

  _analyser(stream) {
    const node = this.ctx.createAnalyser();
    node.fftSize = 512;
    this.ctx.createMediaStreamSource(stream).connect(node);
    return { node, buf: new Float32Array(node.fftSize) };
  }

  _level(a) {
    if (!a) return -100;
    a.node.getFloatTimeDomainData(a.buf);
    let sum = 0;
    for (const v of a.buf) sum += v * v;
    return 10 * Math.log10(sum / a.buf.length + 1e-10);
  }

  _sample() {
    if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
    for (const [name, a] of [["mic", this.mic], ["remote", this.remote]]) {
      const lv = this.levels[name];
      lv.push(Math.max(this._level(a), -70));
      if (lv.length > this.size) lv.shift();
    }
    this._tick = (this._tick || 0) + 1;
    if (this._tick % Math.round(1000 / this.stepMs) === 0) this._estimate();
  }

  // The lag (in steps) at which the remote level best matches the mic level, if the match is clear.
  _estimate() {
    const mic = this.levels.mic, rem = this.levels.remote;
    const n = Math.min(mic.length, rem.length) - this.maxLag;
    if (!this.remote || n < 100) return;
    const x = mic.slice(0, n);
    const active = x.filter((v) => v > -50).length;
    if (active < 20 || active > n - 20) return; // needs speech and pauses in the window
    let best = -1, bestLag = null;
    for (let lag = 0; lag <= this.maxLag; lag++) {
      const r = pearson(x, rem.slice(lag, lag + n));
      if (r > best) { best = r; bestLag = lag; }
    }
    if (best >= 0.6) this.delayS = bestLag * this.stepMs / 1000;
  }
}

function pearson(a, b) {
  const n = a.length;
  let sa = 0, sb = 0;
  for (let i = 0; i < n; i++) { sa += a[i]; sb += b[i]; }
  const ma = sa / n, mb = sb / n;
  let cov = 0, va = 0, vb = 0;
  for (let i = 0; i < n; i++) {
    const da = a[i] - ma, db = b[i] - mb;
    cov += da * db; va += da * da; vb += db * db;
  }
  return va > 0 && vb > 0 ? cov / Math.sqrt(va * vb) : -1;
}
