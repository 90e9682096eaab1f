"""Inference runtime: loading (with quantization), generation, evaluation, benchmarks, serving."""



def __getattr__(name):
    # Lazy, so `import infer` (and `python -m infer --help`) stays free of torch imports:
    # `infer.load(path)` and `from infer import load` reach infer.loading.load.
    if name == "load":
        from infer.loading import load

        return load
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
