"""The ``live-avatar`` command: serve, render, client, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli.profile import settings_from_args
from live.settings import DEFAULT_CONFIG, ConfigError, load_settings

if TYPE_CHECKING:
    from live.settings import Settings
    from train.profile import TrainingProfile


def _cmd_serve(args: argparse.Namespace) -> int:
    from live.engine.pipeline import run_torchrun_rank
    from signaling.app import serve

    settings = settings_from_args(args)
    if args.cluster:
        return _serve_cluster(args, settings)
    if run_torchrun_rank(settings):
        return 0
    serve(settings, args.host or settings.server.host, args.port or settings.server.port, insecure=args.insecure)
    return 0


def _serve_cluster(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.front_door import ClusterError, serve_cluster

    try:
        serve_cluster(settings, args.cluster, args.host or settings.server.host, args.port or settings.server.port,
                      insecure=args.insecure)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_face_report(args: argparse.Namespace) -> int:
    from cli.face_report import face_report

    print(face_report(settings_from_args(args), args.seconds))
    print(f"\n`live-avatar face-report --config {args.config} --seconds {args.seconds:g}`")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from cli.render import render
    from live.images import is_builtin_character, photo_warning

    settings = settings_from_args(args)
    result = render(settings, args.image, args.audio, args.out, seed=args.seed, prompt=args.prompt,
                    progress=not args.quiet)
    print(f"wrote {result.out}: {result.frames} frames at {settings.video.fps} fps, {result.width}x{result.height}, "
          f"audio {result.audio_seconds:.2f} s")
    warning = photo_warning(settings.video.reference_photos)
    if args.image is not None and warning is not None and not is_builtin_character(args.image):
        print(f"warning: {args.image}: {warning}", file=sys.stderr)
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from cli.client import run_client

    return run_client(args.server, args.audio, args.out, args.seconds, args.ice_server)


def _ice_server(text: str):
    from cli.client import parse_ice_server

    try:
        return parse_ice_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from cli.bench import main as bench_main

    return bench_main(args)


def training_profile(config: str | Path | None = None) -> TrainingProfile:
    """What train-tiny needs from a YAML profile (default: the built-in tiny one), as model-level values:
    train/ reads no runtime settings itself."""
    from train.profile import TrainingProfile

    settings = load_settings(config)
    width, height = (int(v) for v in settings.video.size_area.split("*"))
    if width != height:
        raise SystemExit(f"train-tiny draws square characters: video.size_area is {settings.video.size_area}")
    return TrainingProfile(model=settings.model, options=settings.stack_options(),
                           audio_left_context_s=settings.stream.audio_left_context_s,
                           audio_lookahead_s=settings.stream.audio_lookahead_s, size=width)


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from train.runner import main as train_main

    return train_main(args, training_profile(args.config))


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for all subcommands."""
    p = argparse.ArgumentParser(prog="live-avatar", description="Real-time audio-driven avatar server.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML profile (default: built-in tiny)")
        sp.add_argument("--checkpoint-dir", type=Path, help="official Wan2.2-S2V-14B folder")
        sp.add_argument("--lora", type=Path, help="Live Avatar LoRA (liveavatar.safetensors)")
        sp.add_argument("--device", help="cpu, cuda, cuda:N or auto")
        sp.add_argument("--random-weights", action="store_true",
                        help="no checkpoints: seeded random weights of the profile's real size")

    sp = sub.add_parser("serve", help="run the WebRTC server")
    common(sp)
    sp.add_argument("--host", default=None)
    sp.add_argument("--port", type=int, default=None)
    sp.add_argument("--insecure", action="store_true",
                    help="serve a non-loopback --host without an API key (server.auth.api_key): only where a trusted "
                         "network or proxy guards the port (docs/security.md)")
    sp.add_argument("--cluster", metavar="ADDRESS", default=None,
                    help="run a front door of the Ray cluster at ADDRESS (HEAD:PORT): sessions go to the avatar hosts "
                         "of its nodes that advertise avatar_slots (docs/scale-out.md)")
    sp.set_defaults(func=_cmd_serve)

    sp = sub.add_parser("render", help="render an image + speech file to MP4")
    common(sp)
    sp.add_argument("--image", type=Path, help="reference face (PNG/JPEG); default: the first built-in character")
    sp.add_argument("--audio", type=Path, required=True, help="speech (any format PyAV reads)")
    sp.add_argument("--out", type=Path, required=True, help="output .mp4")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--prompt", default="")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_render)

    sp = sub.add_parser("client", help="stream a WAV as microphone to a server and record what comes back")
    sp.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    sp.add_argument("--audio", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--seconds", type=float, default=None)
    sp.add_argument("--ice-server", type=_ice_server, action="append", default=None, metavar="URL|JSON",
                    help="STUN/TURN server for this client, repeatable: stun:HOST[:PORT], or JSON "
                         '{"urls": "turn:HOST", "username": …, "credential": …}; '
                         "default: the server's (GET /api/config)")
    sp.set_defaults(func=_cmd_client)

    sp = sub.add_parser("bench", help="benchmark a profile and print a table")
    common(sp)
    sp.add_argument("--blocks", type=int, default=20, help="measured blocks after warm-up")
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--fp8", action="store_true", help="also measure FP8 linear layers (GPU)")
    sp.add_argument("--compile", action="store_true", help="also measure torch.compile (GPU)")
    sp.add_argument("--cuda-graphs", action="store_true",
                    help="also measure the last variant with full-ring steps replayed as CUDA graphs (GPU)")
    sp.add_argument("--sweep", action="store_true", help="resolution sweep over upstream area sizes")
    sp.add_argument("--compare-overlap", action="store_true",
                    help="also run the last variant with the VAE decode overlap (stream.overlap_decode) switched")
    sp.add_argument("--server", action="store_true", help="glass-to-glass latency through a real server")
    sp.add_argument("--seconds", type=float, default=10.0,
                    help="duration of the --server run, or of each --soak session")
    sp.add_argument("--sessions", type=int, default=1, help="clients talking at once in the --server run")
    sp.add_argument("--server-log", type=Path, default=None, help="where the --server run's server logs to")
    sp.add_argument("--browser", action="store_true", help="with --server: voice to mouth measured in headless "
                    "Chromium on the talk page (fake microphone: held-out speech; needs /usr/bin/chromium and Playwright)")
    sp.add_argument("--encode", action="store_true",
                    help="time the shared H.264 encoder at 704x384 and 1280x720 (--blocks x 12 frames per row)")
    sp.add_argument("--soak", type=int, default=0, metavar="N",
                    help="N back-to-back sessions (--seconds each) through a real server: its RSS, threads and fds")
    sp.set_defaults(func=_cmd_bench)

    sp = sub.add_parser("face-report", help="built-in avatar: facial features kept and lip sync per held-out voice, "
                        "over a long stream of every character (markdown)")
    common(sp)
    sp.add_argument("--seconds", type=float, default=60.0)
    sp.set_defaults(func=_cmd_face_report)

    from train.runner import add_arguments

    sp = sub.add_parser("train-tiny", help="train the built-in tiny avatar on synthetic talking faces")
    add_arguments(sp)
    sp.set_defaults(func=_cmd_train_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    from cli.media import MediaError
    from live.images import ImageError
    from model.checkpoint import CheckpointError

    user_errors = (ConfigError, ImageError, MediaError, CheckpointError)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
