"""Training memory plan: what one optimizer step keeps alive, in bytes, before running it.

Terms (`plan_memory`): parameters; optimizer moments (AdamW m and v in `moments_dtype`, or m
and a factored v: float32 row and column statistics of every matrix, see optim.AdamW);
then the larger of two phases. The micro-steps: the summed gradients (one set per CPU lane), a
micro-step's own gradients when it adds to a sum (MLX materialises the whole gradient tree
before the add: a whole set per lane with lanes > 1; on one lane the trainer adds a group of
parameters at a time, so only that group), and the activations of one micro-batch per lane: per
decoder block the float32 [B, H, T, T] attention scores and a per-token amount that scales with
the model's widths (_token_floats), and the output head's [B, T, vocab] logits with their
float32 softmax and gradient. The update: the gradients plus a new copy of every parameter and
moment (the compiled update), or of one chunk (`--update-chunk-mb`). The factors (`_C_*`) were
fitted to `mx.get_peak_memory()` on MLX 0.32's CPU backend with compiled steps;
tests/test_memory.py holds the plan within 20% of it.

What to do with a budget (`--memory-budget`, `--plan`) is in budget.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .config import ModelArgs
from .train_config import TrainConfig, TrainError

# Factors fitted to peaks measured on MLX 0.32's CPU backend with compiled steps (the presets,
# their larger micro-batches, sequences and vocabularies, checkpointed, bfloat16, mac8gb cuts).
_C_SCORES = 1.6  # live float32 [B, H, T, T] copies per block (scores, softmax, gradient)
_C_TOKEN = 1.0  # live float32 copies of each per-token value _token_floats counts
_C_HEAD = 1.75  # live float32 [B, T, V] copies in the loss (softmax, gradient), besides logits
# weight-sized temporaries of one chunk of the chunked update (scaled gradient, new parameter
# and moments, the update's intermediates), per byte of the chunk's float32 gradients. A chunk
# is at least one whole weight (a stacked expert tensor can exceed --update-chunk-mb).
# Measured (mac8gb at 2 layers, 69 MB expert tensors, bfloat16 moments): AdamW (mlx's
# uncompiled update) 8.0; the factored update (compiled per weight) 4.2
_C_UPDATE = {"full": 8.0, "factored": 4.5}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    """Bytes per term of one training step, and the settings they assume."""

    terms: dict[str, int]
    batch_size: int
    accum: int
    grad_checkpoint: bool
    lanes: int

    def phase(self, name: str) -> int:
        return sum(v for k, v in self.terms.items() if k.startswith(name + ":"))

    @property
    def total(self) -> int:
        """Parameters and moments, plus the larger phase (micro-steps or update)."""
        persistent = sum(v for k, v in self.terms.items() if ":" not in k)
        return persistent + max(self.phase("step"), self.phase("update"))

    def largest(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda kv: kv[1])

    def table(self) -> str:
        lines = [f"  {k:<40} {fmt_bytes(v):>10}" for k, v in self.terms.items()]
        peak = "step" if self.phase("step") >= self.phase("update") else "update"
        lines.append(
            f"  {'total (peak in the ' + peak + ' phase)':<40} {fmt_bytes(self.total):>10}"
        )
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(s: str) -> int:
    """'5GB', '800MB', '1.5G', '4GiB', '123' (bytes) -> bytes (decimal units; *iB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", s)
    if not m:
        raise TrainError(f"invalid --memory-budget {s!r}: write a size such as 5GB or 800MB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def default_budget() -> int:
    """Metal's recommended working set on Apple silicon, else the free (available) RAM."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- counts
def _norm_params(args: ModelArgs, dims: int) -> int:
    return 2 * dims if args.norm_type == "layernorm" else dims


def _block_params(args: ModelArgs, layer: int) -> tuple[int, int]:
    """(trainable parameters, frozen routing-bias entries) of decoder block `layer`."""
    a, D, H = args, args.hidden_size, args.num_attention_heads
    n = 2 * _norm_params(a, D)
    if a.attention_type == "mla":
        qk = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        n += D * qk if a.q_lora_rank is None else a.q_lora_rank * (D + 1 + qk)
        n += D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
        n += a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D
    else:
        hd = a.head_dim
        n += D * H * hd + 2 * D * hd + H * hd * D
    if not a.is_moe_layer(layer):
        return n + 3 * D * a.intermediate_size, 0
    E, Im = a.n_routed_experts, a.moe_intermediate_size
    n += E * D + 3 * E * D * Im + 3 * D * Im * a.n_shared_experts
    return n, E


def count_parameters(args: ModelArgs) -> tuple[int, int]:
    """(trainable parameters, frozen float32 routing-bias entries), counted from the config."""
    D = args.hidden_size
    n = 2 * args.vocab_size * D + _norm_params(args, D)
    frozen = 0
    for i in range(args.num_hidden_layers):
        p, f = _block_params(args, i)
        n, frozen = n + p, frozen + f
    for _ in range(args.num_nextn_predict_layers):
        p, f = _block_params(args, args.num_hidden_layers)
        n += p + 3 * _norm_params(args, D) + 2 * D * D
        frozen += f
    return n, frozen


def _matrix_shapes(args: ModelArgs) -> list[tuple[int, ...]]:
    """Shapes of the trainable weights of ndim >= 2 (what a factored second moment factors)."""
    from .model import Model

    # shapes without allocating: the model's parameter tree, traced lazily (never evaluated)
    model = Model(args)
    return [p.shape for _, p in _flat(model.trainable_parameters()) if p.ndim >= 2]


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def moment_bytes(args: ModelArgs, n: int, mb: int, second_moment: str) -> int:
    """Optimizer state bytes: m (`mb` bytes each) and v: a full v (`mb` bytes each), or for a
    factored second moment float32 row and column statistics of every weight of ndim >= 2
    and a full v for the rest."""
    if second_moment != "factored":
        return 2 * n * mb
    factored, stats = 0, 0
    for shape in _matrix_shapes(args):
        size = math.prod(shape)
        factored += size
        lead = size // (shape[-1] * shape[-2])
        stats += lead * (shape[-1] + shape[-2])
    return n * mb + (n - factored) * mb + 4 * stats


def _micro_grads(args: ModelArgs, nb: int, lanes: int, units_per_lane: int) -> int:
    """Bytes of a micro-step's own gradients beside the sums: none for a lane's first unit (its
    gradients start the sum); on one lane later ones are added a group of about
    trainer.ADD_CHUNK_BYTES (plus one weight) at a time; lanes > 1 add whole gradient sets."""
    from .trainer import ADD_CHUNK_BYTES

    if units_per_lane <= 1:
        return 0
    n, _ = count_parameters(args)
    if lanes > 1:
        return lanes * n * nb
    largest = max(math.prod(s) for s in _matrix_shapes(args))
    return min(n * nb, largest * nb + ADD_CHUNK_BYTES)


def _per_slot_grads(args: ModelArgs, tokens: int, nbytes: int, cpu: bool) -> int:
    """With few (token, expert) slots per expert, moe.Experts.block_size is 1 (one row per slot,
    as mlx-lm decodes) and the backward of its gather_mm makes a [out, in] weight gradient per
    slot for gate, up and down at once in one MoE layer (measured: mac8gb at 2 layers, T 64,
    +600 MB); bigger blocks use a segmented product instead. 0 when blocks are bigger or the
    CPU takes the dense path (half precision)."""
    a = args
    slots = tokens * a.num_experts_per_tok
    moe = any(a.is_moe_layer(i) for i in range(a.num_hidden_layers))
    if not moe or 8 * a.n_routed_experts <= slots or (cpu and nbytes < 4):
        return 0
    return 3 * slots * a.hidden_size * a.moe_intermediate_size * 4


def _token_floats(args: ModelArgs, layer: int) -> int:
    """float32 values per token that block `layer` keeps for its backward pass (times the fitted
    _C_TOKEN): 4 x hidden (residuals, norms); 3 x the attention's projections and o_proj output
    (projection, per-head layout, rotated copy); the FFN output; one hidden row per SwiGLU
    (compiled: silu(gate) * up fused) of the dense MLP or of each routed slot (with its gathered
    input and output rows) and the shared experts, and the router scores. Weights fitted to
    tiny, small, small-dense, seed and mac8gb cuts (CPU backend, compiled steps)."""
    a, D, H = args, args.hidden_size, args.num_attention_heads
    n = 4 * D
    if a.attention_type == "mla":
        qk = H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        att = (a.q_lora_rank or 0) + qk + a.kv_lora_rank + a.qk_rope_head_dim
        att += H * (a.qk_nope_head_dim + a.v_head_dim) + 2 * qk + H * a.v_head_dim
    else:
        att = 3 * H * a.head_dim + 2 * a.head_dim
    n += 3 * (att + D) + D
    if not a.is_moe_layer(layer):
        return n + a.intermediate_size
    k, Im = a.num_experts_per_tok, a.moe_intermediate_size
    return n + a.n_routed_experts + k * (Im + 2 * D) + Im * a.n_shared_experts


def _block_activations(args: ModelArgs, layer: int, B: int, T: int, nbytes: int, cpu: bool) -> int:
    """Bytes one block keeps for its backward pass at micro-batch [B, T]: the float32
    [B, H, T, T] attention scores (and their softmax and gradient), the per-token values
    (_token_floats), and on a CPU in half precision the dense expert dispatch's [B*T, E*I]
    hidden states (MLX's CPU gather_mm is float32-only)."""
    a = args
    tokens = B * T
    act = _C_SCORES * B * a.num_attention_heads * T * T * 4
    act += _C_TOKEN * 4 * _token_floats(a, layer) * tokens
    if a.is_moe_layer(layer) and cpu and nbytes < 4:
        act += 3 * tokens * a.n_routed_experts * a.moe_intermediate_size * nbytes
    return int(act)


def plan_memory(
    args: ModelArgs, cfg: TrainConfig, lanes: int = 1, cpu: bool = True, world: int = 1
) -> MemoryPlan:
    """The memory plan of one optimizer step for these settings (see the module docstring).
    `lanes`: micro-steps run side by side (each keeps its own activations and gradient sum;
    the plan assumes the lanes' activations peak together, an upper bound: measured on tiny
    with 2 lanes, plan / peak 1.0-1.3 depending on how the threads overlap).
    The peak is the larger of two phases: the micro-steps (activations, gradients being
    summed) and the update (a new copy of every parameter and moment in the compiled update,
    one chunk's with --update-chunk-mb)."""
    dtype = "float32" if cfg.dtype == "auto" and cpu else cfg.dtype
    dtype = "bfloat16" if dtype == "auto" else dtype
    nb = _BYTES[dtype]
    mb = nb if cfg.moments_dtype == "auto" else _BYTES[cfg.moments_dtype]
    n, frozen = count_parameters(args)
    B, T = cfg.batch_size, cfg.seq_len
    # a lane's unit: whole micro-batches when accum divides, else row blocks of each
    rows = B if cfg.accum % lanes == 0 else B // lanes
    units_per_lane = cfg.accum // lanes if cfg.accum % lanes == 0 else cfg.accum
    blocks = list(range(args.num_hidden_layers))
    blocks += [args.num_hidden_layers] * args.num_nextn_predict_layers
    per_block = [_block_activations(args, i, rows, T, nb, cpu) for i in blocks]
    depths = 1 + args.num_nextn_predict_layers  # MTP depths run their own [B, T, V] loss
    head = depths * int(rows * T * args.vocab_size * (nb + 4 * _C_HEAD))
    if cfg.grad_checkpoint:
        # each block's input is kept; the blocks are recomputed one at a time in the backward
        # pass (depth-first order, speedups.depth_first_order), after the head's [B, T, vocab]
        # arrays are gone: the larger of the two, not their sum
        kept = len(blocks) * rows * T * args.hidden_size * nb
        activations = {
            "step: activations, kept block inputs": lanes * kept,
            "step: activations, head or one recomputed block": lanes * max(head, max(per_block)),
        }
    else:
        activations = {
            "step: activations, decoder blocks": lanes * sum(per_block),
            "step: activations, [B,T,vocab] head": lanes * head,
        }
    grads = n * nb
    moments = moment_bytes(args, n, mb, cfg.second_moment)
    if cfg.update_chunk_mb > 0:
        largest = max(math.prod(s) for s in _matrix_shapes(args)) * nb
        chunk = _C_UPDATE[cfg.second_moment] * max(cfg.update_chunk_mb * 1e6, largest)
        update = int(min(chunk, n * nb + moments))
    else:
        update = n * nb + moments  # new parameters and moments beside the old
    v = "factored v" if cfg.second_moment == "factored" else "v"
    terms = {
        "parameters": n * nb + frozen * 4,
        f"optimizer moments (AdamW m, {v})": moments,
        "step: gradient sums (per lane)": lanes * grads,
        "step: micro-step gradients": _micro_grads(args, nb, lanes, units_per_lane),
        **activations,
        "update: gradients": grads,
        "update: new parameters/moments": update,
    }
    per_slot = _per_slot_grads(args, rows * T, nb, cpu)
    if per_slot:
        terms["step: per-slot expert gradients"] = lanes * per_slot
    if world > 1:  # the all-reduce concatenates every gradient into one buffer
        terms["update: all-reduce buffer"] = grads
    return MemoryPlan(terms, B, cfg.accum, cfg.grad_checkpoint, lanes)
