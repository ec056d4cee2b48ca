"""Tensors only: the causal S2V DiT, audio encoder, VAE wrapper, sampler and checkpoint loading."""
