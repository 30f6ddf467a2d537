"""Weights on disk: HF directories, safetensors, MindSpore .ckpt, MindFormers, conversions."""
