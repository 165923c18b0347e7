"""What `python -m tools.bench` measures inside a process: resident memory, which BLAS is mapped,
the CPU model, the median, analytic useful FLOPs per token, active parameters, cache bytes per
token. Used by the workers (tools/bench_workers.py) and the coordinators."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def rss_bytes() -> int:
    """Current resident set of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loaded_blas() -> str:
    """Which BLAS libraries this process has mapped (MKL, OpenBLAS, MLX's bundled reference)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = os.path.basename(line.split()[-1]) if "/" in line else ""
                for key in ("libmkl_rt", "libopenblas", "libblas-", "libblas.so", "libtorch_cpu"):
                    if name.startswith(key) and name not in found:
                        found.append(name)
    except OSError:
        return platform.system()
    return ", ".join(found) or "none mapped"


def blas_label(name: str) -> str:
    """The BLAS a contender's matmuls use: the library MLX took cblas_sgemm from, or torch's."""
    parts = []
    if name != "torch_reference" and "mlx.core" in sys.modules:
        import mlx.core as mx

        if mx.default_device() == mx.gpu:
            parts.append("MLX GPU kernels")
        else:
            from mlx_model import _blas

            path = _blas.blas_path()
            threads = (
                os.environ.get("MKL_NUM_THREADS")
                or os.environ.get("OPENBLAS_NUM_THREADS")
                or "default"
            )
            parts.append(
                f"MLX: {os.path.basename(path)} ({threads} threads)"
                if path
                else "MLX: its bundled reference BLAS (slow)"
            )
    if "torch" in sys.modules and name in ("torch_reference", "peak"):
        import torch

        parts.append(
            f"torch: its own {'MKL' if torch.backends.mkl.is_available() else 'BLAS'}, "
            f"{torch.get_num_threads()} threads"
        )
    return "; ".join(parts) or loaded_blas()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def useful_flops_per_token(args: Any, T: int, active_params: int) -> float:
    """6 * active params + causal attention scores (see tools/bench.py's docstring)."""
    if args.attention_type == "mla":
        dqk, dv = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    else:
        dqk = dv = args.head_dim
    attn = 3 * args.num_hidden_layers * args.num_attention_heads * (dqk + dv) * (T + 1)
    return 6 * active_params + attn


def active_params(weights: dict[str, Any], args: Any) -> int:
    """Matrix parameters one token uses: all but the embedding; k/E of the routed experts."""
    n = 0.0
    for name, w in weights.items():
        if w.ndim < 2 or "embed_tokens" in name or name.startswith("mtp"):
            continue
        size = float(w.size)
        if ".mlp.experts." in name:
            size *= args.num_experts_per_tok / args.n_routed_experts
        n += size
    return int(n)


def cache_bytes_per_token(args: Any, nbytes: int = 4) -> dict[str, int]:
    """latent: layers * (kv_lora_rank + qk_rope_head_dim) (MLA) or layers * 2 * head_dim (MQA);
    expanded multi-head: layers * heads * (qk_head_dim + v_head_dim); times dtype bytes."""
    L, H = args.num_hidden_layers, args.num_attention_heads
    if args.attention_type == "mla":
        latent = L * (args.kv_lora_rank + args.qk_rope_head_dim)
        expanded = L * H * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
    else:
        latent = L * 2 * args.head_dim
        expanded = L * H * 2 * args.head_dim
    return {"latent": latent * nbytes, "expanded": expanded * nbytes}
