"""FP8 (e4m3) self-attention for Hopper through cuDNN's fused FP8 flash attention (``nvidia-cudnn-frontend``).

Layout: every tensor here is laid out as the DiT stores it, ``[B, S, H, D]`` (tokens, then heads: the output of
``WanAttention.project_q`` / ``project_kv`` and the KV ring slices); attention runs over the ``[B, H, S, D]`` view
of that memory, as :class:`model.attention.LseAttention` does. Log-sum-exps are ``[B, H, Sq]`` float32 in the
natural log of the scaled scores, so :func:`model.attention.merge_attention` merges FP8 attentions over disjoint
key sets too (transpose the outputs to ``[B, H, Sq, D]`` first).

Scales: :func:`quantize_heads` gives one float32 scale per (batch, head), ``x ≈ x_fp8 · descale``, so one head
with large values does not push the others towards e4m3's subnormals. On the GPU, :class:`CudnnFP8Attention`
builds the cuDNN ``sdpa_fp8`` graph once per (shapes, strides, dtypes, device, scale, log-sum-exp) and caches it
on the instance. What cuDNN takes there (frontend 1.x, sm90):

* FP8 output only. A HALF/BFLOAT16 ``O`` of ``sdpa_fp8`` is a Blackwell feature (cuDNN >= 9.13, sm100+), so on
  Hopper the kernel writes e4m3 ``O`` scaled by ``scale_o``; :meth:`CudnnFP8Attention.forward_fp8` returns that
  with its per-head descale and ``__call__`` dequantises it to bf16 (one elementwise pass).
* Descales are declared as tensors; the per-tensor form is ``[1, 1, 1, 1]``. Per-head Q/K descales are declared
  as ``[B, H, 1, 1]`` and checked once per device on random data against :func:`sdpa_fp8_reference`; if the
  backend refuses them or computes something else, Q·K per-head factors are folded into Q (exact maths, one
  extra rounding of Q, and heads whose Q·K scale is far below the largest lose resolution; cuDNN 9.19 on an H200
  refuses them — no plan builds — so there :func:`quantize_qkv` folds K's scales into Q before Q is quantised
  once). V's per-head scale never goes to cuDNN: ``descale_v = 1`` and the per-head factor is applied when the
  output is dequantised.
* The softmax probabilities P are quantised inside the kernel with ``scale_s`` (:data:`S_SCALE`); P ≤ 1
  because the kernel subtracts the running row maximum.

:func:`sdpa_fp8_reference` (dequantise, attention in float32) runs anywhere and is the CPU fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_MIN_AMAX = 1e-12
# P = exp(s - rowmax) lies in (0, 1]; 256 maps 1 to a power of two with headroom below 448 and keeps P down to
# 2^-14 in e4m3's normal range.
S_SCALE = 256.0
# O is a convex combination of V rows, so |O · scale_o| <= 448 · O_SCALE when descale_v = 1: headroom for P's
# rounding (row sums of the quantised P can exceed 1 slightly).
O_SCALE = 0.5
# Elements of one float32 score chunk in the reference (1 GiB).
_REF_CHUNK = 1 << 28


# ----- quantisation --------------------------------------------------------------------------------------
def _descale_view(descale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``[B, H]`` or one-element descale as a tensor broadcasting against ``[B, S, H, D]`` ``x``."""
    if descale.numel() == 1:
        return descale.reshape(1, 1, 1, 1).float()
    b, _, h, _ = x.shape
    return descale.reshape(b, 1, h, 1).float()


def quantize_heads(x: torch.Tensor, per_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, S, H, D]`` → (e4m3 values ``[B, S, H, D]``, float32 descale) with ``x ≈ x_fp8 · descale``.

    The descale maps each (batch, head)'s largest magnitude onto 448 and is ``[B, H]``; with ``per_head=False``
    one scale covers the whole tensor and the descale is ``[1, 1]``."""
    if x.dim() != 4:
        raise ValueError(f"expected [B, S, H, D], got shape {tuple(x.shape)}")
    # one reduction pass without a |x| temporary; the division promotes to float32
    amax = torch.linalg.vector_norm(x, math.inf, dim=(1, 3) if per_head else None).float().reshape(-1, 1)
    descale = (amax.clamp(min=_MIN_AMAX) / E4M3_MAX).reshape((x.shape[0], x.shape[2]) if per_head else (1, 1))
    return (x / _descale_view(descale, x)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), descale


def dequantize_heads(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_heads` (up to its rounding): ``x8 [B, S, H, D]`` times its ``[B, H]`` or
    one-element descale, in ``dtype``."""
    return (x8.float() * _descale_view(descale, x8)).to(dtype)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_head_qk: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``[B, S, H, D]`` Q, K, V for FP8 attention → ``(q8, k8, v8, q_descale, k_descale, v_descale)``.

    K and V always get per-head scales. With ``per_head_qk`` Q does too; without it (a backend that takes only
    one Q and one K descale) K's per-head scale is folded into Q before Q is quantised with one scale — scores
    stay exact in real arithmetic, K's descale becomes 1 and Q's is one element."""
    k8, k_descale = quantize_heads(k)
    v8, v_descale = quantize_heads(v)
    q8, q_descale, k_descale = quantize_query(q, k_descale, per_head_qk)
    return q8, k8, v8, q_descale, k_descale, v_descale


def quantize_query(q: torch.Tensor, k_descale: torch.Tensor, per_head_qk: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``[B, S, H, D]`` queries against keys already in e4m3 with ``[B, H]`` (or one-element) descales →
    ``(q8, q_descale, k_descale)``: per head with ``per_head_qk`` (K's descale unchanged), else with K's per-head
    descale folded into Q before one per-tensor quantisation (K's descale becomes 1), as :func:`quantize_qkv`."""
    if per_head_qk:
        q8, q_descale = quantize_heads(q)
        return q8, q_descale, k_descale
    q8, q_descale = quantize_heads(q.float() * _descale_view(k_descale, q), per_head=False)
    return q8, q_descale, torch.ones(1, 1, device=q.device, dtype=torch.float32)


def smooth_keys(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract K's mean over tokens per (batch, head, channel) → (smoothed K ``[B, Skv, H, D]`` float32,
    log-sum-exp shift ``[B, H, Sq]``). Softmax is unchanged (each query's scores move by one constant,
    ``scale · q·mean``), but channels with a large common offset — outlier channels of normed keys — no longer
    set K's quantisation scale. Add the shift to the log-sum-exp of attention over the smoothed keys."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mean = k.float().mean(dim=1, keepdim=True)  # [B, 1, H, D]
    shift = torch.einsum("bqhd,bhd->bhq", q.float(), mean[:, 0]) * scale
    return k.float() - mean, shift


# ----- reference -----------------------------------------------------------------------------------------
def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in float32 of ``[B, S, H, D]`` inputs → (output ``[B, Sq, H, D]`` float32,
    log-sum-exp ``[B, H, Sq]`` float32). Query rows are processed in chunks so the scores stay under 1 GiB."""
    b, sq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views
    rows = max(1, _REF_CHUNK // max(1, b * h * k.shape[1]))
    outs, lses = [], []
    for start in range(0, sq, rows):
        s = torch.matmul(qt[:, :, start:start + rows], kt.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vt))
        lses.append(lse)
        del s
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2)


def sdpa_fp8_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                       k_descale: torch.Tensor, v_descale: torch.Tensor, scale: float | None = None,
                       return_lse: bool = False, out_dtype: torch.dtype = torch.bfloat16
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention by definition: dequantise ``[B, S, H, D]`` e4m3 Q/K/V with their ``[B, H]`` (or
    one-element) descales and attend in float32. Output ``[B, Sq, H, D]`` in ``out_dtype`` (and the
    log-sum-exp ``[B, H, Sq]`` float32 with ``return_lse``). Runs on any device; no rounding of P or O."""
    out, lse = attention_fp32(dequantize_heads(q8, q_descale), dequantize_heads(k8, k_descale),
                              dequantize_heads(v8, v_descale), scale)
    out = out.to(out_dtype)
    return (out, lse) if return_lse else out


# ----- cuDNN ---------------------------------------------------------------------------------------------
def import_cudnn() -> Any:
    """The ``cudnn`` module of ``nvidia-cudnn-frontend`` (imported on first use, so machines without the package
    can still import this module)."""
    try:
        import cudnn
    except ImportError as exc:
        raise ImportError("FP8 attention on CUDA needs NVIDIA's cuDNN frontend: pip install nvidia-cudnn-frontend "
                          f"(Python module 'cudnn'), with the cuDNN 9 library torch uses ({exc})") from exc
    return cudnn


def check_fp8_attention(device: torch.device) -> None:
    """Raise, saying what to change, when FP8 attention cannot run on ``device``: on CUDA it needs cuDNN's FP8 flash
    attention, i.e. a Hopper (sm90) or newer GPU and ``nvidia-cudnn-frontend``; other devices run
    :func:`sdpa_fp8_reference` and always can."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        raise RuntimeError(f"attention: fp8 needs cuDNN's FP8 flash attention, i.e. a Hopper (sm90) or newer GPU; "
                           f"{torch.cuda.get_device_name(device)} is sm{major}{minor}. Use attention: auto "
                           "(kv_cache_dtype: fp8 alone still halves the KV memory)")
    import_cudnn()


@dataclass
class _Plan:
    """One built ``sdpa_fp8`` graph with its operands' graph tensors, workspace and constant scale tensors."""

    graph: Any
    tensors: dict[str, Any]
    workspace: torch.Tensor
    constants: dict[str, torch.Tensor]
    amax: dict[str, torch.Tensor]


def _bhsd(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Dims and strides of the ``[B, H, S, D]`` view of a ``[B, S, H, D]`` tensor."""
    b, s, h, d = x.shape
    sb, ss, sh, sd = x.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


class CudnnFP8Attention:
    """cuDNN FP8 flash attention of ``[B, S, H, D]`` e4m3 Q/K/V on the current CUDA stream.

    ``attn(q8, k8, v8, q_descale, k_descale, v_descale)`` → bf16 output ``[B, Sq, H, D]`` (and the
    log-sum-exp ``[B, H, Sq]`` with ``return_lse=True``); :meth:`forward_fp8` returns the kernel's e4m3 output
    with its ``[B, H]`` descale instead; :meth:`attend` quantises bf16 Q/K/V first. Descales are ``[B, H]``
    (per head) or one element (per tensor).

    ``per_head_qk``: ``None`` checks once per device whether cuDNN honours per-head Q/K descales (see the module
    docstring); ``True``/``False`` forces the choice. Graphs, workspaces, handles and that check are cached on the
    instance; the amax side outputs are per-graph buffers, so one instance should not run the same graph on two
    streams at once. The check and each graph's build synchronise the device: make one eager call per shape (or
    call :meth:`per_head_qk`) before capturing a CUDA graph.
    """

    def __init__(self, per_head_qk: bool | None = None) -> None:
        self._force_per_head = per_head_qk
        self._plans: dict[tuple, _Plan] = {}
        self._handles: dict[int, Any] = {}
        self._per_head: dict[int, bool] = {}
        self.probe_notes: dict[int, str] = {}  # device index -> why per-head Q/K descales were (not) used
        self._cudnn: Any = None

    # ----- public ---------------------------------------------------------------------------------------
    def per_head_qk(self, device: torch.device) -> bool:
        """Whether Q/K descales go to cuDNN per head on ``device`` (probed once per device unless forced)."""
        if self._force_per_head is not None:
            return self._force_per_head
        index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
        if index not in self._per_head:
            self._per_head[index] = self._probe_per_head(torch.device("cuda", index))
        return self._per_head[index]

    def quantize(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`quantize_qkv` in the scale layout this instance's cuDNN graphs take on ``q``'s device."""
        return quantize_qkv(q, k, v, per_head_qk=self.per_head_qk(q.device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
               return_lse: bool = False, out_dtype: torch.dtype = torch.bfloat16, smooth_k: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Quantise ``[B, S, H, D]`` Q/K/V (:meth:`quantize`) and attend (:meth:`__call__`); with ``smooth_k``
        K's token mean is removed first (:func:`smooth_keys`) and the log-sum-exp corrected back."""
        shift = None
        if smooth_k:
            k, shift = smooth_keys(q, k, scale)
        result = self(*self.quantize(q, k, v), scale=scale, return_lse=return_lse, out_dtype=out_dtype)
        if not return_lse or shift is None:
            return result
        out, lse = result
        return out, lse + shift

    def __call__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                 k_descale: torch.Tensor, v_descale: torch.Tensor, scale: float | None = None,
                 return_lse: bool = False, out_dtype: torch.dtype = torch.bfloat16
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FP8 attention → output ``[B, Sq, H, D]`` in ``out_dtype`` (dequantised from the kernel's e4m3 output),
        plus the log-sum-exp ``[B, H, Sq]`` float32 with ``return_lse``."""
        o8, o_descale, lse = self.forward_fp8(q8, k8, v8, q_descale, k_descale, v_descale, scale, return_lse)
        out = (o8.float().mul_(_descale_view(o_descale, o8))).to(out_dtype)
        return (out, lse) if return_lse else out

    def forward_fp8(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                    k_descale: torch.Tensor, v_descale: torch.Tensor, scale: float | None = None,
                    return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """FP8 attention as the kernel writes it → (e4m3 output ``[B, Sq, H, D]``, its float32 descale
        ``[B, H]`` (``out ≈ o8 · descale``), log-sum-exp ``[B, H, Sq]`` float32 or ``None``)."""
        self._check(q8, k8, v8)
        b, sq, h, d = q8.shape
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        per_head = q_descale.numel() > 1 or k_descale.numel() > 1
        if per_head and not self.per_head_qk(q8.device):
            q8, q_descale, k_descale = _fold_qk_scales(q8, q_descale, k_descale)
            per_head = False
        if per_head:
            q_descale, k_descale = (t.float().expand(b, h) if t.numel() == 1 else t.float().reshape(b, h)
                                    for t in (q_descale, k_descale))
            q_descale, k_descale = q_descale.contiguous(), k_descale.contiguous()
        else:
            q_descale, k_descale = (t.float().reshape(1) for t in (q_descale, k_descale))
        o8 = torch.empty(b, sq, h, d, device=q8.device, dtype=E4M3)
        lse = torch.empty(b, h, sq, 1, device=q8.device, dtype=torch.float32) if return_lse else None
        self._run(q8, k8, v8, q_descale, k_descale, o8, lse, scale, per_head)
        v_descale = v_descale.float()
        o_descale = (v_descale.expand(b, h) if v_descale.numel() == 1 else v_descale.reshape(b, h)) / O_SCALE
        return o8, o_descale, (lse.squeeze(-1) if lse is not None else None)

    # ----- internals ------------------------------------------------------------------------------------
    @staticmethod
    def _check(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> None:
        for name, t in (("q", q8), ("k", k8), ("v", v8)):
            if t.dim() != 4 or t.dtype != E4M3 or not t.is_cuda or t.stride(-1) != 1:
                raise ValueError(f"{name} must be a CUDA float8_e4m3fn [B, S, H, D] tensor with unit last stride, "
                                 f"got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")
        if k8.shape != v8.shape or q8.shape[0] != k8.shape[0] or q8.shape[2:] != k8.shape[2:]:
            raise ValueError(f"shape mismatch: q {tuple(q8.shape)}, k {tuple(k8.shape)}, v {tuple(v8.shape)}")

    def _module(self) -> Any:
        if self._cudnn is None:
            self._cudnn = import_cudnn()
        return self._cudnn

    def _handle(self, device: torch.device) -> Any:
        cudnn = self._module()
        if device.index not in self._handles:
            with torch.cuda.device(device):
                self._handles[device.index] = cudnn.create_handle()
        handle = self._handles[device.index]
        cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
        return handle

    def _run(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
             k_descale: torch.Tensor, o8: torch.Tensor, lse: torch.Tensor | None, scale: float, per_head: bool) -> None:
        device = q8.device
        key = (device.index, tuple(q8.shape), tuple(k8.shape), q8.stride(), k8.stride(), v8.stride(),
               per_head, lse is not None, scale)
        with torch.cuda.device(device):
            handle = self._handle(device)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._build(handle, q8, k8, v8, o8, per_head, lse is not None, scale)
            t = plan.tensors
            pack = {t["q"]: q8, t["k"]: k8, t["v"]: v8, t["descale_q"]: q_descale, t["descale_k"]: k_descale,
                    t["o"]: o8, t["amax_s"]: plan.amax["s"], t["amax_o"]: plan.amax["o"]}
            pack.update({t[name]: value for name, value in plan.constants.items()})
            if lse is not None:
                pack[t["stats"]] = lse
            plan.graph.execute(pack, plan.workspace, handle=handle)

    def _build(self, handle: Any, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor,
               per_head: bool, with_lse: bool, scale: float) -> _Plan:
        """Build, check and plan the ``sdpa_fp8`` graph for these operands (raises the frontend's error if cuDNN
        does not support it)."""
        cudnn = self._module()
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        device = q8.device
        b, sq, h, d = q8.shape
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        tensors: dict[str, Any] = {}
        for name, x in (("q", q8), ("k", k8), ("v", v8)):
            dims, strides = _bhsd(x)
            tensors[name] = graph.tensor(name=name, dim=dims, stride=strides, data_type=fp8)
        qk_dim, qk_stride = ([b, h, 1, 1], [h, 1, 1, 1]) if per_head else ([1, 1, 1, 1], [1, 1, 1, 1])
        for name in ("descale_q", "descale_k"):
            tensors[name] = graph.tensor(name=name, dim=qk_dim, stride=qk_stride, data_type=f32)
        constants = {"descale_v": 1.0, "descale_s": 1.0 / S_SCALE, "scale_s": S_SCALE, "scale_o": O_SCALE}
        for name in constants:
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        o, stats, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"],
            descale_q=tensors["descale_q"], descale_k=tensors["descale_k"], descale_v=tensors["descale_v"],
            descale_s=tensors["descale_s"], scale_s=tensors["scale_s"], scale_o=tensors["scale_o"],
            generate_stats=with_lse, attn_scale=scale, use_causal_mask=False, name="sdpa_fp8")
        dims, strides = _bhsd(o8)
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(fp8)
        tensors["o"] = o
        if with_lse:
            stats.set_output(True).set_dim([b, h, sq, 1]).set_stride([h * sq, sq, 1, 1]).set_data_type(f32)
            tensors["stats"] = stats
        for name, t in (("amax_s", amax_s), ("amax_o", amax_o)):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            tensors[name] = t
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(1, graph.get_workspace_size()), device=device, dtype=torch.uint8)
        return _Plan(graph, tensors, workspace,
                     {n: torch.full((1,), v, device=device, dtype=torch.float32) for n, v in constants.items()},
                     {n: torch.zeros(1, device=device, dtype=torch.float32) for n in ("s", "o")})

    def _probe_per_head(self, device: torch.device) -> bool:
        """Run a small graph with per-head Q/K descales (per-head Q·K magnitudes 0.15x to 60x) against the
        reference: a backend reading only the first descale would get the other heads' softmax temperature wrong."""
        gen = torch.Generator(device=device).manual_seed(0)
        q_mag = torch.tensor([1.0, 30.0, 0.3, 4.0], device=device)
        k_mag = torch.tensor([1.0, 2.0, 0.5, 0.1], device=device)
        q, k, v = (torch.randn(1, n, 4, 128, device=device, generator=gen) * m.reshape(1, 1, 4, 1)
                   for n, m in ((192, q_mag), (320, k_mag), (320, q_mag)))
        q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, per_head_qk=True)
        ref = sdpa_fp8_reference(q8, k8, v8, qd, kd, vd, out_dtype=torch.float32)
        saved = self._force_per_head
        self._force_per_head = True
        try:
            got = self(q8, k8, v8, qd, kd, vd, out_dtype=torch.float32)
            err = float((got - ref).norm() / ref.norm())
        except Exception as exc:  # noqa: BLE001 -- any refusal means "not supported here"
            self.probe_notes[device.index] = f"per-head Q/K descales refused: {type(exc).__name__}: {exc}"[:300]
            return False
        finally:
            self._force_per_head = saved
        ok = err < 0.1
        self.probe_notes[device.index] = (f"per-head Q/K descales {'honoured' if ok else 'NOT honoured'} "
                                          f"(relative error {err:.3g} vs reference)")
        return ok


def _fold_qk_scales(q8: torch.Tensor, q_descale: torch.Tensor, k_descale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head Q/K descales → one Q descale and a unit K descale, by re-quantising Q with each head's share of
    the largest ``q_descale · k_descale`` (≤ 1, so nothing overflows)."""
    b, _, h, _ = q8.shape
    prod = (q_descale.float() * k_descale.float()).expand(b, h)
    top = prod.amax().reshape(1)
    q8 = (q8.float() * (prod / top).reshape(b, 1, h, 1)).to(E4M3)
    return q8, top, torch.ones(1, device=q8.device, dtype=torch.float32)
