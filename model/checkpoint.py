"""The one place that knows the official checkpoint layout: load Wan2.2-S2V-14B (+ the Live Avatar LoRA) strictly.

``DIR`` is the ``Wan2.2-S2V-14B`` folder as downloaded from the model card::

    config.json                                         DiT architecture (diffusers-style, class WanModel_S2V)
    diffusion_pytorch_model.safetensors.index.json      weight_map: official key → shard file
    diffusion_pytorch_model-0000{1..N}-of-0000N.safetensors
    Wan2.1_VAE.pth                                      Wan's VAE key names (converted to AutoencoderKLWan)
    models_t5_umt5-xxl-enc-bf16.pth                     Wan's umT5 key names (converted to UMT5EncoderModel)
    google/umt5-xxl/                                    tokenizer (tokenizer.json or spiece.model + config)
    wav2vec2-large-xlsr-53-english/                     transformers Wav2Vec2ForCTC folder

and the LoRA is Live Avatar's ``liveavatar.safetensors`` (PEFT naming, merged into the DiT while it loads).
Every file is checked strictly: missing, unexpected or mis-shaped tensors raise :class:`CheckpointError` naming the
file. The DiT is built on the meta device and filled shard by shard straight on the target device and dtype, so
host RAM never holds two copies of it.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers import AutoencoderKLWan
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, UMT5EncoderModel, Wav2Vec2Model

from model.config import DiTConfig, ModelConfig
from model.dit import CausalS2VDiT
from model.lora import LoraFile
from model.umt5 import UMT5TextEncoder
from model.vae import build_vae
from model.wan_t5_keys import umt5_config_from_shapes, wan_t5_to_hf
from model.wan_vae_keys import wan_vae_to_diffusers

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
LORA_FILE = "liveavatar.safetensors"

WAN_S2V_CLASS = "WanModel_S2V"

LAYOUT_HELP = f"""\
Expected the official layout:
  DIR/{CONFIG_FILE}
  DIR/{INDEX_FILE}
  DIR/diffusion_pytorch_model-0000{{1..N}}-of-0000N.safetensors   (the shards named in the index)
  DIR/{VAE_FILE}
  DIR/{T5_FILE}
  DIR/{TOKENIZER_DIR}/   (tokenizer_config.json + tokenizer.json or spiece.model)
  DIR/{WAV2VEC2_DIR}/   (config.json + model.safetensors or pytorch_model.bin)
  --lora: {LORA_FILE}
DIR is the Hugging Face model card Wan-AI/Wan2.2-S2V-14B (also on ModelScope), e.g.
`huggingface-cli download Wan-AI/Wan2.2-S2V-14B --local-dir DIR`; the LoRA is {LORA_FILE} from the model card
Quark-Vision/Live-Avatar (`huggingface-cli download Quark-Vision/Live-Avatar`)."""

# config.json flags whose value decides the architecture; only these values are implemented by CausalS2VDiT.
_REQUIRED_FLAGS: dict[str, Any] = {
    "model_type": "s2v",
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "enable_framepack": True,
    "enable_motioner": False,
    "zero_timestep": True,
}
# Fields mapped one-to-one onto DiTConfig.
_DIT_FIELDS = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len", "eps",
               "audio_dim", "num_audio_token", "audio_inject_layers", "motion_frames", "zip_frame_buckets")
# Present in WanModel_S2V's config but irrelevant here: training-only init, the disabled motioner's options,
# and fields the weights themselves determine (text_dim, patch_size: read from tensor shapes instead).
_IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "zero_init",
                   "add_last_motion", "framepack_drop_mode", "enable_tsm", "trainable_token_pos_emb",
                   "trainable_token", "motion_token_num", "cond_dim", "text_dim", "patch_size", "window_size",
                   "qk_norm", "cross_attn_norm"}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or does not match the model; the message names the file and the problem."""


@dataclass
class OfficialModels:
    """Everything :func:`load_official` builds, on the requested device and dtype, in eval mode."""

    dit: CausalS2VDiT
    vae: AutoencoderKLWan
    wav2vec2: Wav2Vec2Model
    text_encoder: UMT5TextEncoder
    dit_config: DiTConfig


# ----- layout ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file not found.\n{LAYOUT_HELP}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_map(checkpoint_dir: Path) -> dict[str, str]:
    """The index's ``weight_map`` (official key → shard file name)."""
    path = checkpoint_dir / INDEX_FILE
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: has no 'weight_map' object mapping tensor names to shard files")
    return weight_map


def _check_layout(checkpoint_dir: Path, lora: Path | None) -> None:
    """One error listing every missing file or folder of the official layout."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: checkpoint folder not found.\n{LAYOUT_HELP}")
    missing = [name for name in (CONFIG_FILE, INDEX_FILE, VAE_FILE, T5_FILE) if not (checkpoint_dir / name).is_file()]
    tokenizer = checkpoint_dir / TOKENIZER_DIR
    if not (tokenizer / "tokenizer_config.json").is_file() or not any(
            (tokenizer / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        missing.append(f"{TOKENIZER_DIR}/ (tokenizer_config.json + tokenizer.json or spiece.model)")
    wav2vec2 = checkpoint_dir / WAV2VEC2_DIR
    if not (wav2vec2 / "config.json").is_file() or not any(
            (wav2vec2 / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append(f"{WAV2VEC2_DIR}/ (config.json + model.safetensors or pytorch_model.bin)")
    if INDEX_FILE not in missing:
        missing += sorted({s for s in _weight_map(checkpoint_dir).values() if not (checkpoint_dir / s).is_file()})
    if lora is not None and not lora.is_file():
        missing.append(f"{lora} (--lora)")
    if missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise CheckpointError(f"{checkpoint_dir}: the official checkpoint is incomplete; missing:\n{lines}\n"
                              f"{LAYOUT_HELP}")


def _check_names(expected: Iterable[str], found: Iterable[str], path: Path, hint: str) -> None:
    """``CheckpointError`` listing missing and unexpected tensor names (first few of each, with counts)."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensor names do not match the model ({hint}).\n"
            f"  missing ({len(missing)}): {missing[:8]}\n  unexpected ({len(unexpected)}): {unexpected[:8]}")


def _check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path,
                  hint: str) -> None:
    bad = [f"{k}: file {list(found[k])} vs model {list(expected[k])}" for k in sorted(found)
           if tuple(found[k]) != tuple(expected[k])]
    if bad:
        lines = "\n  ".join(bad[:8])
        raise CheckpointError(f"{path}: {len(bad)} tensor shape(s) do not match the model ({hint}):\n  {lines}")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict, memory-mapped when the file allows it (so it is read, not copied, into RAM)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return state


def _fill(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, hint: str, device: torch.device,
          dtype: torch.dtype, skip: Iterable[str] = ()) -> None:
    """Strictly load ``tensors`` into an empty (meta) ``module``, each straight to ``device`` / ``dtype``."""
    expected = {k: s for k, s in _shapes(module).items() if k not in set(skip)}
    _check_names(expected, tensors, path, hint)
    _check_shapes(expected, {k: tuple(v.shape) for k, v in tensors.items()}, path, hint)
    for key, value in tensors.items():
        set_module_tensor_to_device(module, key, device, value=value, dtype=dtype)


# ----- DiT ---------------------------------------------------------------------------------------------


def _open_safetensors(path: Path) -> safe_open:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from exc


def _shard_shapes(checkpoint_dir: Path, weight_map: Mapping[str, str],
                  keys: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of ``keys`` (default: all) read from the shard headers; checks each key is in its shard."""
    wanted = set(weight_map) if keys is None else set(keys)
    by_shard: dict[str, list[str]] = {}
    for key in sorted(wanted):
        by_shard.setdefault(weight_map[key], []).append(key)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard, names in by_shard.items():
        path = checkpoint_dir / shard
        with _open_safetensors(path) as f:
            present = set(f.keys())
            absent = [k for k in names if k not in present]
            if absent:
                raise CheckpointError(f"{path}: {len(absent)} tensor(s) that {INDEX_FILE} places in this shard are "
                                      f"absent, e.g. {absent[:8]}")
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in names})
    return shapes


def read_dit_config(checkpoint_dir: Path, base: DiTConfig | None = None) -> DiTConfig:
    """The DiT architecture of an official folder: ``config.json`` (Wan's ``WanModel_S2V`` keys) plus the widths
    only the weights record (``text_dim``, ``patch_size``, ``num_audio_layers``, read from shard headers).

    Streaming fields that no checkpoint stores (``frames_per_block``, ``kv_cache_frames``, RoPE settings, …) come
    from ``base`` (default: the official values). ``CheckpointError`` names config.json when it describes an
    architecture other than Wan2.2-S2V (motioner instead of FramePack, no AdaLN audio injection, …).
    """
    path = checkpoint_dir / CONFIG_FILE
    raw = _read_json(path)
    class_name = raw.get("_class_name", WAN_S2V_CLASS)
    if class_name != WAN_S2V_CLASS:
        raise CheckpointError(f"{path}: _class_name is {class_name!r}; only {WAN_S2V_CLASS!r} (Wan2.2-S2V) "
                              "is supported")
    wrong = {k: raw[k] for k, v in _REQUIRED_FLAGS.items() if k in raw and raw[k] != v}
    if "cond_dim" in raw and raw["cond_dim"] != raw.get("in_dim", DiTConfig().in_dim):
        wrong["cond_dim"] = raw["cond_dim"]
    if wrong:
        raise CheckpointError(f"{path}: unsupported architecture {wrong}; this DiT implements Wan2.2-S2V with "
                              f"{_REQUIRED_FLAGS} and cond_dim == in_dim")
    unknown = sorted(set(raw) - set(_REQUIRED_FLAGS) - set(_DIT_FIELDS) - _IGNORED_FIELDS)
    if unknown:
        log.warning("%s: ignoring unrecognised config fields %s", path, unknown)
    fields: dict[str, Any] = {k: raw[k] for k in _DIT_FIELDS if k in raw}
    weight_map = _weight_map(checkpoint_dir)
    probes = ("text_embedding.0.weight", "patch_embedding.weight", "casual_audio_encoder.weights")
    absent = [k for k in probes if k not in weight_map]
    if absent:
        raise CheckpointError(f"{checkpoint_dir / INDEX_FILE}: lacks {absent}; not a Wan2.2-S2V DiT index")
    shapes = _shard_shapes(checkpoint_dir, weight_map, probes)
    fields["text_dim"] = shapes["text_embedding.0.weight"][1]
    fields["patch_size"] = shapes["patch_embedding.weight"][2:]
    fields["num_audio_layers"] = shapes["casual_audio_encoder.weights"][1]
    try:
        return (base or DiTConfig()).model_copy(update=DiTConfig(**fields).model_dump(include=set(fields)))
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid DiT config ({exc})") from exc


def _empty_dit(checkpoint_dir: Path, weight_map: Mapping[str, str], config: DiTConfig,
               lora: LoraFile | None) -> CausalS2VDiT:
    """The DiT on the meta device, after checking the index, every shard header and the LoRA against it."""
    with init_empty_weights():
        dit = CausalS2VDiT(config)
    expected = _shapes(dit)
    hint = f"check {CONFIG_FILE} against the shards"
    _check_names(expected, weight_map, checkpoint_dir / INDEX_FILE, hint)
    found = _shard_shapes(checkpoint_dir, weight_map)
    for shard in sorted(set(weight_map.values())):
        _check_shapes(expected, {k: s for k, s in found.items() if weight_map[k] == shard},
                      checkpoint_dir / shard, hint)
    if lora is not None:
        try:
            lora.check_targets(expected)
        except ValueError as exc:
            raise CheckpointError(f"{lora.path}: {exc}") from exc
    return dit


def _fill_dit(dit: CausalS2VDiT, checkpoint_dir: Path, weight_map: Mapping[str, str], lora: LoraFile | None,
              device: torch.device, dtype: torch.dtype, progress: bool) -> CausalS2VDiT:
    """Read the shards one by one into the checked empty DiT, merging LoRA targets on the way."""
    for shard in tqdm(sorted(set(weight_map.values())), desc="DiT shards", unit="shard", disable=not progress):
        with _open_safetensors(checkpoint_dir / shard) as f:
            for key in (k for k, s in weight_map.items() if s == shard):
                value = f.get_tensor(key)
                if lora is not None and key in lora.pairs:
                    value = lora.merge(key, value, device)
                set_module_tensor_to_device(dit, key, device, value=value, dtype=dtype)
    return dit.requires_grad_(False).eval()


# ----- VAE, text, audio --------------------------------------------------------------------------------


def _load_vae(checkpoint_dir: Path, model_cfg: ModelConfig, device: torch.device,
              dtype: torch.dtype) -> AutoencoderKLWan:
    path = checkpoint_dir / VAE_FILE
    try:
        state = wan_vae_to_diffusers(_torch_load(path), model_cfg.vae)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    with init_empty_weights():
        vae = build_vae(model_cfg.vae)
    _fill(vae, state, path, "Wan2.1 VAE; check model.vae in the profile", device, dtype)
    return vae.requires_grad_(False).eval()


def _load_text_encoder(checkpoint_dir: Path, model_cfg: ModelConfig, text_len: int, device: torch.device,
                       dtype: torch.dtype) -> UMT5TextEncoder:
    path = checkpoint_dir / T5_FILE
    state = _torch_load(path)
    try:
        config = umt5_config_from_shapes({k: tuple(v.shape) for k, v in state.items()})
        tensors = wan_t5_to_hf(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    _fill(model, tensors, path, "Wan umT5 encoder", device, dtype, skip=["encoder.embed_tokens.weight"])
    model.encoder.embed_tokens.weight = model.shared.weight
    tokenizer_dir = checkpoint_dir / TOKENIZER_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{tokenizer_dir}: cannot load the umT5 tokenizer ({exc})") from exc
    try:
        return UMT5TextEncoder(model, tokenizer, text_len, model_cfg.text.max_tokens)
    except ValueError as exc:
        raise CheckpointError(f"model.text.max_tokens does not fit the DiT's text_len: {exc}") from exc


@contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Silence transformers' load report (we check loading info ourselves) and, unless ``progress``, its bars."""
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def _load_wav2vec2(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
                   progress: bool) -> Wav2Vec2Model:
    folder = checkpoint_dir / WAV2VEC2_DIR
    try:
        # The folder holds Wav2Vec2ForCTC: the base model's "wav2vec2." prefix is stripped and lm_head left over.
        with _quiet_transformers(progress):
            model, info = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                        output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load wav2vec2 ({exc})") from exc
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head."))
    problems = {"missing": sorted(info["missing_keys"]), "unexpected": unexpected,
                "mismatched": sorted(str(m) for m in info["mismatched_keys"])}
    if any(problems.values()):
        raise CheckpointError(f"{folder}: weights do not match its config.json: "
                              + "; ".join(f"{k} ({len(v)}): {v[:8]}" for k, v in problems.items() if v))
    return model.to(device).requires_grad_(False).eval()


# ----- public entry point ------------------------------------------------------------------------------


def _open_lora(path: Path) -> LoraFile:
    try:
        return LoraFile(path)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a safetensors LoRA ({exc})") from exc


def load_official(checkpoint_dir: Path, lora: Path | None, model_cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype, progress: bool = True) -> OfficialModels:
    """Load the official Wan2.2-S2V-14B folder (and Live Avatar's LoRA, merged into the DiT) strictly.

    The DiT architecture comes from the checkpoint (:func:`read_dit_config` with ``model_cfg.dit`` supplying the
    streaming fields); the VAE architecture from ``model_cfg.vae``. All models land on ``device`` in ``dtype``.
    Layout, DiT index, shard headers and LoRA targets are checked before any weight is read; the VAE, wav2vec2
    and umT5 load (and are checked) next, the DiT shards last.
    """
    checkpoint_dir = Path(checkpoint_dir)
    lora = Path(lora) if lora is not None else None
    _check_layout(checkpoint_dir, lora)
    dit_config = read_dit_config(checkpoint_dir, base=model_cfg.dit)
    weight_map = _weight_map(checkpoint_dir)
    lora_file = _open_lora(lora) if lora is not None else None
    dit = _empty_dit(checkpoint_dir, weight_map, dit_config, lora_file)
    vae = _load_vae(checkpoint_dir, model_cfg, device, dtype)
    wav2vec2 = _load_wav2vec2(checkpoint_dir, device, dtype, progress)
    text_encoder = _load_text_encoder(checkpoint_dir, model_cfg, dit_config.text_len, device, dtype)
    dit = _fill_dit(dit, checkpoint_dir, weight_map, lora_file, device, dtype, progress)
    return OfficialModels(dit=dit, vae=vae, wav2vec2=wav2vec2, text_encoder=text_encoder, dit_config=dit_config)
