"""The streaming engine: one class that turns a reference image, a prompt and a live audio stream into frames.

A :class:`ProfileStack` (a :class:`~model.stack.ModelStack` with its profile) holds the models, loaded once per
device and shared by every session on it. :class:`StreamEngine` holds one stream's state — KV caches, sink, VAE
decode cache, audio window, noise generator and frame ring — and produces one block (``frames_per_block`` latent
frames → 12 video frames) per :meth:`StreamEngine.generate_block` call. The server's worker thread and the
offline renderer both drive this class; there is no second pipeline.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from live.engine.cache_pool import CachePool
from live.engine.decode_lane import DecodeLane
from live.images import default_character, generation_size, image_to_tensor
from live.settings import Settings
from live.stream.audio_window import AudioWindow
from live.stream.frame_ring import FrameRing
from model.audio_features import SAMPLE_RATE, WAV2VEC_HOP, FrameAudioFeatures
from model.dit import AudioTokens
from model.stack import ModelStack
from model.vae import StreamingVAEDecoder, encode_video, to_uint8_frames

VAE_TEMPORAL_STRIDE = 4
DECODE_POOL_BYTES = 7 * 2**30  # what the 14B decode's side-stream pool added at 704×384 (bench/RESULTS.md)
VAE_SPATIAL_STRIDE = 8


def overlap_enabled(setting: bool | str, device: torch.device) -> bool:
    """Whether a new stream decodes on the decode lane: ``stream.overlap_decode``, where 'auto' means always on a
    CPU and on a GPU when the memory free for PyTorch (the driver's free memory plus the allocator's unused
    cache) holds the decode's own pool twice over (the decode's activations live in its stream's pool)."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached >= 2 * DECODE_POOL_BYTES


@dataclass(eq=False)
class ProfileStack(ModelStack):
    """A :class:`~model.stack.ModelStack` with the runtime profile it was loaded from, which its streams run as."""

    settings: Settings

    @classmethod
    def from_settings(cls, settings: Settings) -> "ProfileStack":
        """Load the models of ``settings`` on ``settings.device``."""
        models = ModelStack.load(settings.model, settings.stack_options())
        return cls(**{f.name: getattr(models, f.name) for f in fields(ModelStack)}, settings=settings)


class StreamEngine:
    """One avatar stream: start(image, prompt) → push_audio(...) → generate_block() → frames in ``ring``."""

    def __init__(self, stack: ProfileStack, seed: int | None = None) -> None:
        """A stream on ``stack``, run as its profile says; ``seed`` (default: the profile's) seeds its noise."""
        self.stack = stack
        s = stack.settings
        self.seed = s.seed if seed is None else seed
        self.fps = s.video.fps
        self.frames_per_block = stack.dit.config.frames_per_block * VAE_TEMPORAL_STRIDE
        self.samples_per_block = SAMPLE_RATE * self.frames_per_block // self.fps
        self.drop_first = s.stream.drop_first_frames
        for name, secs in (("audio_left_context_s", s.stream.audio_left_context_s),
                           ("audio_lookahead_s", s.stream.audio_lookahead_s)):
            if round(secs * SAMPLE_RATE) % WAV2VEC_HOP:
                raise ValueError(f"stream.{name}={secs} must be a multiple of 0.02 s (the wav2vec2 hop)")
        self.left_samples = round(s.stream.audio_left_context_s * SAMPLE_RATE)
        self.lookahead_samples = round(s.stream.audio_lookahead_s * SAMPLE_RATE)
        self.latency_s = (self.samples_per_block + self.lookahead_samples) / SAMPLE_RATE
        self._features = FrameAudioFeatures(stack.wav2vec2, SAMPLE_RATE, self.fps)
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self.window: AudioWindow | None = None
        self.ring: FrameRing | None = None
        self.width = self.height = 0
        self.blocks_started = 0  # blocks taken from the audio window (their frames may still be decoding)
        self.blocks_done = 0  # blocks whose frames are in the ring
        self.frames_emitted = 0
        self._closed = False
        self._overlap = overlap_enabled(s.stream.overlap_decode, stack.device)
        self._decoding: tuple[Future, int] | None = None  # the block decoding in the background, its frame count
        self.background_decode_s = 0.0  # wall time of the latest decode that ran after generate_block returned

    # ----- session start ------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, image: Image.Image | None = None, prompt: str = "") -> None:
        """Encode the reference, prefill the sink, prime the VAE cache and allocate the ring."""
        st, s = self.stack, self.stack.settings
        ref_latent, motion_latents = self._encode_reference(image)
        self.prefill(ref_latent, motion_latents, self._encode_prompt(prompt))
        self.decoder = StreamingVAEDecoder(st.vae)
        self.decoder.reset()
        warm = s.stream.vae_warmup_latents
        if warm:
            self.decoder.decode(motion_latents[:, :, :warm])
        self._open_stream_io()

    @torch.no_grad()
    def prefill(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor,
                text_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The model half of :meth:`start`: allocate the KV rings and fill the sink from the reference latent
        ``[1,16,1,h,w]``, the motion latents and the prompt's per-layer text K/V."""
        st, s = self.stack, self.stack.settings
        dit_cfg = st.dit.config
        self._text_kv = text_kv
        self._cache_key = (s.stream.steps, *ref_latent.shape[-2:])
        self.caches = (CachePool.shared(st).take(self._cache_key)
                       or st.dit.new_caches(s.stream.steps, *ref_latent.shape[-2:], device=st.device, dtype=st.dtype))
        st.dit.prefill_sink(self.caches, ref_latent, motion_latents, text_kv)
        self._motion_latents = motion_latents
        self._refresh_at = dit_cfg.kv_cache_frames // dit_cfg.frames_per_block if s.stream.refresh_sink else None

    def _encode_reference(self, image: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fix the generation size from the image and VAE-encode it: (reference latent [1,16,1,h,w], motion
        latents [1,16,19,h,w] — the image repeated ``motion_frames`` times, as upstream does)."""
        st, s = self.stack, self.stack.settings
        img = image if image is not None else default_character()
        self.height, self.width = generation_size((img.height, img.width), s.video.size_area, s.video.size_multiple)
        pixels = image_to_tensor(img, self.height, self.width).to(st.device, st.dtype)
        ref_latent = encode_video(st.vae, pixels)
        motion_latents = encode_video(st.vae, pixels.expand(-1, -1, st.dit.config.motion_frames, -1, -1))
        return ref_latent, motion_latents

    def _open_stream_io(self) -> None:
        """Allocate the frame ring, the audio window and the noise generator of a started stream."""
        st, s = self.stack, self.stack.settings
        dit_cfg = st.dit.config
        self.ring = FrameRing(s.stream.ring_capacity_frames, self.height, self.width, st.device)
        self.window = AudioWindow(sample_rate=SAMPLE_RATE, fps=self.fps, frames_per_block=self.frames_per_block,
                                  left_context_s=s.stream.audio_left_context_s,
                                  lookahead_s=s.stream.audio_lookahead_s, leading_silence_frames=self.drop_first)
        self._generator = torch.Generator(device=st.device).manual_seed(self.seed)
        self._latent_shape = (1, dit_cfg.in_dim, dit_cfg.frames_per_block,
                              self.height // VAE_SPATIAL_STRIDE, self.width // VAE_SPATIAL_STRIDE)

    def _encode_prompt(self, prompt: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        st = self.stack
        return st.dit.text_kv(st.text_encoder.encode(prompt).to(st.device, st.dtype))

    # ----- inputs (thread-safe) -----------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> None:
        """Append 16 kHz mono float32 PCM (any length)."""
        with self._lock:
            self._require_started().push(pcm)

    def finish_audio(self) -> None:
        """End of input: pad with silence so every pushed sample is generated."""
        with self._lock:
            self._require_started().finish()

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt; it takes effect at the next block."""
        with self._lock:
            self._pending_prompt = prompt

    def block_ready(self) -> bool:
        """Whether ``generate_block`` has work: enough audio (block + lookahead) buffered for the next block,
        or a block still decoding in the background."""
        with self._lock:
            return self.window is not None and not self._closed and (self.window.ready() or self._decoding is not None)

    def work_ready(self) -> bool:
        """Whether ``generate_block`` has work it can do without waiting: a block's audio (block + lookahead) is
        buffered, or the block decoding in the background has finished (its frames are to be counted). A worker
        serving live audio polls this, so it is free to start the next block while the last one decodes."""
        with self._lock:
            if self.window is None or self._closed:
                return False
            decoding = self._decoding
            return self.window.ready() or (decoding is not None and decoding[0].done())

    @property
    def frames_in_flight(self) -> int:
        """Frames of a block still decoding in the background, not yet in the ring (they need room there)."""
        decoding = self._decoding
        return decoding[1] if decoding is not None and not decoding[0].done() else 0

    def _require_started(self) -> AudioWindow:
        if self.window is None:
            raise RuntimeError("StreamEngine.start() must be called first")
        if self._closed:
            raise RuntimeError("stream is closed")
        return self.window

    # ----- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_block(self) -> int:
        """Generate the next block into the ring (waits while the ring is full); returns the frames put into
        the ring during the call, 0 if not enough audio is buffered and no decode was in flight.

        With ``stream.overlap_decode`` the block is decoded in the background (:class:`DecodeLane`): the call
        returns once it is denoised, its frames reach the ring as soon as the decode ends, and the next call counts
        them (waiting for the decode only if there is no new block to denoise meanwhile). So the next block is
        denoised while this one decodes — at once if its audio is buffered, or as soon as it arrives. Otherwise the
        block is decoded before the call returns.
        """
        st = self.stack
        with self._lock:
            block = self._require_started().next_block()
            prompt, self._pending_prompt = self._pending_prompt, None
        if block is None:
            return self.wait_decoded()
        self.blocks_started += 1
        if prompt is not None:
            self._text_kv = self._encode_prompt(prompt)
        first_frame = block.index * self.frames_per_block
        window_start = block.index * self.samples_per_block - block.block_offset
        feats = self._features(block.samples, window_start, first_frame, self.frames_per_block)
        audio = st.dit.encode_audio(feats.to(st.device, st.dtype))
        noise = torch.randn(self._latent_shape, generator=self._generator, device=st.device, dtype=torch.float32)
        x = self.denoise(block.index, audio, noise)
        produced = self.wait_decoded()
        latents = x.to(st.dtype)
        drop = self.drop_first if block.index == 0 else 0
        count = self.frames_per_block - drop
        if self._overlap:
            self._decoding = (DecodeLane.shared(st).submit(lambda: self._decode_in_background(latents, drop),
                                                           (latents,)), count)
        else:
            produced += self._decode(latents, drop)
            self.blocks_done += 1
            self.frames_emitted += count
        return produced

    @torch.no_grad()
    def denoise(self, index: int, audio: AudioTokens, noise: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s clean latents (float32) from its audio tokens and noise: the sink is refreshed when
        the ring first wraps (Live Avatar's rolling sink, from block 0's first latent), then every denoising
        step attends [sink | its KV ring] at the block's absolute positions."""
        st = self.stack
        block_start = index * st.dit.config.frames_per_block
        if index == self._refresh_at:
            st.dit.prefill_sink(self.caches, self._first_latent, self._motion_latents, self._text_kv)
        x = noise
        for i in range(st.schedule.steps):
            t = st.schedule.timestep(i, st.device)
            v = st.dit.forward_block(x.to(st.dtype), t, audio, self._text_kv, self.caches, i, block_start)
            x = st.schedule.euler_step(x, v, i)
        if index == 0:
            self._first_latent = x[:, :, :1].to(st.dtype)
        return x

    def _decode(self, latents: torch.Tensor, drop: int) -> int:
        """Decode one block's latents into the ring (dropping its first ``drop`` frames); returns frames put."""
        frames = to_uint8_frames(self.decoder.decode(latents))[drop:]
        self.ring.put(frames)
        return frames.shape[0]

    def _decode_in_background(self, latents: torch.Tensor, drop: int) -> int:
        t0 = time.perf_counter()
        produced = self._decode(latents, drop)
        self.background_decode_s = time.perf_counter() - t0
        return produced

    def wait_decoded(self) -> int:
        """Wait for the block decoding in the background, if any; returns its frames (re-raises its error)."""
        if self._decoding is None:
            return 0
        future, _ = self._decoding
        self._decoding = None
        produced = future.result()
        self.blocks_done += 1
        self.frames_emitted += produced
        return produced

    def close(self) -> None:
        """Release the caches (to the stack's pool) and wake anyone waiting on the ring; idempotent."""
        with self._lock:
            self._closed = True
        if self.ring is not None:
            self.ring.close()
        if self._decoding is not None:
            wait([self._decoding[0]])  # its error, if any (a closed ring), no longer matters
            self._decoding = None
        if hasattr(self, "caches"):
            CachePool.shared(self.stack).give(self._cache_key, self.caches)
        for name in ("caches", "decoder", "_text_kv"):
            if hasattr(self, name):
                delattr(self, name)
