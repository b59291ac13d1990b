"""Fused kernels (Triton on CUDA, torch on CPU) for fastdiff."""
