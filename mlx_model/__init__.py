"""DeepSeek-style language model (MLA + DeepSeekMoE) in MLX.

Importing this package is free of side effects and MLX-free: `mlx_model.config` is shared with
the PyTorch twin. `load` and `generate` are imported lazily from `mlx_model.generation` (the CLI
is `python -m mlx_model.generate`).

Speed on a Linux CPU (a fast BLAS, vectorised `mx.compile` kernels, breadth-first graph order) is
one explicit call, made before `mlx.core` is imported: `mlx_model.speedups.enable()`. The CLIs
make it themselves.
"""

from typing import Any

__all__ = ["load", "generate"]


def __getattr__(name: str) -> Any:
    if name in ("load", "generate"):
        import importlib

        # The functions live in mlx_model.generation; mlx_model/generate.py is only the CLI,
        # which library code never imports (importing it by name would bind the package
        # attribute `generate` to that module, as Python does for every submodule).
        _g = importlib.import_module(".generation", __name__)
        globals().update(load=_g.load, generate=_g.generate)
        return globals()[name]
    raise AttributeError(name)
