"""Runtimes: how a batch of images with per-sample prompt tensors becomes features.

One small contract (`Runtime`), implemented by eager torch, ONNX Runtime (CPU, or CUDA with I/O
binding) and CUDA graphs; `select` picks one for `--runtime` and says why.
"""
