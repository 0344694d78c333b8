"""Hydra model server: FastAPI + ONNX Runtime, no torch."""
