"""DeepSeek-style language model (MLA + DeepSeekMoE) in MLX.

Importing this package stays cheap and MLX-free: `mlx_model.config` is shared with the PyTorch
twin. `load` and `generate` are imported lazily from `mlx_model.generate`.
"""

from typing import Any

__all__ = ["load", "generate"]


def __getattr__(name: str) -> Any:
    if name in ("load", "generate"):
        import importlib

        # `from . import generate` would recurse into this hook; importing the submodule
        # binds the package attribute `generate` to the module, so rebind both functions.
        _g = importlib.import_module(".generate", __name__)
        globals().update(load=_g.load, generate=_g.generate)
        return globals()[name]
    raise AttributeError(name)
