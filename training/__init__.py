"""Offline Hydra pipeline: teachers, distillation, evaluation, ONNX export."""
