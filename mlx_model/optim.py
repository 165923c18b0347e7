"""Optimizer and learning-rate schedules (SPEC section 6).

AdamW (betas 0.9/0.95, bias-corrected like torch.optim.AdamW), decoupled weight decay on
matrices only (ndim >= 2: linears, stacked experts, embeddings), none on norms or biases; the
routing bias is frozen, so it never reaches the optimizer. Gradients are clipped by global norm.
The second moment can be factored (Adafactor-style row and column statistics, see AdamW).
Schedules: linear warmup, then cosine or warmup-stable-decay (linear decay over the last
`decay_fraction` of steps), both ending at lr * min_lr_ratio.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.optimizers as optim

FACTORED_EPS = 1e-30  # Adafactor's eps1, added to g^2 in the factored statistics


def lr_at(
    step: int,
    lr: float,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based), plain Python (the twin uses this too)."""
    lo = lr * min_lr_ratio
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = total - max(1, int(round(decay_fraction * total)))
        if step < decay_start:
            return lr
        frac = (step - decay_start + 1) / max(1, total - decay_start)
        return lr + (lo - lr) * min(1.0, frac)
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup + 1) / span)
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * frac))


def make_schedule(
    lr: float,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
):
    """An mlx.optimizers-style schedule (step array -> lr array) equal to `lr_at`."""
    table = mx.array(
        [lr_at(s, lr, warmup, total, schedule, min_lr_ratio, decay_fraction) for s in range(total)]
        + [lr * min_lr_ratio if schedule != "constant" else lr]
    )

    def fn(step: mx.array) -> mx.array:
        return table[mx.minimum(step, total)]

    return fn


class AdamW(optim.AdamW):
    """mlx.optimizers.AdamW with two memory-lean options.

    `moments_dtype`: m and a full v are stored in this dtype (None: the parameter's dtype, as
    mlx does); the update math runs in the gradient's dtype (a bfloat16 moment meets a float32
    gradient as float32), only the stored moments are rounded.

    `second_moment="factored"`: for a weight of ndim >= 2 (a matrix [out, in], or stacked
    experts [E, out, in]: one factorisation per leading index) v is kept as Adafactor's row and
    column statistics of the squared gradient instead of a full array (float32, a few KB per
    matrix); 1-D weights keep a full v. With g the (clipped) gradient, t the step, lr the
    scheduled rate, wd the weight decay, eps1 = 1e-30 (Adafactor's floor, so an all-zero
    gradient, such as an expert no token chose, gives v_hat = 0-ish instead of 0 / 0):
        m   <- b1 m + (1 - b1) g
        r   <- b2 r + (1 - b2) mean_in(g^2 + eps1)        shape [..., out]
        c   <- b2 c + (1 - b2) mean_out(g^2 + eps1)       shape [..., in]
        v_hat = outer(r, c) / mean_out(r)                 (= R C^T / sum(R) with sums)
        w   <- w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)
    i.e. Adam's update (bias-corrected, decoupled decay, as `full`) with v replaced by the
    rank-1 estimate of Adafactor (Shazeer & Stern 2018, with beta1; no relative step size, no
    update clipping). `full` is exactly mlx's AdamW (plus the moment storage dtype)."""

    def __init__(
        self,
        *a,
        moments_dtype: mx.Dtype | None = None,
        second_moment: str = "full",
        **kw,
    ):
        super().__init__(*a, **kw)
        if second_moment not in ("full", "factored"):
            raise ValueError(f"second_moment must be full or factored, not {second_moment!r}")
        self.moments_dtype = moments_dtype
        self.second_moment = second_moment

    def _factored(self, parameter: mx.array) -> bool:
        return self.second_moment == "factored" and parameter.ndim >= 2

    def init_single(self, parameter: mx.array, state: dict) -> None:
        if not self._factored(parameter):
            super().init_single(parameter, state)
            self._store(state)
            return
        shape = parameter.shape
        state["m"] = mx.zeros(shape, self.moments_dtype or parameter.dtype)
        state["v_row"] = mx.zeros(shape[:-1], mx.float32)
        state["v_col"] = mx.zeros(shape[:-2] + shape[-1:], mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if not self._factored(parameter):
            out = super().apply_single(gradient, parameter, state)
            self._store(state)
            return out
        betas = tuple(self.betas)
        fn = _factored_update(self.moments_dtype, betas, self.eps, self.weight_decay)
        new, state["m"], state["v_row"], state["v_col"] = fn(
            gradient,
            parameter,
            state["m"],
            state["v_row"],
            state["v_col"],
            self.learning_rate,
            self.step,
        )
        return new

    def _store(self, state: dict) -> None:
        if self.moments_dtype is not None:
            state["m"] = state["m"].astype(self.moments_dtype)
            state["v"] = state["v"].astype(self.moments_dtype)


@functools.cache
def _factored_update(moments_dtype: mx.Dtype | None, betas: tuple, eps: float, wd: float):
    """The factored update of one weight (formulas in AdamW's docstring) as one compiled
    function per setting (and, inside mx.compile, per shape): its element-wise chains fuse, so
    a large weight (a stacked expert tensor) needs few weight-sized temporaries in the update."""
    b1, b2 = betas

    def update(g, p, m, r, c, lr, step):
        dt = g.dtype
        lr = lr.astype(dt)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        sq = mx.square(g.astype(mx.float32)) + FACTORED_EPS
        r = b2 * r + (1 - b2) * mx.mean(sq, axis=-1)
        c = b2 * c + (1 - b2) * mx.mean(sq, axis=-2)
        # sqrt(v_hat) = sqrt(r / mean(r)) (rows) x sqrt(c) (columns), fused into the update
        rows = mx.sqrt(r / mx.mean(r, axis=-1, keepdims=True)).astype(dt)
        sqrt_v = rows[..., :, None] * mx.sqrt(c).astype(dt)[..., None, :]
        c1 = (lr / (1 - b1**step)).astype(dt)
        c2 = mx.rsqrt(1 - b2**step).astype(dt)
        new = p - c1 * m / (sqrt_v * c2 + eps)
        return new, (m if moments_dtype is None else m.astype(moments_dtype)), r, c

    return mx.compile(update)


def make_optimizer(
    learning_rate,
    weight_decay: float = 0.1,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
    moments_dtype: mx.Dtype | None = None,
    second_moment: str = "full",
):
    """AdamW with decay on ndim >= 2 parameters only; moments stored in `moments_dtype`
    (None: each parameter's dtype); `second_moment` full (AdamW's v) or factored (see AdamW)."""
    kw = dict(
        betas=list(betas),
        eps=eps,
        bias_correction=True,
        moments_dtype=moments_dtype,
        second_moment=second_moment,
    )
    decay = AdamW(learning_rate, weight_decay=weight_decay, **kw)
    no_decay = AdamW(learning_rate, weight_decay=0.0, **kw)
    return optim.MultiOptimizer([decay, no_decay], [lambda path, p: p.ndim >= 2])


def global_norm(grads) -> mx.array:
    """sqrt(sum of squares of every gradient), float32.

    Each square-sum is a [1, n] x [n, 1] matmul: one pass through the BLAS (vectorised, threaded)
    instead of MLX's square + sum reduction, ~10x slower on the CPU for a whole model.
    """
    from mlx.utils import tree_flatten

    total = mx.array(0.0)
    for _, g in tree_flatten(grads):
        g = g.reshape(1, -1).astype(mx.float32)
        total = total + (g @ g.T).reshape(())
    return mx.sqrt(total)


def clip_scale(norm: mx.array, max_norm: float, prescale: float = 1.0) -> mx.array:
    """The factor that scales gradients (of global norm `norm` after `prescale`) to clip them."""
    if max_norm <= 0:
        return mx.array(prescale)
    return prescale * mx.minimum(max_norm / (norm + 1e-6), 1.0)


def clip_by_global_norm(grads, max_norm: float, prescale: float = 1.0):
    """(clipped grads, global norm before clipping) of `grads * prescale`; max_norm <= 0
    disables clipping. Scales every gradient by min(1, max_norm / (norm + 1e-6)), as
    optim.clip_grad_norm does. The prescale (e.g. 1 / micro-batches) joins the clip factor in
    one multiply, which fuses into the optimizer's kernel: no scaled copy of the gradients."""
    from mlx.utils import tree_map

    norm = global_norm(grads) * prescale
    scale = clip_scale(norm, max_norm, prescale)
    return tree_map(lambda g: g * scale.astype(g.dtype), grads), norm
