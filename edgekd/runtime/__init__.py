"""Torch-free ONNX Runtime helpers: sessions, latency timing, accuracy, device runner.

Imports only the standard library, numpy and onnxruntime, so it runs on a device.
"""
