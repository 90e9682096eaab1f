"""Inference runtime: loading (with quantization), generation, evaluation, benchmarks, serving."""
