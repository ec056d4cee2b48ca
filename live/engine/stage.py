"""What one rank of the step pipeline does with the messages it gets.

A rank that owns denoising steps keeps one KV ring per owned step (and one sink) for each session, prefills the
sink at session start, and for every block that reaches it runs one DiT step and passes the latents on. The
decode rank keeps each session's streaming VAE decoder and sends the decoded frames to rank 0. Rank 0 runs the
same :class:`StageWorker` inside the server process (see :mod:`live.engine.pipeline`); ranks 1… run :func:`run_rank`.

Exactness: step ``s``'s ring is written only by its owner, in block order (each block reaches the owner of
step ``s`` from the owner of step ``s-1``, which handled the blocks in order, over one FIFO edge), with the same
inputs as in :class:`live.engine.stream.StreamEngine` — so the frames are the single-process engine's frames.

Rolling sink: the single-process engine re-prefills the sink before block ``refresh_at`` (the first block of
the second clip) with the first latent frame of block 0. A rank's sink is shared by its steps, so a rank that
owns several steps holds back its first message of block ``refresh_at`` until it has finished every earlier
block on all its steps and has that latent (sent by the last step's owner as a REF message) — one short stall
per session, as upstream's TPP has.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from dataclasses import dataclass, field

import torch

from live.engine.mesh import Mesh, MeshError, Message, StagePlan, StoreAddress
from live.engine.stream import ProfileStack
from live.settings import Settings
from model.dit import AudioTokens, StepCaches
from model.stack import resolve_device
from model.vae import StreamingVAEDecoder, to_uint8_frames

log = logging.getLogger(__name__)

KVList = list[tuple[torch.Tensor, torch.Tensor]]


class Kind:
    """Message kinds (tensors in order)."""

    START = "start"        # 0 → every rank: ref latent, motion latents, text context; info: warm, drop_first
    READY = "ready"        # rank → 0: the session is prefilled there
    LATENTS = "latents"    # owner(s-1) → owner(s), step = s: x, audio global, audio local[, new text context]
    FINAL = "final"        # owner(last step) → decode rank: x
    REF = "ref"            # owner(last step) → every DiT rank: block 0's first latent frame (rolling sink)
    FRAMES = "frames"      # decode rank → 0: uint8 frames [n, H, W, 3] (none if n = 0)
    CLOSE = "close"        # 0 → every rank
    ERROR = "error"        # rank → 0, info.error; session -1: the rank itself failed
    STATS = "stats"        # 0 → rank: report memory
    MEMORY = "memory"      # rank → 0: info = device, steps, decodes, peak_memory_bytes, cache_bytes
    LOADED = "loaded"      # rank → 0 once its models are loaded
    SHUTDOWN = "shutdown"  # 0 → rank


def plan_for(settings: Settings) -> StagePlan:
    """The stage plan of a profile."""
    p = settings.pipeline
    return StagePlan(p.world_size, settings.stream.steps, p.decode_on)


def rank_device(settings: Settings, rank: int) -> torch.device:
    """Rank ``r``'s device: ``cuda:(i + r)`` when the profile's device is ``cuda:i`` (one GPU per rank), else the
    profile's device (CPU ranks share it)."""
    base = resolve_device(settings.device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


DECODE = -1  # key of the decoder's block counter in _Session.next_block


@dataclass(eq=False)
class _Session:
    """One stream's state on one rank."""

    caches: StepCaches | None
    decoder: StreamingVAEDecoder | None
    drop_first: int
    next_block: dict[int, int]
    motion_latents: torch.Tensor
    refresh_at: int | None
    first_latent: torch.Tensor | None = None
    refreshed: bool = False
    texts: list[tuple[int, KVList]] = field(default_factory=list)

    def needs_refresh(self, block: int) -> bool:
        """Whether the sink must be refreshed before a step of ``block`` runs here."""
        return self.refresh_at is not None and not self.refreshed and block >= self.refresh_at

    def must_wait(self, block: int) -> bool:
        """Whether a step of ``block`` must wait: the refresh needs block 0's latent and every earlier block
        done on all of this rank's steps (they share the sink)."""
        if not self.needs_refresh(block):
            return False
        return self.first_latent is None or self._oldest() < self.refresh_at

    def _oldest(self) -> int:
        return min(b for s, b in self.next_block.items() if s != DECODE)

    def text_kv(self, block: int) -> KVList:
        """Text K/V in force at ``block`` (a prompt change takes effect from the block it came with)."""
        return next(kv for first, kv in reversed(self.texts) if first <= block)

    def advance(self, rank: int, step: int, block: int) -> None:
        """Check that ``block`` is the next one for ``step`` on this rank (the cache is written in block order),
        then drop text K/V that no block still to come here can use."""
        expected = self.next_block[step]
        if block != expected:
            raise RuntimeError(f"rank {rank} got block {block} for step {step}, expected block {expected}")
        self.next_block[step] = block + 1
        while len(self.texts) > 1 and self.texts[1][0] <= self._oldest():
            self.texts.pop(0)


class StageWorker:
    """Handles one rank's messages: session start (prefill / decoder warm-up), its DiT steps, decoding."""

    def __init__(self, stack: ProfileStack, plan: StagePlan, mesh: Mesh) -> None:
        """Serve ``mesh.rank``'s part of ``plan`` with ``stack``'s models."""
        self.stack = stack
        self.plan = plan
        self.mesh = mesh
        self.rank = mesh.rank
        self.steps = plan.owned_steps(self.rank)
        self.local_step = {s: i for i, s in enumerate(self.steps)}
        self.decodes = self.rank == plan.decode_rank
        self.sessions: dict[int, _Session] = {}
        self._held: list[Message] = []
        cfg, stream = (stack.dit.config if self.steps else None), stack.settings.stream
        self.refresh_at = cfg.kv_cache_frames // cfg.frames_per_block if cfg and stream.refresh_sink else None

    def handle(self, msg: Message) -> bool:
        """Act on ``msg``; False after SHUTDOWN. A failure inside one session is reported to rank 0 as an ERROR
        for that session and the session is dropped here; transport failures (:class:`MeshError`) propagate."""
        if msg.kind == Kind.SHUTDOWN:
            return False
        self._held.append(msg)
        while (i := next((i for i, m in enumerate(self._held) if not self._waits(m)), None)) is not None:
            self._run(self._held.pop(i))
        return True

    def _waits(self, msg: Message) -> bool:
        sess = self.sessions.get(msg.session)
        return msg.kind == Kind.LATENTS and sess is not None and sess.must_wait(msg.block)

    def _run(self, msg: Message) -> None:
        handlers = {Kind.START: self._start, Kind.LATENTS: self._latents, Kind.REF: self._ref,
                    Kind.FINAL: self._final, Kind.CLOSE: self._close, Kind.STATS: self._stats}
        if msg.kind not in handlers:
            raise ValueError(f"rank {self.rank} cannot handle a {msg.kind!r} message")
        try:
            with torch.no_grad():
                handlers[msg.kind](msg)
        except MeshError:
            raise
        except Exception as exc:  # noqa: BLE001 - one session fails, the rank goes on serving the others
            log.exception("pipeline rank %d: %s of session %d failed", self.rank, msg.kind, msg.session)
            self.sessions.pop(msg.session, None)
            self.mesh.send(0, Message(Kind.ERROR, session=msg.session, info={"error": f"{type(exc).__name__}: {exc}"}))

    # ----- handlers ------------------------------------------------------------------------------------
    def _start(self, msg: Message) -> None:
        st = self.stack
        ref_latent, motion_latents, context = msg.tensors
        sess = _Session(None, None, msg.info["drop_first"], {s: 0 for s in self.steps}, motion_latents,
                        self.refresh_at)
        if self.steps:
            text_kv = st.dit.text_kv(context)
            lat_h, lat_w = ref_latent.shape[-2:]
            sess.caches = st.dit.new_caches(len(self.steps), lat_h, lat_w, device=st.device, dtype=st.dtype)
            st.dit.prefill_sink(sess.caches, ref_latent, motion_latents, text_kv)
            sess.texts.append((0, text_kv))
        if self.decodes:
            sess.decoder = StreamingVAEDecoder(st.vae)
            sess.decoder.reset()
            if msg.info["warm"]:
                sess.decoder.decode(motion_latents[:, :, :msg.info["warm"]])
            sess.next_block[DECODE] = 0
        self.sessions[msg.session] = sess
        self.mesh.send(0, Message(Kind.READY, session=msg.session))

    def _latents(self, msg: Message) -> None:
        sess = self.sessions.get(msg.session)
        if sess is None:
            return  # the session was closed while this block was in flight
        st, step, block = self.stack, msg.step, msg.block
        x, audio_global, audio_local, *context = msg.tensors
        if context and sess.texts[-1][0] < block:
            sess.texts.append((block, st.dit.text_kv(context[0])))
        if sess.needs_refresh(block):
            st.dit.prefill_sink(sess.caches, sess.first_latent, sess.motion_latents, sess.text_kv(sess.refresh_at))
            sess.refreshed, sess.first_latent = True, None
        text_kv = sess.text_kv(block)
        sess.advance(self.rank, step, block)
        t = st.schedule.timestep(step, st.device)
        block_start = block * st.dit.config.frames_per_block
        v = st.dit.forward_block(x.to(st.dtype), t, AudioTokens(audio_global, audio_local), text_kv,
                                 sess.caches, self.local_step[step], block_start)
        x = st.schedule.euler_step(x, v, step)
        if block == 0 and step + 1 == self.plan.steps and sess.refresh_at is not None:
            first = x[:, :, :1].to(st.dtype)
            for rank in range(self.plan.dit_ranks):
                self.mesh.send(rank, Message(Kind.REF, session=msg.session, tensors=[first]))
        if step + 1 < self.plan.steps:
            out = Message(Kind.LATENTS, session=msg.session, block=block, step=step + 1,
                          tensors=[x, audio_global, audio_local, *context])
        else:
            out = Message(Kind.FINAL, session=msg.session, block=block, tensors=[x])
        self.mesh.send(self.plan.after(step), out)

    def _ref(self, msg: Message) -> None:
        sess = self.sessions.get(msg.session)
        if sess is not None:
            sess.first_latent = msg.tensors[0]

    def _final(self, msg: Message) -> None:
        sess = self.sessions.get(msg.session)
        if sess is None:
            return
        sess.advance(self.rank, DECODE, msg.block)
        frames = to_uint8_frames(sess.decoder.decode(msg.tensors[0].to(self.stack.dtype)))
        if msg.block == 0 and sess.drop_first:
            frames = frames[sess.drop_first:]
        tensors = [frames] if frames.shape[0] else []
        self.mesh.send(0, Message(Kind.FRAMES, session=msg.session, block=msg.block, tensors=tensors))

    def _close(self, msg: Message) -> None:
        self.sessions.pop(msg.session, None)

    def _stats(self, msg: Message) -> None:
        caches = sum(s.caches.nbytes() for s in self.sessions.values() if s.caches is not None)
        info = {"device": str(self.stack.device), "steps": list(self.steps), "decodes": self.decodes,
                "peak_memory_bytes": peak_memory_bytes(self.stack.device), "cache_bytes": caches}
        self.mesh.send(0, Message(Kind.MEMORY, info=info))


def load_stage_stack(settings: Settings, plan: StagePlan, rank: int) -> ProfileStack:
    """Load the models for rank ``rank`` (> 0) on its device and release the parts it does not use: the audio
    and text encoders run on rank 0 only, the VAE on the decode rank, the DiT on DiT ranks."""
    device = rank_device(settings, rank)
    stack = ProfileStack.from_settings(settings.model_copy(update={"device": str(device), "text_device": "cpu"}))
    unused = {"wav2vec2": None, "text_encoder": None}
    if rank != plan.decode_rank:
        unused["vae"] = None
    if not plan.owned_steps(rank):
        unused["dit"] = None
    stack = dataclasses.replace(stack, **unused)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stack


def run_rank(settings: Settings, rank: int, address: StoreAddress, startup_timeout_s: float,
             op_timeout_s: float) -> None:
    """Entry point of ranks 1…: join the pipeline, load the models, serve messages until SHUTDOWN.

    A failure while loading is reported to rank 0 (ERROR, session -1) before the process exits with it.
    """
    plan = plan_for(settings)
    store = address.client(startup_timeout_s)
    store.set(f"up/{rank}", b"1")
    mesh = Mesh.connect(rank, plan, rank_device(settings, rank), settings.pipeline.backend, address, store,
                        startup_timeout_s, op_timeout_s)
    try:
        try:
            stack = load_stage_stack(settings, plan, rank)
        except Exception as exc:
            mesh.send(0, Message(Kind.ERROR, info={"error": f"loading models failed: {type(exc).__name__}: {exc}"}))
            raise
        mesh.send(0, Message(Kind.LOADED))
        worker = StageWorker(stack, plan, mesh)
        while worker.handle(mesh.get(None)):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        mesh.close()
