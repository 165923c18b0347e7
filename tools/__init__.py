import mlx_model  # noqa: F401  (loads a fast BLAS before MLX)
