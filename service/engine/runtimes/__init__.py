"""Runtimes: how a batch of images with per-sample prompt tensors becomes features.

One small contract (`Runtime`), implemented by eager torch and ONNX Runtime; `select` picks one
for `--runtime` and says why.
"""
