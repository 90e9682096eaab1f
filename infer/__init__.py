"""Inference runtime: loading (with quantization), generation, evaluation, benchmarks, serving."""



def __getattr__(name):
    # Lazy, so `import infer` (and `python -m infer --help`) stays free of torch imports.
    # `infer.load` is both a submodule and the loading function: the submodule is callable
    # (see the end of infer/load.py), so `infer.load(path)` and `from infer import load`
    # work the same whichever import happened first.
    if name == "load":
        import importlib

        return importlib.import_module("infer.load")
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
