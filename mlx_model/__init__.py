"""DeepSeek-style language model (MLA + DeepSeekMoE) in MLX.

Importing this package stays cheap and MLX-free: `mlx_model.config` is shared with the PyTorch
twin. `load` and `generate` are imported lazily from `mlx_model.generate`.
"""

from typing import Any

__all__ = ["load", "generate"]


def __getattr__(name: str) -> Any:
    if name in ("load", "generate"):
        from . import generate as _g

        return getattr(_g, name)
    raise AttributeError(name)
