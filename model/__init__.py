"""Tensors only: the causal S2V DiT, attention kernels, audio encoder, VAE (+ CPU fast path), sampler, the model
stack and checkpoint loading."""
