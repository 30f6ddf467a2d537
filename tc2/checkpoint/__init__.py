"""Weights on disk: tensor names, HF directories, safetensors, MindSpore .ckpt, MindFormers, conversions."""
