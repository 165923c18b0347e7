"""DeepSeek-style language model (MLA + DeepSeekMoE) in MLX.

Importing this package stays cheap and MLX-free: `mlx_model.config` is shared with the PyTorch
twin. `load` and `generate` are imported lazily from `mlx_model.generation` (the CLI is
`python -m mlx_model.generate`).

On Linux it first loads a fast BLAS (MKL or OpenBLAS) for MLX's CPU backend and makes
`mx.compile` kernels vectorise (AVX2/FMA, inlined maths); this must happen before `mlx.core` is
imported: see `_blas`. It also asks MLX for breadth-first graph order (`MLX_BFS_MAX_WIDTH`, unless
set), which the trainer's CPU lanes need.
"""

import os
import sys
from typing import Any

from ._blas import ensure_fast_blas, ensure_native_codegen

if sys.platform.startswith("linux"):
    # The trainer's CPU lanes (mlx_model/trainer.py) are streams that only run side by side when
    # MLX orders a graph breadth first; depth first, its cap on queued tasks makes the second
    # lane wait for the first. MLX reads this once, at its first evaluation.
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")

ensure_fast_blas()
ensure_native_codegen()

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
