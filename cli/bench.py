"""``live-avatar bench``: throughput, latency and memory of the streaming engine, one table per run.

Engine mode (default) builds one :class:`~live.engine.stream.ModelStack` and, for each variant (the profile's dtype;
``--fp8``: FP8 linear layers; ``--compile``: ``torch.compile`` on top of the last), starts a
:class:`~live.engine.stream.StreamEngine` on a 16:9 version of the built-in character, feeds it one block of
speech-like audio for the first block and then the rest at once (audio ahead of generation, as when a stream
catches up, so the measured rate is the engine's capacity, with a block's decode overlapping the next block's
denoising: ``stream.overlap_decode``), runs ``--warmup`` blocks and then ``--blocks`` measured blocks. With three
or more warm-up blocks every measured block attends a full KV ring (12 latent frames) plus the sink. Variants
run one after another in this one process, on one device, so their rows compare like with like;
``--compare-overlap`` adds the last variant again with the decode not overlapped.

Columns: sustained FPS (frames emitted / wall time over the measured blocks, ring draining included); per-block
latency p50/p95 (one ``generate_block`` call: in steady state with overlap, a block's denoising plus waiting for
the previous block's decode); time to first frame (``start()`` — reference encode, sink prefill, VAE priming — through the
first block's audio encode, 4 steps and decode, until its frames are in the ring; the audio buffering a live
stream adds first, ``StreamEngine.latency_s``, is not included); peak memory (``torch.cuda.max_memory_allocated``
on CUDA, reset per row, so weights count; peak RSS of the process on CPU, never reset); DiT time per block (4
steps) with the TFLOP/s it implies; VAE decode time per output frame (on its own thread and stream, so with
overlap it runs alongside the DiT time rather than adding to it). CUDA times use events.

``--server`` measures glass-to-glass latency through a real server instead (``cli.latency_bench``).
``--soak N`` runs N back-to-back talker sessions of ``--seconds`` through a real server and prints the server
process's RSS, threads and open fds after each (``cli.soak_bench``).
``--encode`` times the session's shared H.264 encoder (:class:`~live.sinks.encoder.SharedVideoEncoder`, RGB → YUV
conversion included) at 704×384 and 1280×720 on frames that move like a talking head, one row per x264 preset.
Set ``LIVE_AVATAR_BENCH_PROFILE=FILE`` to also profile one extra block per row with ``torch.profiler`` and append
the top kernels by device time to FILE.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli.profile import settings_from_args
from cli.speech import speechlike
from live.engine.stream import ProfileStack, StreamEngine, overlap_enabled
from live.images import default_character
from live.settings import Settings
from model.stack import resolve_dtype

SWEEP_AREAS = ("720*400", "688*368", "384*256")
ENCODE_SIZES = ((704, 384), (1280, 720))
ENCODE_PRESETS = ("veryfast", "ultrafast")


# ----- inputs ----------------------------------------------------------------------------------------------
def reference_image(aspect: float = 16 / 9, height: int = 720) -> Image.Image:
    """The built-in character centred on a ``aspect`` canvas (filled with its border colour), so the area rule
    picks upstream's landscape sizes (720*400 → 704×384)."""
    face = default_character()
    width = round(height * aspect)
    border = tuple(int(c) for c in np.asarray(face)[0].reshape(-1, 3).mean(axis=0))
    canvas = Image.new("RGB", (width, height), border)
    face = face.resize((height, height), Image.Resampling.BICUBIC)
    canvas.paste(face, ((width - height) // 2, 0))
    return canvas


# ----- timing ----------------------------------------------------------------------------------------------
class _Timed:
    """Wraps a callable and records the device time of each call (CUDA events, or wall time on CPU)."""

    def __init__(self, fn, cuda: bool) -> None:
        self.fn, self.cuda = fn, cuda
        self._pending: list = []

    def __call__(self, *args, **kwargs):
        if not self.cuda:
            t0 = time.perf_counter()
            out = self.fn(*args, **kwargs)
            self._pending.append((time.perf_counter() - t0) * 1e3)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn(*args, **kwargs)
        end.record()
        self._pending.append((start, end))
        return out

    def take_ms(self) -> float:
        """Total milliseconds of the calls finished since the last take (waits for their end events; calls made
        on another thread, e.g. the decode lane, count once they have returned)."""
        taken, self._pending = self._pending, []
        total = 0.0
        for p in taken:
            if isinstance(p, float):
                total += p
            else:
                p[1].synchronize()
                total += p[0].elapsed_time(p[1])
        return total


def _sync(device: torch.device) -> None:
    """Wait for this thread's CUDA stream — not the whole device, so a block still decoding on the decode lane's
    stream keeps overlapping the next block's denoising, as in the server."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def card_name(device: torch.device) -> str:
    """GPU name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def dit_tflop_per_block(stack: ProfileStack, tokens_per_frame: int, sink_tokens: int) -> float:
    """Matrix FLOPs of one block's DiT work (all steps) with a full KV ring: linear layers, self-attention over
    [sink | ring], text cross-attention, audio injectors (their 5-token attention and AdaLN are negligible)."""
    c = stack.dit.config
    d, n = c.dim, c.frames_per_block * tokens_per_frame
    keys = sink_tokens + c.kv_cache_frames * tokens_per_frame
    per_layer = 2 * n * (6 * d * d + 2 * d * c.ffn_dim) + 4 * n * keys * d + 4 * n * c.text_len * d
    injectors = len(c.audio_inject_layers) * 2 * n * 2 * d * d
    return stack.schedule.steps * (c.num_layers * per_layer + injectors) / 1e12


# ----- one run ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one variant at one size measured."""

    variant: str
    card: str
    width: int
    height: int
    fps: float
    p50_ms: float
    p95_ms: float
    ttff_s: float
    peak_gib: float
    peak_kind: str
    dit_ms: float
    dit_tflops: float
    decode_ms_per_frame: float
    blocks: int
    ring_full: bool
    notes: list[str] = field(default_factory=list)


def run_engine(stack: ProfileStack, variant: str, image: Image.Image, warmup: int, blocks: int,
               profile_to: Path | None = None) -> RunResult:
    """Start a stream, run ``warmup`` + ``blocks`` blocks fed one block of audio at a time, and measure."""
    device = stack.device
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dit_timer = _Timed(stack.dit.forward_block, cuda)
    stack.dit.forward_block = dit_timer
    eng = StreamEngine(stack)
    audio = speechlike((warmup + blocks + 2) * 0.48 + 2.0, seed=1)
    pos = 0

    def feed() -> None:
        nonlocal pos
        while not eng.block_ready() and pos < audio.size:
            eng.push_audio(audio[pos:pos + eng.samples_per_block])
            pos += eng.samples_per_block

    def drain() -> int:
        got = 0
        while eng.ring.get_nowait() is not None:
            got += 1
        return got

    try:
        _sync(device)
        t0 = time.perf_counter()
        eng.start(image)
        dec_timer = _Timed(eng.decoder.decode, cuda)
        eng.decoder.decode = dec_timer
        feed()
        eng.generate_block()
        _sync(device)
        ttff = time.perf_counter() - t0
        drain()
        # From here on the audio is ahead of generation, as when a stream catches up: the engine's capacity.
        eng.push_audio(audio[pos:])
        pos = audio.size
        for _ in range(max(warmup - 1, 0)):
            feed()
            eng.generate_block()
            drain()
        _sync(device)
        dit_timer.take_ms(), dec_timer.take_ms()
        lat, dit_ms, dec_ms, frames = [], [], [], 0
        alloc_first = None
        span0 = time.perf_counter()
        for _ in range(blocks):
            feed()
            b0 = time.perf_counter()
            eng.generate_block()
            _sync(device)
            lat.append((time.perf_counter() - b0) * 1e3)
            frames += drain()
            dit_ms.append(dit_timer.take_ms())
            dec_ms.append(dec_timer.take_ms())
            if cuda and alloc_first is None:
                alloc_first = torch.cuda.memory_allocated(device)
        span = time.perf_counter() - span0
        if profile_to is not None:
            _profile_block(eng, feed, drain, variant, profile_to)
        if cuda:
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**30, "GPU max allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host peak RSS"
        c = stack.dit.config
        lat_h, lat_w = eng.height // 8, eng.width // 8
        tflop = dit_tflop_per_block(stack, stack.dit.tokens_per_frame(lat_h, lat_w), stack.dit.sink_tokens(lat_h, lat_w))
        notes = []
        if cuda and alloc_first is not None:
            notes.append(f"allocated after first / last measured block: {alloc_first / 2**30:.2f} / "
                         f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")
        first_measured = warmup if warmup > 0 else 0
        ring_full = (first_measured + 1) * c.frames_per_block >= c.kv_cache_frames
        dit_med = statistics.median(dit_ms) if dit_ms else float("nan")
        return RunResult(
            variant=variant, card=card_name(device), width=eng.width, height=eng.height,
            fps=frames / span if span > 0 else float("nan"),
            p50_ms=_percentile(lat, 50), p95_ms=_percentile(lat, 95), ttff_s=ttff, peak_gib=peak, peak_kind=kind,
            dit_ms=dit_med, dit_tflops=tflop / (dit_med / 1e3) if dit_med > 0 else float("nan"),
            decode_ms_per_frame=sum(dec_ms) / frames if frames else float("nan"),
            blocks=blocks, ring_full=ring_full, notes=notes)
    finally:
        del stack.dit.forward_block
        eng.close()
        eng = None  # drop the stream's caches before collecting
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _profile_block(eng: StreamEngine, feed, drain, variant: str, out: Path) -> None:
    """Profile one more block and append the top device kernels to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eng.stack.device.type == "cuda" else [])
    feed()
    with profile(activities=acts) as prof:
        eng.generate_block()
        _sync(eng.stack.device)
    drain()
    key = "self_cuda_time_total" if eng.stack.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
    with open(out, "a") as fh:
        fh.write(f"\n### {variant}, {eng.width}x{eng.height}: one block, top ops by {key}\n\n{table}\n")


# ----- variants --------------------------------------------------------------------------------------------
def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def variants(args: argparse.Namespace, settings: Settings) -> list[tuple[str, bool, bool]]:
    """(label, fp8, compile, CUDA graphs) per row, in an order where each step only adds to the last: FP8 conversion is
    in place and one-way, so the plain variant runs first. A profile (or LIVE_AVATAR_FP8 / LIVE_AVATAR_COMPILE)
    that already asks for FP8 or compile makes that the first row; one that asks for compile is the only row.
    ``--cuda-graphs`` adds the last row again with full-ring steps replayed as CUDA graphs (a profile with
    ``cuda_graphs`` set uses them in every row)."""
    base = "fp8" if settings.fp8 else _dtype_label(resolve_dtype(settings.dtype))
    if settings.compile:
        rows = [(base + "+compile", settings.fp8, True, settings.cuda_graphs)]
    else:
        rows = [(base, settings.fp8, False, settings.cuda_graphs)]
        if args.fp8 and not settings.fp8:
            rows.append(("fp8", True, False, settings.cuda_graphs))
        if args.compile:
            label, fp8, _, graphs = rows[-1]
            rows.append((label + "+compile", fp8, True, graphs))
    if settings.cuda_graphs:
        rows = [(label + "+graphs", *rest) for label, *rest in rows]
    elif getattr(args, "cuda_graphs", False):
        label, fp8, compiled, _ = rows[-1]
        rows.append((label + "+graphs", fp8, compiled, True))
    return rows


def apply_variant(stack: ProfileStack, fp8: bool, compiled: bool, graphs: bool = False) -> list[str]:
    """Bring ``stack`` to the variant (FP8, compile and CUDA graphs are only ever switched on). Returns notes."""
    from model.fp8 import FP8Linear, quantize_dit_

    notes = []
    has_fp8 = any(isinstance(m, FP8Linear) for m in stack.dit.modules())
    if fp8 and not has_fp8:
        t0 = time.perf_counter()
        n = quantize_dit_(stack.dit)
        gc.collect()
        if stack.device.type == "cuda":
            torch.cuda.empty_cache()
        notes.append(f"FP8: {n} linear layers quantised in {time.perf_counter() - t0:.1f} s")
    if compiled and not stack.dit.compiled:
        stack.dit.compile_blocks()
    stack.dit.cuda_graphs = graphs and stack.device.type == "cuda"
    return notes


# ----- output ----------------------------------------------------------------------------------------------
HEADER = ("variant", "card", "W×H", "FPS", "block p50 ms", "block p95 ms", "TTFF s", "peak GiB",
          "DiT ms/block", "DiT TFLOP/s", "decode ms/frame", "blocks")


def format_table(results: list[RunResult]) -> str:
    """A Markdown table, one row per run."""
    rows = [HEADER, tuple("---" for _ in HEADER)]
    for r in results:
        rows.append((r.variant, r.card, f"{r.width}×{r.height}", f"{r.fps:.2f}", f"{r.p50_ms:.0f}", f"{r.p95_ms:.0f}",
                     f"{r.ttff_s:.2f}", f"{r.peak_gib:.1f}", f"{r.dit_ms:.0f}", _num(r.dit_tflops),
                     f"{r.decode_ms_per_frame:.1f}", f"{r.blocks}{'' if r.ring_full else ' (ring filling)'}"))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def command_line(args: argparse.Namespace) -> str:
    """The ``live-avatar bench`` command that reproduces this run."""
    parts = ["live-avatar", "bench", "--config", str(args.config)]
    for flag in ("checkpoint_dir", "lora", "device"):
        if getattr(args, flag, None):
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for flag in ("random_weights", "fp8", "compile", "cuda_graphs", "sweep", "compare_overlap"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    parts += ["--blocks", str(args.blocks), "--warmup", str(args.warmup)]
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith("LIVE_AVATAR_") and k != "LIVE_AVATAR_BENCH_PROFILE"]
    return shlex.join(env + parts)


# ----- shared encoder --------------------------------------------------------------------------------------
def talking_frames(width: int, height: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` RGB frames of the built-in character that sway a few pixels and have a changing mouth region —
    enough motion that the encoder's P-frames carry real work, as generated frames do."""
    base = np.asarray(reference_image().resize((width, height), Image.Resampling.BICUBIC))
    rng = np.random.default_rng(seed)
    mouth = (slice(height * 11 // 20, height * 14 // 20), slice(width * 9 // 20, width * 11 // 20))
    frames = []
    for i in range(count):
        frame = np.roll(base, (round(3 * np.sin(i / 9)), round(2 * np.sin(i / 13))), axis=(0, 1)).copy()
        patch = frame[mouth].astype(np.int16) + rng.integers(-40, 40, frame[mouth].shape)
        frame[mouth] = np.clip(patch, 0, 255).astype(np.uint8)
        frames.append(frame)
    return frames


def run_encode_bench(settings: Settings, frames: int, warmup: int = 25) -> str:
    """Time the shared H.264 encoder per size and preset; returns the table (ms per frame, bitrate)."""
    import av

    from live.metrics import ServerMetrics
    from live.sinks.encoder import SharedVideoEncoder

    fps = settings.video.fps
    rows = ["| size | encoder | preset | ms/frame p50 | p95 | mean | mean / frame interval | kbit/s |",
            "|---|---|---|---|---|---|---|---|"]
    for width, height in ENCODE_SIZES:
        video = talking_frames(width, height, warmup + frames)
        convert = []
        for rgb in video[warmup:]:
            t0 = time.perf_counter()
            av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            convert.append((time.perf_counter() - t0) * 1e3)
        rows.append(f"| {width}×{height} | RGB → YUV only | – | {_percentile(convert, 50):.1f} | "
                    f"{_percentile(convert, 95):.1f} | {statistics.fmean(convert):.1f} | "
                    f"{statistics.fmean(convert) * fps / 10:.0f}% | – |")
        for preset in ENCODE_PRESETS:
            options = settings.output.model_copy(update={"x264_preset": preset, "encoder": "libx264"})
            encoder = SharedVideoEncoder(width, height, fps, options, ServerMetrics())
            times, size = [], 0
            for n, rgb in enumerate(video):
                t0 = time.perf_counter()
                packets = encoder.encode(n, rgb)
                if n >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
                    size += sum(len(p.data) for p in packets)
            mean = statistics.fmean(times)
            rows.append(f"| {width}×{height} | {encoder.name} | {preset} | {_percentile(times, 50):.1f} | "
                        f"{_percentile(times, 95):.1f} | {mean:.1f} | {mean * fps / 10:.0f}% | "
                        f"{size * 8 / (frames / fps) / 1000:.0f} |")
    return "\n".join(rows)


# ----- entry point -----------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see ``live-avatar bench --help``); prints one table."""
    if args.server and args.browser:
        from cli.voice_to_mouth import run_voice_to_mouth_bench

        result = run_voice_to_mouth_bench(settings_from_args(args), args.seconds, args.server_log)
        for key, value in result.items():
            print(f"{key}: {value}")
        print(f"\n`{command_line(args)} --server --browser --seconds {args.seconds:g}`")
        return 0

    if args.server:
        from cli.latency_bench import run_latency_bench

        settings = settings_from_args(args)
        result = run_latency_bench(settings, args.seconds, args.sessions, args.server_log)
        for key, value in result.items():
            print(f"{key}: {value}")
        print(f"\n`{command_line(args)} --server --seconds {args.seconds:g} --sessions {args.sessions}`")
        return 0

    if getattr(args, "soak", 0):
        from cli.soak_bench import run_soak

        result = run_soak(settings_from_args(args), args.soak, args.seconds)
        print(f"soak on {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
        print(result.table())
        print(f"\n{result.summary()}")
        print(f"\n`{command_line(args)} --soak {args.soak} --seconds {args.seconds:g}`")
        return 0

    if getattr(args, "encode", False):
        print(f"shared H.264 encoder on {card_name(torch.device('cpu'))}, {os.cpu_count()} CPUs, "
              f"{args.blocks * 12} frames per row\n")
        print(run_encode_bench(settings_from_args(args), args.blocks * 12))
        print(f"\n`{command_line(args)} --encode`")
        return 0

    settings = settings_from_args(args)
    rows = variants(args, settings)
    t0 = time.perf_counter()
    stack = ProfileStack.from_settings(settings)
    load_s = time.perf_counter() - t0
    areas = SWEEP_AREAS if args.sweep else (settings.video.size_area,)
    image = reference_image()
    profile_env = os.environ.get("LIVE_AVATAR_BENCH_PROFILE")
    profile_to = Path(profile_env) if profile_env else None
    results: list[RunResult] = []
    failed = 0
    source = ("checkpoint" if settings.checkpoint_dir is not None else
              "project weights" if getattr(settings, "weights", None) else "random weights")
    notes = [f"stack built in {load_s:.1f} s ({source})"]
    for label, fp8, compiled, graphs in rows:
        notes += apply_variant(stack, fp8, compiled, graphs)
        for area in areas:
            stack.settings = settings.model_copy(update={"video": settings.video.model_copy(update={"size_area": area})})
            try:
                if compiled:
                    # Compile on a throwaway stream first, so that TTFF and the table show steady-state sessions.
                    c0 = time.perf_counter()
                    run_engine(stack, label, image, warmup=1, blocks=1)
                    notes.append(f"{label} at {area}: compile warm-up stream took {time.perf_counter() - c0:.1f} s")
                result = run_engine(stack, label, image, args.warmup, args.blocks, profile_to)
                if args.compare_overlap and (label, fp8, compiled, graphs) == rows[-1]:
                    results.append(result)
                    overlap = overlap_enabled(stack.settings.stream.overlap_decode, stack.device)
                    stack.settings = stack.settings.model_copy(update={"stream": stack.settings.stream.model_copy(
                        update={"overlap_decode": not overlap})})
                    label_off = f"{label} ({'no ' if overlap else ''}decode overlap)"
                    result = run_engine(stack, label_off, image, args.warmup, args.blocks)
            except Exception as exc:  # noqa: BLE001 - one failing row (e.g. out of memory) must not lose the others
                failed += 1
                notes.append(f"{label} at {area}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                print(f"[bench] {label} at {area}: failed: {exc}", flush=True)
                continue
            results.append(result)
            notes += [f"{label} {result.width}×{result.height}: {n}" for n in result.notes]
            print(f"[bench] {label} {result.width}×{result.height}: {result.fps:.2f} FPS, "
                  f"p50 {result.p50_ms:.0f} ms, DiT {result.dit_ms:.0f} ms/block", flush=True)
    stack.settings = settings
    print()
    print(format_table(results))
    print()
    for note in notes:
        print(f"- {note}")
    peak_kind = results[0].peak_kind if results else ""
    print(f"- peak = {peak_kind}; torch {torch.__version__}; {settings.stream.steps} steps; "
          f"{args.warmup} warm-up + {args.blocks} measured blocks per row")
    print(f"\n`{command_line(args)}`")
    return 1 if failed else 0
