"""train-tiny's training paths: the streaming decoder stage (decode as the engine does, backprop through the causal
cache, truncated), the DiT's own-trajectory sampler, time budgets, and a toy end-to-end run of every stage the GPU
script (scripts/device_train_tiny.sh) chains."""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import pytest
import torch

from cli.main import training_profile
from model.config import VAEConfig
from model.vae import StreamingVAEDecoder, build_vae
from tests.conftest import random_stream_inputs
from train import runner
from train.clips import close_worker_pool
from train.decoder_stage import decode_chunk, detach_cache, new_decoder_cache
from train.dit_stage import rollout_loss, sample_clips
from train.loop import Budget
from train.stack import build_stack, stock_vae_


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(VAEConfig(base_dim=4, num_res_blocks=1)).eval()


def _latents(t: int, seed: int = 1, grad: bool = False) -> torch.Tensor:
    x = torch.randn(1, 16, t, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def test_decode_chunk_equals_the_engines_streaming_decoder(vae):
    """Reference latent alone, then blocks of 3 with the cache kept: the training decode (CPU conv path included)
    gives the frames the engine's StreamingVAEDecoder gives."""
    lat = _latents(1 + 6)
    dec = StreamingVAEDecoder(vae)
    want = [dec.decode(lat[:, :, :1])] + [dec.decode(lat[:, :, a:a + 3]) for a in (1, 4)]
    train_vae = stock_vae_(copy.deepcopy(vae), cpu=True)
    cache = new_decoder_cache(train_vae)
    with torch.no_grad():
        got = [decode_chunk(train_vae, cache, lat[:, :, :1], True)]
        got += [decode_chunk(train_vae, cache, lat[:, :, a:a + 3], False) for a in (1, 4)]
    assert [g.shape[2] for g in got] == [1, 12, 12]
    for g, w in zip(got, want):
        assert torch.allclose(g.clamp(-1, 1), w, atol=1e-4)
    # a first chunk of several latents: the first alone, the rest in one call — the same frames
    cache = new_decoder_cache(train_vae)
    with torch.no_grad():
        whole = decode_chunk(train_vae, cache, lat[:, :, :4], True)
    assert torch.allclose(whole, torch.cat(got[:2], dim=2), atol=1e-4)


def test_gradients_flow_through_the_cache_until_it_is_detached(vae):
    train_vae = stock_vae_(copy.deepcopy(vae), cpu=True)
    for cut in (False, True):
        lat = _latents(1 + 6, grad=True)
        cache = new_decoder_cache(train_vae)
        decode_chunk(train_vae, cache, lat[:, :, :4], True)
        if cut:
            detach_cache(cache)
        decode_chunk(train_vae, cache, lat[:, :, 4:], False).square().mean().backward()
        earlier = lat.grad[:, :, :4].abs().sum().item()
        assert (earlier == 0) if cut else (earlier > 0)
        assert lat.grad[:, :, 4:].abs().sum().item() > 0


def test_stock_vae_undoes_the_cpu_inference_fast_path(vae):
    """ModelStack.load swaps inference-only classes into the VAE on CPU; training puts diffusers' back (same
    values, differentiable, no class from live/cpu_vae.py left)."""
    from model.vae_cpu import speed_up_vae_

    fast = speed_up_vae_(copy.deepcopy(vae))
    back = stock_vae_(copy.deepcopy(fast))
    assert not any(type(m).__module__ == "model.vae_cpu" for m in back.modules())
    lat = _latents(4)
    with torch.no_grad():
        want = StreamingVAEDecoder(vae).decode(lat)
        got = decode_chunk(back, new_decoder_cache(back), lat, True).clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-4)
    assert back.state_dict().keys() == vae.state_dict().keys()


def test_budget_stops_at_the_deadline_and_anneals_to_it():
    now = [1000.0]
    b = Budget(minutes=60, steps=10**9, start_step=0, deadline=1000.0 + 1.2, clock=lambda: now[0])
    assert not b.done(1) and b.progress(1) == 0.0
    now[0] += 0.6
    assert not b.done(1) and b.progress(1) == pytest.approx(0.5)
    now[0] += 0.7
    assert b.done(2) and b.progress(2) == 1.0


def test_clip_sampler_is_the_engines_block_by_block_sampling(tiny_stack):
    """sample_clips (all blocks advance one step together, each attending to the step's states of the blocks
    before it) gives the latents the engine's forward_block loop gives for the same noise: the rollout loss
    trains on the trajectories inference takes."""
    stack = tiny_stack
    dit, sched = stack.dit, stack.schedule
    h = w = 8
    ref, motion, feats, noise = random_stream_inputs(dit, 3, h)
    text_kv = dit.text_kv(stack.text_encoder.encode(""))
    caches = dit.new_caches(sched.steps, h, w)
    dit.prefill_sink(caches, ref, motion, text_kv)
    streamed = []
    with torch.no_grad():
        for j in range(3):
            x = noise[:, :, 3 * j:3 * j + 3]
            audio = dit.encode_audio(feats[:, j])
            for i in range(sched.steps):
                v = dit.forward_block(x, sched.timesteps[i].expand(1), audio, text_kv, caches, i, 3 * j)
                x = sched.euler_step(x, v, i)
            streamed.append(x)
        glob, local = dit.encode_audio_blocks(feats)
        states = sample_clips(dit, sched, dit.sink_kv(ref, motion, text_kv), glob, local, text_kv, noise)
    assert len(states) == sched.steps + 1 and torch.equal(states[0], noise)
    assert torch.allclose(states[-1], torch.cat(streamed, dim=2), atol=1e-4, rtol=1e-4)


def test_rollout_loss_trains_the_dit(tiny_stack):
    stack = tiny_stack
    dit, sched = stack.dit, stack.schedule
    g = torch.Generator().manual_seed(1)
    b, h, w = 2, 8, 8
    x0 = torch.randn(b, 16, 6, h, w, generator=g)
    feats = torch.randn(b, 2, dit.config.num_audio_layers, dit.config.audio_dim, 12, generator=g)
    mouth = torch.zeros(b, 1, 1, h, w)
    mouth[..., 5:7, 3:5] = 1
    dit.requires_grad_(True)
    try:
        text_kv = dit.text_kv(stack.text_encoder.encode("").expand(b, -1, -1))
        sink = dit.sink_kv(torch.randn(b, 16, 1, h, w, generator=g), torch.randn(b, 16, 19, h, w, generator=g),
                           text_kv)
        glob, local = dit.encode_audio_blocks(feats)
        loss = rollout_loss(dit, sched, x0, sink, glob, local, text_kv, mouth, 0, g)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert dit.head.head.weight.grad.abs().sum() > 0
        assert dit.casual_audio_encoder.parameters().__next__().grad is not None
    finally:
        dit.zero_grad(set_to_none=True)
        dit.requires_grad_(False)


@pytest.fixture
def toy_run(tmp_path):
    """A speech bank without espeak (voiced, amplitude-modulated harmonics) and a parser for train-tiny."""
    rng = np.random.default_rng(0)
    bank = np.empty(3, dtype=object)
    for k in range(3):
        t = np.arange(int(1.5 * 16000)) / 16000
        env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 4) * t), 0, None)
        bank[k] = (0.3 * env * sum(np.sin(2 * np.pi * 130 * h * t) / h for h in (1, 2, 3))).astype(np.float32)
    np.savez_compressed(tmp_path / "speech.npz", speech=bank)
    p = argparse.ArgumentParser()
    runner.add_arguments(p)

    def run(*argv: str) -> int:
        args = p.parse_args(["--work", str(tmp_path / "work"), "--speech", str(tmp_path / "speech.npz"),
                             "--device", "cpu", "--workers", "1", "--extra-characters", "0", *argv])
        return runner.main(args, training_profile(args.config))

    yield run, tmp_path
    close_worker_pool()


def test_decoder_dit_and_export_stages_chain_as_the_gpu_script_runs_them(toy_run):
    from model.stack import load_project_weights

    run, tmp = toy_run
    work = tmp / "work"
    # a stand-in for the previous run's vae.pt / dit.pt: the stack's seeded random weights
    stack = build_stack(training_profile(), torch.device("cpu"))
    init = tmp / "init"
    init.mkdir()
    torch.save({"vae": stack.vae.state_dict()}, init / "vae.pt")
    torch.save({"dit": stack.dit.state_dict()}, init / "dit.pt")
    common = ("--init-from", str(init), "--deadline", str(time.time() + 120), "--data-seed", "3")
    assert run("--stage", "decoder", *common, "--decoder-streams", "1", "--decoder-latents", "3",
               "--decoder-batch", "1", "--decoder-val-latents", "3", "--decoder-val-streams", "1",
               "--decoder-steps", "2",
               "--out", str(tmp / "a.safetensors"), "--log-name", "train-decoder.log") == 0
    assert run("--stage", "dit", *common, "--clips", "4", "--blocks", "1", "--val-clips", "1", "--dit-batch", "1",
               "--rollout-batch", "1", "--dit-steps", "2", "--out", str(tmp / "b.safetensors"),
               "--log-name", "train-dit.log") == 0
    assert run("--stage", "export", "--init-from", str(init), "--out", str(tmp / "tiny.safetensors")) == 0
    assert torch.load(work / "decoder.pt")["step"] == 2 and torch.load(work / "dit.pt")["step"] == 2
    decoder_log = (work / "train-decoder.log").read_text()
    assert "decoder eval before" in decoder_log and "decoder eval after" in decoder_log
    assert "dit eval at step 2" in (work / "train-dit.log").read_text()
    # the exported file holds the decoder stage's VAE and the DiT stage's DiT, and loads strictly
    from safetensors.torch import load_file

    out = load_file(str(tmp / "tiny.safetensors"))
    dec = torch.load(work / "decoder.pt")["vae"]
    dit = torch.load(work / "dit.pt")["dit"]
    assert torch.equal(out["vae.decoder.conv_out.weight"], dec["decoder.conv_out.weight"])
    assert torch.equal(out["dit.head.head.weight"], dit["head.head.weight"])
    fresh = build_stack(training_profile(), torch.device("cpu"))
    load_project_weights(tmp / "tiny.safetensors", {"dit": fresh.dit, "vae": fresh.vae, "wav2vec2": fresh.wav2vec2,
                                                    "text": fresh.text_encoder})


def test_training_windows_and_features_are_the_engines(tiny_stack):
    """The audio and data stages cut a stream's audio with block_windows and compute all blocks' features at once
    (window_features, batched, differentiable); the engine takes windows from its AudioWindow block by block and
    calls FrameAudioFeatures. Both must give the DiT the same features."""
    from live.stream.audio_window import AudioWindow
    from model.audio_features import FrameAudioFeatures, window_features
    from train.audio import block_taps, block_windows

    st = tiny_stack.settings.stream
    left, ahead = round(st.audio_left_context_s * 16000), round(st.audio_lookahead_s * 16000)
    audio = np.random.default_rng(4).normal(0, 0.2, 3 * 7680 + 999).astype(np.float32)
    win = AudioWindow(left_context_s=st.audio_left_context_s, lookahead_s=st.audio_lookahead_s)
    win.push(audio)
    win.finish()
    feats = FrameAudioFeatures(tiny_stack.wav2vec2)
    engine = []
    while (block := win.next_block()) is not None:
        engine.append(feats(block.samples, block.index * 7680 - block.block_offset, 12 * block.index, 12)[0])
    windows = torch.from_numpy(block_windows(audio, len(engine), left, ahead))
    assert windows.shape[0] == 4
    taps = block_taps(tiny_stack.wav2vec2, len(engine), left, windows.shape[1], torch.device("cpu"))
    with torch.no_grad():
        batched = window_features(tiny_stack.wav2vec2, windows, taps)
    assert torch.allclose(batched, torch.stack(engine), atol=1e-5)


def test_audio_stage_trains_the_wav2vec2_that_data_and_export_use(toy_run):
    """--stage audio trains the wav2vec2 with its probe head and checkpoints it; the later stages (here export)
    load it, so the weights file carries the trained wav2vec2 under ``wav2vec2.``."""
    from safetensors.torch import load_file

    run, tmp = toy_run
    work = tmp / "work"
    assert run("--stage", "audio", "--blocks", "2", "--audio-clips", "6", "--audio-val-clips", "2",
               "--audio-steps", "3", "--audio-batch", "4", "--out", str(tmp / "a.safetensors")) == 0
    state = torch.load(work / "audio.pt")
    assert state["step"] == 3 and state["done"]
    log = (work / "train.log").read_text()
    assert "audio eval at step 0" in log and "audio eval at step 3" in log
    fresh = build_stack(training_profile(), torch.device("cpu")).wav2vec2.state_dict()
    trained = {k.removeprefix("wav2vec2."): v for k, v in state["audio"].items() if k.startswith("wav2vec2.")}
    assert trained.keys() == fresh.keys()
    name = "feature_extractor.conv_layers.0.conv.weight"
    assert not torch.equal(trained[name], fresh[name])
    # a resumed run of a finished stage does nothing; export writes the trained wav2vec2
    assert run("--stage", "audio", "--audio-steps", "5") == 0
    assert torch.load(work / "audio.pt")["step"] == 3
    assert run("--stage", "export", "--out", str(tmp / "tiny.safetensors")) == 0
    out = load_file(str(tmp / "tiny.safetensors"))
    assert torch.equal(out[f"wav2vec2.{name}"], trained[name])
