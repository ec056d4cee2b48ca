"""Multi-GPU step pipeline on one host: rank ``i`` owns denoising steps ``i, i+D, …``, blocks flow back to back.

Who computes what (``D`` DiT ranks, ``S`` steps, see :class:`~live.engine.mesh.StagePlan`):

- Rank 0 lives in the server process (this module). It receives the session's audio, image and prompt, and is
  the only rank that runs wav2vec2, the audio encoder and the text encoder, and VAE-encodes the reference. It
  sends each rank what that rank needs — at session start the reference and motion latents and the text
  context (every DiT rank prefills the sink of its own steps' caches), and with every block its latents,
  audio tokens and, after a prompt change, the new text context. Audio tokens are a few hundred KB per block
  and cost one encoder call on rank 0; computing them on every rank would load wav2vec2 on every GPU and
  repeat the work N times.
- Each block travels ``0 → 1 → … → D-1 → 0 → …``: the owner of step ``s`` runs one DiT forward with its own KV
  ring for ``s``, takes the Euler step and sends the latents to the owner of ``s+1``; after the last step they
  go to the decode rank (the last rank), which decodes and sends the frames to rank 0, which puts them in the
  session's frame ring. While rank 1 runs block k's step 1, rank 0 already runs block k+1's step 0.
- ``S`` need not equal the number of GPUs: with 4 steps on 3 ranks rank 0 owns steps 0 and 3.

Launch (set ``pipeline.world_size`` > 1 and ``device: cuda:0`` in the profile; see docs/multigpu.md):

- ``live-avatar serve --config configs/liveavatar-14b-multigpu.yaml`` — the server is rank 0 and starts ranks
  1… itself with ``torch.multiprocessing`` (spawn; see :func:`rank_context`) when the first engine is created.
  A rank that dies ends its sessions with :class:`PipelineRankError`; the server stays up and the next session
  starts a fresh set of ranks.
- ``torchrun --standalone --nproc-per-node 4 -m cli.main serve --config configs/liveavatar-14b-multigpu.yaml``:
  torchrun starts the ranks; rank 0 serves HTTP, the others run their stage. torchrun stops the whole job
  when any rank fails (its ``--max-restarts`` restarts it).

Every process started here runs with NVLink multicast off (``NCCL_NVLS_ENABLE=0``, see
:data:`~live.engine.mesh.SAFE_ENV`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import torch
import torch.multiprocessing
from PIL import Image

from live.engine.mesh import (
    Mesh,
    MeshError,
    Message,
    StagePlan,
    StoreAddress,
    apply_safe_env,
    check_backend,
)
from live.engine.stage import Kind, StageWorker, plan_for, run_rank
from live.engine.stream import ProfileStack, StreamEngine
from live.settings import Settings
from live.stream.audio_window import AudioBlock
from model.dit import AudioTokens

log = logging.getLogger(__name__)

POLL_S = 0.1
STARTUP_TIMEOUT_S = 1800.0  # 14B checkpoints load for minutes on every rank
BLOCK_TIMEOUT_S = 600.0     # no message at all for this long = a hung rank (first blocks may compile for minutes;
                            # a dead rank is noticed at once from its process)
OP_TIMEOUT_S = 600.0        # backend timeout of one send/recv (NCCL watchdog, gloo)
STOP_GRACE_S = 5.0
PEER_EXIT_GRACE_S = 2.0  # a reset socket can be seen before the dead peer is reaped


class PipelineError(RuntimeError):
    """The step pipeline cannot go on (a rank failed or stopped answering)."""


class PipelineRankError(PipelineError):
    """Rank ``rank`` of the step pipeline failed; the message names it."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (torchrun sets RANK, WORLD_SIZE and TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def torchrun_address() -> tuple[StoreAddress, bool]:
    """The store of a torchrun job and whether rank 0 hosts it (torchrun's agent usually does)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    address = StoreAddress(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), f"live-avatar/{restart}")
    return address, os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_context(device: torch.device) -> torch.multiprocessing.context.BaseContext:
    """How ranks 1… are started. On GPUs: ``spawn``, so no rank inherits the server's threads or a CUDA context
    (model loading dominates start-up there anyway). On CPU: a fork server — itself a fresh interpreter, with
    the model code imported once — so each rank is forked in milliseconds instead of importing torch, diffusers
    and transformers again; that keeps CPU tests and restarts fast."""
    if device.type == "cuda":
        return torch.multiprocessing.get_context("spawn")
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["live.engine.stage"])
    return ctx


@dataclass(eq=False)
class _Route:
    """What rank 0 has heard about one session: ranks ready, blocks in flight (in order), blocks decoded."""

    ready: set[int] = field(default_factory=set)
    inflight: deque[tuple[int, float]] = field(default_factory=deque)  # (block, time it was put in)
    done: deque[tuple[int, float, torch.Tensor | None]] = field(default_factory=deque)  # (block, latency, frames)
    error: PipelineError | None = None


class PipelineHost:
    """Rank 0 of a step pipeline, in this process: starts or joins the other ranks, runs rank 0's stage and
    routes what comes back (readiness, frames, errors) to the sessions. Thread-safe; model work runs on the
    calling thread (the engine worker's)."""

    def __init__(self, stack: ProfileStack, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 block_timeout_s: float = BLOCK_TIMEOUT_S, op_timeout_s: float = OP_TIMEOUT_S) -> None:
        """Bring up ``stack.settings.pipeline.world_size`` ranks with ``stack`` as rank 0's models; blocks until
        every rank has loaded its models. Raises :class:`PipelineError` if a rank fails to start."""
        self.stack = stack
        self.plan: StagePlan = plan_for(stack.settings)
        check_backend(stack.settings.pipeline.backend, stack.device)
        self.block_timeout_s = block_timeout_s
        self.torchrun = self.plan.world_size > 1 and launched_by_torchrun()
        self.failed: PipelineError | None = None
        self._procs: dict[int, BaseProcess] = {}
        self._routes: dict[int, _Route] = {}
        self._loaded: set[int] = {0}
        self._stats: dict[int, dict] = {}
        self._next_session = 0
        self._lock = threading.RLock()
        self.mesh: Mesh | None = None
        if self.plan.world_size == 1:
            self.mesh = Mesh(0, self.plan, stack.device)
        else:
            self.mesh = self._start_ranks(startup_timeout_s, op_timeout_s)
        self.worker = StageWorker(stack, self.plan, self.mesh)
        self.pump(lambda: len(self._loaded) == self.plan.world_size, startup_timeout_s,
                  lambda: f"ranks {sorted(set(range(self.plan.world_size)) - self._loaded)} to load their models")

    def healthy(self) -> bool:
        """Whether the pipeline can take sessions: not failed, and (when this host started them) every rank
        process alive. A rank found dead here fails the pipeline."""
        with self._lock:
            try:
                self._raise_failed()
                self._check_alive()
            except PipelineError:
                return False
            return True

    @property
    def processes(self) -> dict[int, BaseProcess]:
        """The rank processes this host started (none under torchrun or for one rank), by rank."""
        return dict(self._procs)

    def _start_ranks(self, startup_timeout_s: float, op_timeout_s: float) -> Mesh:
        try:
            return self._join(startup_timeout_s, op_timeout_s)
        except BaseException as exc:
            self._stop_ranks()
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(f"starting the step pipeline failed: {type(exc).__name__}: {exc}") from exc

    def _join(self, startup_timeout_s: float, op_timeout_s: float) -> Mesh:
        settings = self.stack.settings
        apply_safe_env()
        # An NCCL error must not take the server down: abort the communicators and raise instead.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        if self.torchrun:
            if int(os.environ["WORLD_SIZE"]) != self.plan.world_size or int(os.environ["RANK"]) != 0:
                raise PipelineError(f"torchrun started rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, "
                                    f"the profile wants rank 0 of pipeline.world_size={self.plan.world_size}")
            address, hosts = torchrun_address()
            store = address.serve(startup_timeout_s) if hosts else address.client(startup_timeout_s)
        else:
            address = StoreAddress("127.0.0.1", free_port(), "live-avatar")
            store = address.serve(startup_timeout_s)
            ctx = rank_context(self.stack.device)
            for rank in range(1, self.plan.world_size):
                proc = ctx.Process(target=run_rank, name=f"pipeline-rank-{rank}", daemon=True,
                                   args=(settings, rank, address, startup_timeout_s, op_timeout_s))
                proc.start()
                self._procs[rank] = proc
            deadline = time.monotonic() + startup_timeout_s
            while not all(store.check([f"up/{r}"]) for r in self._procs):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise PipelineError(f"pipeline ranks did not start within {startup_timeout_s:.0f} s")
                time.sleep(POLL_S)
        return Mesh.connect(0, self.plan, self.stack.device, settings.pipeline.backend, address, store,
                            startup_timeout_s, op_timeout_s)

    # ----- sessions --------------------------------------------------------------------------------------
    def open_session(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor, context: torch.Tensor,
                     warm_latents: int, drop_first: int) -> tuple[int, _Route]:
        """Start a session on every rank (sink prefill, decoder warm-up) and wait until all are ready."""
        with self._lock:
            self._raise_failed()
            sid, route = self._next_session, _Route()
            self._next_session += 1
            self._routes[sid] = route
            info = {"warm": warm_latents, "drop_first": drop_first}
            for rank in [*range(1, self.plan.world_size), 0]:  # rank 0 last: the others prefill meanwhile
                self.send(rank, Message(Kind.START, session=sid, tensors=[ref_latent, motion_latents, context],
                                        info=info))
            self.pump(lambda: route.error is not None or len(route.ready) == self.plan.world_size,
                      self.block_timeout_s, lambda: f"session {sid} to start on every rank")
            if route.error is not None:
                self.close_session(sid)
                raise route.error
            return sid, route

    def submit(self, sid: int, block: int, latents: torch.Tensor, audio: AudioTokens,
               context: torch.Tensor | None) -> None:
        """Put block ``block`` of session ``sid`` into the pipeline at step 0 (with a new text context, if any)."""
        with self._lock:
            self._routes[sid].inflight.append((block, time.perf_counter()))
            tensors = [latents, audio.global_, audio.local] + ([context] if context is not None else [])
            self.send(self.plan.owner(0), Message(Kind.LATENTS, session=sid, block=block, step=0, tensors=tensors))

    def close_session(self, sid: int) -> None:
        """Forget session ``sid`` here and on every rank; never raises."""
        with self._lock:
            self._routes.pop(sid, None)
            if self.failed is not None:
                return
            try:
                for rank in range(self.plan.world_size):
                    self.send(rank, Message(Kind.CLOSE, session=sid))
                self.poll()
            except PipelineError as exc:
                log.warning("closing pipeline session %d: %s", sid, exc)

    def stats(self) -> list[dict]:
        """Per rank: device, owned steps, whether it decodes, peak memory and KV cache bytes."""
        with self._lock:
            self._stats.clear()
            for rank in range(self.plan.world_size):
                self.send(rank, Message(Kind.STATS))
            self.pump(lambda: len(self._stats) == self.plan.world_size, self.block_timeout_s,
                      lambda: "memory statistics")
            return [{"rank": r, **self._stats[r]} for r in range(self.plan.world_size)]

    # ----- message loop ---------------------------------------------------------------------------------
    def send(self, rank: int, msg: Message) -> None:
        """Send ``msg`` to ``rank``; a transport failure fails the pipeline."""
        self._raise_failed()
        try:
            self.mesh.send(rank, msg)
        except MeshError as exc:
            raise self._fail(self._explain(exc)) from exc

    def pump(self, done: Callable[[], bool], timeout_s: float, waiting_for: Callable[[], str]) -> None:
        """Handle messages (running rank 0's stage work) until ``done()``. Raises :class:`PipelineError` if a
        rank died, the transport failed, or nothing arrived for ``timeout_s`` seconds."""
        with self._lock:
            quiet_since = time.monotonic()
            while not done():
                if self._handle_next(POLL_S):
                    quiet_since = time.monotonic()
                    continue
                if time.monotonic() - quiet_since > timeout_s:
                    raise self._fail(PipelineError(
                        f"no message from pipeline ranks 1-{self.plan.world_size - 1} for {timeout_s:.0f} s "
                        f"while waiting for {waiting_for()}; a rank is hung"))

    def poll(self) -> None:
        """Handle every message that is already here, without waiting."""
        with self._lock:
            while self._handle_next(0.0):
                pass

    def _handle_next(self, timeout: float) -> bool:
        self._raise_failed()
        try:
            msg = self.mesh.get(timeout)
        except MeshError as exc:
            raise self._fail(self._explain(exc)) from exc
        if msg is None:
            self._check_alive()
            return False
        self._dispatch(msg)
        return True

    def _dispatch(self, msg: Message) -> None:
        route = self._routes.get(msg.session)
        if msg.kind == Kind.LOADED:
            self._loaded.add(msg.src)
        elif msg.kind == Kind.MEMORY:
            self._stats[msg.src] = msg.info
        elif msg.kind == Kind.ERROR and msg.session < 0:
            raise self._fail(PipelineRankError(msg.src, f"pipeline rank {msg.src} failed: {msg.info['error']}"))
        elif msg.kind == Kind.ERROR:
            if route is not None:
                route.error = PipelineRankError(msg.src, f"pipeline rank {msg.src} failed in session {msg.session}: "
                                                         f"{msg.info['error']}")
        elif msg.kind == Kind.READY:
            if route is not None:
                route.ready.add(msg.src)
        elif msg.kind == Kind.FRAMES:
            if route is not None:
                expected, t0 = route.inflight.popleft() if route.inflight else (None, 0.0)
                if expected != msg.block:
                    route.error = PipelineError(f"frames of block {msg.block} arrived, expected block {expected}")
                route.done.append((msg.block, time.perf_counter() - t0, msg.tensors[0] if msg.tensors else None))
        else:
            try:
                self.worker.handle(msg)
            except MeshError as exc:
                raise self._fail(self._explain(exc)) from exc

    # ----- failure ------------------------------------------------------------------------------------
    def _raise_failed(self) -> None:
        if self.failed is not None:
            raise self.failed

    def _check_alive(self) -> None:
        for rank, proc in self._procs.items():
            if proc.exitcode is not None:
                how = (f"was killed by {signal.Signals(-proc.exitcode).name}" if proc.exitcode < 0
                       else f"exited with code {proc.exitcode}")
                raise self._fail(PipelineRankError(rank, f"pipeline rank {rank} (pid {proc.pid}) {how}"))

    def _explain(self, exc: MeshError) -> PipelineError:
        """A transport error, attributed to a dead rank when one is dead (it is the likely cause).

        A peer's socket can report the reset before its process is reaped, so give the peer a moment to exit."""
        peer = self._procs.get(exc.peer)
        if peer is not None:
            peer.join(timeout=PEER_EXIT_GRACE_S)
        try:
            self._check_alive()
        except PipelineError as dead:
            return dead
        if exc.peer < 0:
            return PipelineError(f"step pipeline transport failed: {exc}")
        return PipelineRankError(exc.peer, f"pipeline rank {exc.peer} unreachable: {exc}")

    def _fail(self, exc: PipelineError) -> PipelineError:
        """Mark the pipeline failed with ``exc`` (first failure wins), end every session, stop the ranks."""
        if self.failed is None:
            self.failed = exc
            log.error("step pipeline failed: %s", exc)
            for route in self._routes.values():
                route.error = exc
            self._stop_ranks()
        return self.failed

    def _stop_ranks(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs.values():
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_GRACE_S)
        if self.mesh is not None:
            self.mesh.close()

    def shutdown(self) -> None:
        """Stop the other ranks (SHUTDOWN, then terminate stragglers) and leave the process group; idempotent."""
        with self._lock:
            if self.failed is None:
                self.failed = PipelineError("the step pipeline was shut down")
                try:
                    for rank in range(1, self.plan.world_size):
                        self.mesh.send(rank, Message(Kind.SHUTDOWN))
                except MeshError as exc:
                    log.warning("pipeline shutdown: %s", exc)
                for proc in self._procs.values():
                    proc.join(STOP_GRACE_S)
                self._stop_ranks()
            _forget_host(self)


_HOSTS: dict[int, PipelineHost] = {}
_HOSTS_LOCK = threading.Lock()


def pipeline_host(stack: ProfileStack) -> PipelineHost:
    """The running pipeline whose rank 0 uses ``stack``: started on first use, and started afresh after a rank
    failure, also one that happened while it was idle (spawn launch; under torchrun the job must be restarted)."""
    with _HOSTS_LOCK:
        host = _HOSTS.get(id(stack))
        if host is not None and host.stack is stack and host.healthy():
            return host
        if host is not None and host.stack is stack and host.torchrun:
            raise PipelineError(f"the step pipeline failed ({host.failed}); restart the torchrun job")
        host = PipelineHost(stack)
        _HOSTS[id(stack)] = host
        return host


def _forget_host(host: PipelineHost) -> None:
    with _HOSTS_LOCK:
        if _HOSTS.get(id(host.stack)) is host:
            del _HOSTS[id(host.stack)]


@atexit.register
def _shutdown_hosts() -> None:
    for host in list(_HOSTS.values()):
        host.shutdown()


class PipelineEngine(StreamEngine):
    """:class:`~live.engine.stream.StreamEngine`'s surface over the step pipeline (this process is rank 0).

    ``generate_block`` puts the next block into the pipeline when its audio is there and fewer than
    ``depth`` (= world size + 1: one block more than stages, so a block being decoded and handed back never
    leaves the first stage idle) blocks are in flight, and hands at most one finished block to the ring per call,
    waiting for one only when the pipeline is full or no new block could be started. ``block_ready`` is true
    while blocks are in flight, so a caller that loops on it drains the pipeline. A rank failure surfaces as
    :class:`PipelineRankError` from ``start``/``generate_block``.
    """

    def __init__(self, stack: ProfileStack, seed: int | None = None, host: PipelineHost | None = None) -> None:
        """An engine on ``host`` (default: the process's pipeline for ``stack``, started if needed)."""
        super().__init__(stack, seed)
        self.host = host if host is not None else pipeline_host(stack)
        self.depth = self.host.plan.world_size + 1
        self.session = -1
        self.blocks_submitted = 0
        self.block_latency_s: float | None = None  # of the last block: put into the pipeline → frames arrived
        self._route: _Route | None = None

    @torch.no_grad()
    def start(self, image: Image.Image | None = None, prompt: str = "") -> None:
        """Encode the reference on rank 0, prefill every rank's caches, prime the decoder, allocate the ring."""
        s = self.stack.settings
        ref_latent, motion_latents = self._encode_reference(image)
        self.session, self._route = self.host.open_session(ref_latent, motion_latents, self._text_context(prompt),
                                                           s.stream.vae_warmup_latents, self.drop_first)
        self._open_stream_io()

    def _text_context(self, prompt: str) -> torch.Tensor:
        st = self.stack
        return st.text_encoder.encode(prompt).to(st.device, st.dtype)

    @property
    def blocks_in_flight(self) -> int:
        """Blocks put into the pipeline whose frames have not arrived yet."""
        return len(self._route.inflight) if self._route is not None else 0

    def work_ready(self) -> bool:
        """The worker's poll: as :meth:`block_ready` (a call with only blocks in flight waits for one)."""
        return self.block_ready()

    def block_ready(self) -> bool:
        """Whether ``generate_block`` has work: audio for a new block, blocks in flight or finished, or an error
        to report."""
        with self._lock:
            if self.window is None or self._closed:
                return False
            r = self._route
            return bool(r.error or r.done or r.inflight) or self.window.ready()

    @torch.no_grad()
    def generate_block(self) -> int:
        """Advance the pipeline (see the class docstring); returns the frames put into the ring (0 if none)."""
        route = self._route
        with self._lock:
            window = self._require_started()
            block = window.next_block() if len(route.inflight) < self.depth and route.error is None else None
            prompt = None
            if block is not None:
                prompt, self._pending_prompt = self._pending_prompt, None
        if route.error is None and block is not None:
            self._submit(block, prompt)
        if route.error is None:
            if not route.done and route.inflight and (block is None or len(route.inflight) >= self.depth):
                self.host.pump(lambda: bool(route.done) or route.error is not None, self.host.block_timeout_s,
                               lambda: f"block {route.inflight[0][0]} of session {self.session}")
            else:
                self.host.poll()
        if route.error is not None:
            raise route.error
        if not route.done:
            return 0
        _, self.block_latency_s, frames = route.done.popleft()
        self.blocks_done += 1
        if frames is None:
            return 0
        self.ring.put(frames)
        self.frames_emitted += frames.shape[0]
        return frames.shape[0]

    def _submit(self, block: AudioBlock, prompt: str | None) -> None:
        st = self.stack
        context = self._text_context(prompt) if prompt is not None else None
        first_frame = block.index * self.frames_per_block
        window_start = block.index * self.samples_per_block - block.block_offset
        feats = self._features(block.samples, window_start, first_frame, self.frames_per_block)
        audio = st.dit.encode_audio(feats.to(st.device, st.dtype))
        x = torch.randn(self._latent_shape, generator=self._generator, device=st.device, dtype=torch.float32)
        self.host.submit(self.session, block.index, x, audio, context)
        self.blocks_submitted += 1

    def close(self) -> None:
        """End the session on every rank and wake anyone waiting on the ring; idempotent, never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._route is not None:
            self.host.close_session(self.session)
        if self.ring is not None:
            self.ring.close()


def run_torchrun_rank(settings: Settings) -> bool:
    """Under torchrun (``torchrun … -m cli.main serve --config PROFILE``): make this process safe for NCCL and, on
    ranks 1…, run the rank's stage until the job ends and return True. Returns False on rank 0 (which goes on to
    serve HTTP) and outside torchrun."""
    if not launched_by_torchrun():
        return False
    apply_safe_env()
    rank = int(os.environ["RANK"])
    if rank == 0:
        return False
    address, _ = torchrun_address()
    run_rank(settings, rank, address, STARTUP_TIMEOUT_S, OP_TIMEOUT_S)
    return True
