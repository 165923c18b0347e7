"""PyTorch twin of the MLX model (the parity reference): `model.py` and `loss.py`.

Imports `ModelArgs` from `mlx_model.config` (stdlib only), never a copy of it.
"""
