"""Anytime-prediction server: ONNX Runtime sessions per exit, exit policies, batching, metrics.

Never imports torch: the server runs on onnxruntime + numpy + Pillow alone.
"""
