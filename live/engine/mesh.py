"""Transport of the multi-GPU step pipeline: which rank owns which denoising step, and messages between ranks.

A message is a small JSON header plus a list of tensors. Headers travel through a ``torch.distributed`` TCPStore
(one numbered inbox per rank); tensors travel with ``isend``/``irecv`` over a two-rank process group of the
configured backend (NCCL on GPUs, gloo on CPU) for each *directed* edge ``src → dst`` that carries data.

Why this split:
- A rank waits for work from several peers (its step predecessor, rank 0, the last DiT stage), so it needs a
  receive-from-anyone that can wait without a deadline. gloo's any-source receive closes the connection when
  a wait times out, and a pending NCCL receive spins on the GPU and trips the NCCL watchdog; a store key can
  be waited on for as long as needed.
- NCCL runs the operations of one communicator in order on one stream, so a receive posted ahead of a send on
  the same pair can wait for a peer that waits for us. One group per direction keeps sends and receives of a
  pair on different streams. Receives are posted only once their header has arrived, by a background thread,
  so a sender never waits for the receiver's main loop, and every group is opened (NCCL communicators
  created) in one global order at start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) can take a shared host's GPUs out of service; keep it off in every rank we start.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STORE_WAIT = datetime.timedelta(hours=1)
PG_PREFIX, MSG_PREFIX = "pg", "msg"


def apply_safe_env() -> None:
    """Set the NCCL/NVSHMEM variables that keep NVLink multicast off (call before any NCCL communicator)."""
    os.environ.update(SAFE_ENV)


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ValueError unless ``backend`` moves tensors of ``device`` (nccl: CUDA, gloo: CPU)."""
    if (backend == "nccl") != (device.type == "cuda"):
        raise ValueError(f"pipeline backend {backend!r} does not fit device {device}: use nccl on CUDA devices, "
                         "gloo on CPU")


class MeshError(RuntimeError):
    """A transport operation with ``peer`` failed (a peer died, a connection closed)."""

    def __init__(self, peer: int, message: str) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class StagePlan:
    """Who does what in a pipeline of ``world_size`` ranks for ``steps`` denoising steps.

    DiT stages are ranks ``0 .. dit_ranks-1``; step ``s`` runs on rank ``s % dit_ranks``, so rank ``i`` owns
    steps ``i, i+D, i+2D, …`` and a block's latents go round the ring ``0 → 1 → … → D-1 → 0 …`` until the last
    step, whose output goes to the decode rank (always the last rank: with ``decode_on='last'`` it also runs
    DiT steps — it owns the fewest — and with ``'own'`` it only decodes).
    """

    world_size: int
    steps: int
    decode_on: str = "last"

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.steps < 1:
            raise ValueError(f"world_size and steps must be >= 1, got {self.world_size} and {self.steps}")
        if self.decode_on not in ("last", "own"):
            raise ValueError(f"decode_on must be 'last' or 'own', got {self.decode_on!r}")
        if self.decode_on == "own" and self.world_size < 2:
            raise ValueError("decode_on='own' needs world_size >= 2 (one rank for the DiT, one for the decoder)")
        if self.world_size > self.dit_ranks + 1:
            raise ValueError(f"world_size {self.world_size} leaves ranks idle: {self.steps} steps use at most "
                             f"{self.steps} DiT ranks plus one decode rank")

    @property
    def dit_ranks(self) -> int:
        """Number of ranks that run DiT steps."""
        wanted = self.world_size if self.decode_on == "last" else self.world_size - 1
        return min(wanted, self.steps)

    @property
    def decode_rank(self) -> int:
        """The rank that runs the VAE decoder."""
        return self.world_size - 1

    def owner(self, step: int) -> int:
        """Rank that runs denoising step ``step``."""
        return step % self.dit_ranks

    def owned_steps(self, rank: int) -> tuple[int, ...]:
        """Steps ``rank`` runs, in order (empty for a decode-only rank)."""
        return tuple(s for s in range(self.steps) if self.owner(s) == rank)

    def after(self, step: int) -> int:
        """Where the latents go after ``step``: the next step's owner, or the decode rank after the last step."""
        return self.owner(step + 1) if step + 1 < self.steps else self.decode_rank

    def data_edges(self) -> list[tuple[int, int]]:
        """Directed ``(src, dst)`` pairs that carry tensors, in one order shared by every rank."""
        edges = {(0, r) for r in range(1, self.world_size)}  # session start: reference, motion, text
        edges |= {(self.owner(s), self.after(s)) for s in range(self.steps)}
        edges |= {(self.owner(self.steps - 1), r) for r in range(self.dit_ranks)}  # rolling-sink latent
        edges.add((self.decode_rank, 0))  # decoded frames
        return sorted((a, b) for a, b in edges if a != b)


@dataclass(frozen=True)
class StoreAddress:
    """Where the pipeline's TCPStore listens, and the key namespace of this pipeline in it."""

    addr: str
    port: int
    namespace: str

    def client(self, timeout_s: float) -> Any:
        """A new connection to the store (retries until it is up or ``timeout_s`` passes), namespaced."""
        store = dist.TCPStore(self.addr, self.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        return dist.PrefixStore(self.namespace, store)

    def serve(self, timeout_s: float) -> Any:
        """Host the store in this process (it lives as long as the returned object), namespaced."""
        store = dist.TCPStore(self.addr, self.port, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        return dist.PrefixStore(self.namespace, store)


@dataclass(eq=False)
class Message:
    """One message between ranks: a kind, routing fields, JSON-able ``info`` and tensors."""

    kind: str
    src: int = 0
    session: int = -1
    block: int = -1
    step: int = -1
    tensors: list[torch.Tensor] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def header(self) -> bytes:
        """The JSON header: routing fields, ``info`` and each tensor's dtype and shape (the receiver allocates
        from it and posts the receives before the sender's data arrives)."""
        return json.dumps({"kind": self.kind, "src": self.src, "session": self.session, "block": self.block,
                           "step": self.step, "info": self.info,
                           "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in self.tensors]}
                          ).encode()


STOP = "_stop"  # header kind that ends a rank's inbox thread


class Mesh:
    """This process's end of the pipeline transport: ``send`` to a rank, ``get`` the next message for us.

    Messages to ourselves are queued directly. For ``world_size`` 1 no process group is created at all.
    """

    def __init__(self, rank: int, plan: StagePlan, device: torch.device) -> None:
        """A mesh with no peers (``world_size`` 1); use :meth:`connect` for several ranks."""
        self.rank = rank
        self.plan = plan
        self.device = device
        self._queue: queue.Queue[tuple[dict, list[torch.Tensor], list] | BaseException] = queue.Queue()
        self._groups: dict[tuple[int, int], Any] = {}
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self._store: Any = None
        self._thread: threading.Thread | None = None
        self._nccl = False
        self._joined = False

    @classmethod
    def connect(cls, rank: int, plan: StagePlan, device: torch.device, backend: str, address: StoreAddress,
                store: Any, startup_timeout_s: float, op_timeout_s: float) -> "Mesh":
        """Join the pipeline through ``store`` (``address``'s namespace): default process group, one group per
        data edge (opened in a fixed order) and the inbox thread. Blocks until every rank has joined or
        ``startup_timeout_s`` passes."""
        apply_safe_env()
        check_backend(backend, device)
        if backend == "nccl":
            torch.cuda.set_device(device)
        mesh = cls(rank, plan, device)
        mesh._nccl = backend == "nccl"
        extra = {"device_id": device} if mesh._nccl else {}
        dist.init_process_group(backend, store=dist.PrefixStore(PG_PREFIX, store), rank=rank,
                                world_size=plan.world_size, timeout=datetime.timedelta(seconds=startup_timeout_s),
                                **extra)
        mesh._joined = True
        op_timeout = datetime.timedelta(seconds=op_timeout_s)
        for edge in plan.data_edges():
            mesh._groups[edge] = dist.new_group(list(edge), backend=backend, timeout=op_timeout)
        mesh._open_edges()
        mesh._store = dist.PrefixStore(MSG_PREFIX, store)
        inbox_store = dist.PrefixStore(MSG_PREFIX, address.client(STORE_WAIT.total_seconds()))
        mesh._thread = threading.Thread(target=mesh._inbox, args=(inbox_store,), name=f"pipeline-inbox-{rank}",
                                         daemon=True)
        mesh._thread.start()
        return mesh

    def _open_edges(self) -> None:
        # Every rank walks the edges in the same order, so each blocking pair of calls meets its partner and
        # NCCL communicators are created without two ranks waiting on each other in different orders.
        for (src, dst), group in self._groups.items():
            probe = torch.ones(1, device=self.device)
            if self.rank == src:
                dist.send(probe, dst, group=group)
            elif self.rank == dst:
                dist.recv(probe, src, group=group)
        if self._nccl:
            torch.cuda.synchronize(self.device)

    # ----- sending ------------------------------------------------------------------------------------
    def send(self, dst: int, msg: Message) -> None:
        """Send ``msg`` to rank ``dst`` (non-blocking for NCCL; gloo waits until the receiver took the data)."""
        msg.src = self.rank
        if dst == self.rank:
            self._queue.put((json.loads(msg.header()), msg.tensors, []))
            return
        group = self._groups.get((self.rank, dst))
        if msg.tensors and group is None:
            raise ValueError(f"rank {self.rank} has no data edge to rank {dst} for a {msg.kind} message")
        try:
            works = [(dist.isend(t, dst, group=group), t) for t in (x.contiguous() for x in msg.tensors)]
            self._store.set(f"{dst}/{self._store.add(f'{dst}/n', 1)}", msg.header())
            if self._nccl:
                self._pending = [p for p in self._pending if not p[0].is_completed()]
                self._pending.extend((w, t) for w, t in works)
            else:
                for w, _ in works:
                    w.wait()
        except RuntimeError as exc:
            raise MeshError(dst, f"sending {msg.kind} from rank {self.rank} to rank {dst} failed: {exc}") from exc

    # ----- receiving ----------------------------------------------------------------------------------
    def get(self, timeout: float | None) -> Message | None:
        """The next message for this rank, with its tensors received; None if none came within ``timeout``."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise MeshError(-1, f"rank {self.rank}'s inbox failed: {item}") from item
        head, tensors, works = item
        try:
            for w in works:
                w.wait()
        except RuntimeError as exc:
            raise MeshError(head["src"], f"receiving {head['kind']} from rank {head['src']} failed: {exc}") from exc
        if self._nccl:
            for t in tensors:  # allocated on the receive stream, used from now on by this thread's stream
                t.record_stream(torch.cuda.current_stream(self.device))
        return Message(head["kind"], head["src"], head["session"], head["block"], head["step"], tensors, head["info"])

    def _inbox(self, store: Any) -> None:
        """Thread: read our numbered headers in order and post the receives of their tensors at once.

        With NCCL the receives go on a stream of their own: NCCL orders an operation after the work already
        queued on the caller's current stream, so a receive posted on the compute stream would not start until
        this rank's queued DiT steps finished — holding the sender's next send behind it."""
        recv_stream = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if self._nccl:
                recv_stream = torch.cuda.Stream(self.device)
        seq = 0
        try:
            while True:
                seq += 1
                key = f"{self.rank}/{seq}"
                while True:
                    try:
                        store.wait([key], STORE_WAIT)
                        break
                    except dist.DistStoreError:  # only a timeout: nothing was sent for an hour
                        continue
                head = json.loads(store.get(key))
                store.delete_key(key)
                if head["kind"] == STOP:
                    return
                tensors, works = [], []
                with torch.cuda.stream(recv_stream) if recv_stream is not None else contextlib.nullcontext():
                    for dtype, shape in head["tensors"]:
                        t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                        works.append(dist.irecv(t, head["src"], group=self._groups[(head["src"], self.rank)]))
                        tensors.append(t)
                self._queue.put((head, tensors, works))
        except BaseException as exc:  # noqa: BLE001 - handed to the main loop, which raises MeshError
            self._queue.put(exc)

    # ----- shutdown -----------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop the inbox thread and leave the process group (idempotent; safe after a peer died)."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._store.set(f"{self.rank}/{self._store.add(f'{self.rank}/n', 1)}", Message(STOP).header())
            except RuntimeError:
                pass  # the store is gone (its host died): the thread has failed already
            self._thread.join(timeout)
        self._thread = None
        self._pending.clear()
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
        self._joined = False
        self._groups.clear()
        self._store = None
