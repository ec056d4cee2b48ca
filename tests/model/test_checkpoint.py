"""Official-checkpoint loading, proven on a tiny folder in the exact official layout (tests/tiny_checkpoint.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from live.settings import load_settings
from model.checkpoint import (
    CheckpointError,
    OfficialModels,
    load_official,
    read_dit_config,
)
from model.config import DiTConfig, ModelConfig, VAEConfig
from model.lora import LoraFile
from model.vae import build_vae
from model.wan_t5_keys import hf_t5_to_wan, wan_t5_to_hf
from model.wan_vae_keys import diffusers_vae_to_wan, wan_vae_to_diffusers
from tests.tiny_checkpoint import (
    CHECKPOINT_NAME,
    lora_targets,
    official_dit_shapes,
    tiny_lora_path,
    tiny_vae,
    write_lora,
    write_tiny_checkpoint,
)

CPU = torch.device("cpu")
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return load_settings("configs/tiny.yaml").model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, cfg: ModelConfig) -> Path:
    root = tmp_path_factory.mktemp("tiny_official")
    write_tiny_checkpoint(root, cfg)
    return root


@pytest.fixture(scope="module")
def loaded(root: Path, cfg: ModelConfig) -> OfficialModels:
    return load_official(root / CHECKPOINT_NAME, tiny_lora_path(root), cfg, CPU, torch.float32, progress=False)


@pytest.fixture
def copy(tmp_path: Path, root: Path) -> Path:
    """A private copy of the tiny folder that a test may damage."""
    shutil.copytree(root, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _load(root: Path, cfg: ModelConfig, lora: bool = True) -> OfficialModels:
    return load_official(root / CHECKPOINT_NAME, tiny_lora_path(root) if lora else None, cfg, CPU, torch.float32,
                         progress=False)


def _file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    out = {}
    for shard in set(index.values()):
        out.update(load_file(str(ckpt / shard)))
    return out


def _edit_shard(ckpt: Path, key: str, value: torch.Tensor | None, index_too: bool) -> Path:
    """Replace (or with ``None`` drop) ``key`` in the shard that holds it; returns that shard's path."""
    index_path = ckpt / INDEX
    index = json.loads(index_path.read_text())
    shard = ckpt / index["weight_map"].get(key, next(iter(index["weight_map"].values())))
    tensors = load_file(str(shard))
    if value is None:
        tensors.pop(key)
        if index_too:
            index["weight_map"].pop(key)
    else:
        tensors[key] = value
        if index_too:
            index["weight_map"][key] = shard.name
    save_file(tensors, str(shard))
    index_path.write_text(json.dumps(index))
    return shard


# ----- the official key table --------------------------------------------------------------------------


def test_fixture_key_table_has_the_published_14b_counts() -> None:
    shapes = official_dit_shapes(DiTConfig())
    assert len(shapes) == 1260
    assert sum(math.prod(s) for s in shapes.values()) == 16_295_755_609
    assert 2 * len(lora_targets(DiTConfig())) == 896


# ----- the whole folder ----------------------------------------------------------------------------------


def test_tiny_official_folder_loads_strictly(loaded: OfficialModels, root: Path, cfg: ModelConfig) -> None:
    assert loaded.dit_config == cfg.dit
    for module in (loaded.dit, loaded.vae, loaded.wav2vec2, loaded.text_encoder):
        assert all(p.device == CPU and p.dtype == torch.float32 for p in module.parameters())
        assert not module.training
    files = _file_tensors(root / CHECKPOINT_NAME)
    state = loaded.dit.state_dict()
    assert set(state) == set(files)
    targets = {f"{m}.weight" for m in lora_targets(cfg.dit)}
    for key in set(files) - targets:
        assert torch.equal(state[key], files[key]), key


def test_read_dit_config_takes_architecture_from_the_folder_and_streaming_fields_from_base(
        root: Path, cfg: ModelConfig) -> None:
    base = cfg.dit.model_copy(update={"sink_rope_distance": 5, "dim": 999})
    got = read_dit_config(root / CHECKPOINT_NAME, base=base)
    assert got == cfg.dit.model_copy(update={"sink_rope_distance": 5})


def test_lora_merge_is_exact(loaded: OfficialModels, root: Path, cfg: ModelConfig) -> None:
    files = _file_tensors(root / CHECKPOINT_NAME)
    lora = load_file(str(tiny_lora_path(root)))
    state = loaded.dit.state_dict()
    for module in ("blocks.0.self_attn.q", "blocks.3.cross_attn.v", "blocks.2.ffn.0", "blocks.1.ffn.2",
                   "audio_injector.injector.2.o"):
        w, a, b = files[f"{module}.weight"], lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
        reference = (w.double() + 0.5 * b.double() @ a.double()).float()
        torch.testing.assert_close(state[f"{module}.weight"], reference, rtol=0, atol=1e-6)
        assert torch.equal(state[f"{module}.bias"], files[f"{module}.bias"])


def test_without_lora_the_weights_are_the_files(root: Path, cfg: ModelConfig) -> None:
    state = _load(root, cfg, lora=False).dit.state_dict()
    files = _file_tensors(root / CHECKPOINT_NAME)
    assert all(torch.equal(state[k], v) for k, v in files.items())


@pytest.mark.parametrize("prefix", ["", "base_model.model.", "diffusion_model.", "base_model.model.diffusion_model."])
@pytest.mark.parametrize("adapter", ["", ".default"])
def test_lora_key_variants_name_the_same_targets(tmp_path: Path, cfg: ModelConfig, prefix: str,
                                                 adapter: str) -> None:
    path = tmp_path / "lora.safetensors"
    write_lora(path, cfg.dit, prefix=prefix, adapter=adapter)
    lora = LoraFile(path)
    assert set(lora.pairs) == {f"{m}.weight" for m in lora_targets(cfg.dit)}
    assert lora.ranks == {4}
    assert {p.scale for p in lora.pairs.values()} == {0.5}


def test_lora_alpha_tensors_set_the_scale(tmp_path: Path, cfg: ModelConfig) -> None:
    path = tmp_path / "lora.safetensors"
    write_lora(path, cfg.dit)
    tensors = load_file(str(path))
    tensors.update({f"{m}.alpha": torch.tensor(1.0) for m in lora_targets(cfg.dit)})
    save_file(tensors, str(path))
    assert {p.scale for p in LoraFile(path).pairs.values()} == {0.25}


# ----- errors ----------------------------------------------------------------------------------------


def test_missing_files_are_listed_with_the_layout_and_model_card(copy: Path, cfg: ModelConfig) -> None:
    ckpt = copy / CHECKPOINT_NAME
    (ckpt / "Wan2.1_VAE.pth").unlink()
    shutil.rmtree(ckpt / "wav2vec2-large-xlsr-53-english")
    with pytest.raises(CheckpointError) as err:
        _load(copy, cfg)
    msg = str(err.value)
    assert "Wan2.1_VAE.pth" in msg and "wav2vec2-large-xlsr-53-english/" in msg
    assert "Wan-AI/Wan2.2-S2V-14B" in msg and "Quark-Vision/Live-Avatar" in msg


def test_missing_dit_key_names_the_index_and_the_key(copy: Path, cfg: ModelConfig) -> None:
    _edit_shard(copy / CHECKPOINT_NAME, "blocks.2.norm3.bias", None, index_too=True)
    with pytest.raises(CheckpointError, match=r"(?s)safetensors\.index\.json.*missing \(1\).*blocks\.2\.norm3\.bias"):
        _load(copy, cfg)


def test_key_absent_from_its_shard_names_the_shard(copy: Path, cfg: ModelConfig) -> None:
    shard = _edit_shard(copy / CHECKPOINT_NAME, "blocks.2.norm3.bias", None, index_too=False)
    with pytest.raises(CheckpointError, match=rf"(?s){shard.name}.*blocks\.2\.norm3\.bias"):
        _load(copy, cfg)


def test_unexpected_dit_key_is_reported(copy: Path, cfg: ModelConfig) -> None:
    _edit_shard(copy / CHECKPOINT_NAME, "blocks.0.self_attn.extra.weight", torch.zeros(2), index_too=True)
    with pytest.raises(CheckpointError, match=r"(?s)index\.json.*unexpected \(1\).*blocks\.0\.self_attn\.extra"):
        _load(copy, cfg)


def test_wrong_shape_names_the_shard_key_and_shapes(copy: Path, cfg: ModelConfig) -> None:
    shard = _edit_shard(copy / CHECKPOINT_NAME, "blocks.1.ffn.0.weight", torch.zeros(3, 64), index_too=False)
    with pytest.raises(CheckpointError, match=rf"(?s){shard.name}.*blocks\.1\.ffn\.0\.weight: file \[3, 64\] vs "
                                              rf"model \[{cfg.dit.ffn_dim}, {cfg.dit.dim}\]"):
        _load(copy, cfg)


def test_vae_missing_key_names_the_vae_file(copy: Path, cfg: ModelConfig) -> None:
    path = copy / CHECKPOINT_NAME / "Wan2.1_VAE.pth"
    state = torch.load(path, weights_only=True)
    del state[next(k for k in state if k.startswith("decoder.upsamples.") and ".shortcut." in k)]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"(?s)Wan2\.1_VAE\.pth.*missing \(1\).*conv_shortcut"):
        _load(copy, cfg)


def test_t5_unexpected_key_names_the_t5_file(copy: Path, cfg: ModelConfig) -> None:
    path = copy / CHECKPOINT_NAME / "models_t5_umt5-xxl-enc-bf16.pth"
    state = torch.load(path, weights_only=True)
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"(?s)models_t5_umt5-xxl-enc-bf16\.pth.*blocks\.0\.attn\.extra"):
        _load(copy, cfg)


def test_bad_lora_rank_names_the_lora_file(copy: Path, cfg: ModelConfig) -> None:
    path = tiny_lora_path(copy)
    tensors = load_file(str(path))
    tensors["blocks.1.ffn.2.lora_B.weight"] = torch.zeros(64, 3)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)liveavatar\.safetensors.*bad LoRA rank.*blocks\.1\.ffn\.2"):
        _load(copy, cfg)


def test_lora_target_missing_from_the_dit_names_the_lora_file(copy: Path, cfg: ModelConfig) -> None:
    path = tiny_lora_path(copy)
    tensors = load_file(str(path))
    tensors["blocks.9.self_attn.q.lora_A.weight"] = torch.zeros(4, 64)
    tensors["blocks.9.self_attn.q.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)liveavatar\.safetensors.*not DiT weights.*blocks\.9"):
        _load(copy, cfg)


def test_non_lora_tensor_in_the_lora_file_is_rejected(copy: Path, cfg: ModelConfig) -> None:
    path = tiny_lora_path(copy)
    tensors = load_file(str(path))
    tensors["blocks.0.self_attn.q.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)liveavatar\.safetensors.*not LoRA factors"):
        _load(copy, cfg)


def test_other_wan_architectures_are_refused_by_config_json(copy: Path, cfg: ModelConfig) -> None:
    path = copy / CHECKPOINT_NAME / "config.json"
    config = json.loads(path.read_text())
    config.update(enable_motioner=True, enable_framepack=False)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"(?s)config\.json.*unsupported architecture.*enable_motioner"):
        _load(copy, cfg)


# ----- VAE ---------------------------------------------------------------------------------------------


def test_vae_from_wan_naming_decodes_like_the_vae_built_directly(loaded: OfficialModels, cfg: ModelConfig) -> None:
    direct = tiny_vae(cfg.vae)
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.vae.decode(z).sample, direct.decode(z).sample)


def test_vae_key_map_at_full_size_matches_the_published_renames() -> None:
    cfg = VAEConfig()
    with init_empty_weights():
        diffusers_keys = set(build_vae(cfg).state_dict())
    wan = diffusers_vae_to_wan(dict.fromkeys(diffusers_keys), cfg)
    assert len(wan) == len(diffusers_keys) == 194
    assert set(wan_vae_to_diffusers(wan, cfg)) == diffusers_keys
    # Pairs stated by diffusers' scripts/convert_wan_to_diffusers.py (convert_vae) for Wan2.1_VAE.pth.
    published = {
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
        "decoder.upsamples.7.time_conv.bias": "decoder.up_blocks.1.upsamplers.0.time_conv.bias",
        "decoder.upsamples.14.residual.6.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "encoder.downsamples.5.time_conv.weight": "encoder.down_blocks.5.time_conv.weight",
        "encoder.downsamples.3.shortcut.bias": "encoder.down_blocks.3.conv_shortcut.bias",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
        "encoder.head.2.weight": "encoder.conv_out.weight",
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
    }
    assert wan_vae_to_diffusers(dict(zip(published, published)), cfg) == {v: k for k, v in published.items()}


# ----- text and audio ------------------------------------------------------------------------------------


def test_umt5_encode_returns_text_len_rows_zero_padded_after_the_tokens(loaded: OfficialModels,
                                                                          cfg: ModelConfig) -> None:
    enc = loaded.text_encoder
    prompt = " a  man &amp; "
    ids = enc.tokenizer("a man &").input_ids
    out = enc.encode(prompt)
    n = len(ids)
    assert out.shape == (1, cfg.dit.text_len, cfg.dit.text_dim) and 1 < n < cfg.dit.text_len
    assert out[0, :n].abs().sum(dim=-1).gt(0).all() and not out[0, n:].any()
    # Upstream's path: pad to text_len, run with the mask, keep the token rows.
    padded = torch.zeros(1, cfg.dit.text_len, dtype=torch.long)
    padded[0, :n] = torch.tensor(ids)
    mask = (torch.arange(cfg.dit.text_len) < n).long()[None]
    with torch.no_grad():
        upstream = enc.model(input_ids=padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, :n], upstream[0, :n], rtol=1e-5, atol=1e-6)


def test_umt5_encode_truncates_long_prompts_to_text_len(loaded: OfficialModels, cfg: ModelConfig) -> None:
    out = loaded.text_encoder.encode("a person talks to the camera " * 10)
    assert out.shape == (1, cfg.dit.text_len, cfg.dit.text_dim) and out[0, -1].any()


def test_wan_t5_key_names_map_to_umt5(loaded: OfficialModels, root: Path) -> None:
    wan = torch.load(root / CHECKPOINT_NAME / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    hf = wan_t5_to_hf(wan)
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is wan["blocks.1.ffn.gate.0.weight"]
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] is wan["blocks.1.ffn.fc1.weight"]
    assert hf["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] is \
        wan["blocks.0.pos_embedding.embedding.weight"]
    assert set(hf_t5_to_wan(loaded.text_encoder.model.state_dict())) == set(wan)
    state = loaded.text_encoder.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in hf.items())
    assert loaded.text_encoder.model.encoder.embed_tokens.weight is loaded.text_encoder.model.shared.weight


def test_wav2vec2_base_model_loads_from_the_ctc_folder(loaded: OfficialModels, root: Path, cfg: ModelConfig) -> None:
    ctc = load_file(str(root / CHECKPOINT_NAME / "wav2vec2-large-xlsr-53-english" / "model.safetensors"))
    base = {k.removeprefix("wav2vec2."): v for k, v in ctc.items() if not k.startswith("lm_head.")}
    state = loaded.wav2vec2.state_dict()
    assert set(state) == set(base) and all(torch.equal(state[k], v) for k, v in base.items())
    with torch.no_grad():
        hidden = loaded.wav2vec2(torch.zeros(1, 1600), output_hidden_states=True).hidden_states
    assert len(hidden) == cfg.dit.num_audio_layers
