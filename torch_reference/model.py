"""PyTorch twin of `mlx_model`: the same DeepSeek-style model, written plainly for reading.

It is the numerical reference for the parity tests (run it in float64 on the CPU) and a way to
use a checkpoint from PyTorch (`tools.convert`). Same class names, same module attribute names,
so `state_dict()` keys equal the MLX `tree_flatten(model.parameters())` keys with no mapping
table (SPEC section 2): routed experts are stacked [E, out, in] under
`...mlp.experts.{gate,up,down}_proj.weight`. RoPE tables and masks are computed, never stored.
The routing bias `e_score_correction_bias` is a persistent buffer: saved, never trained.
No KV cache: the twin runs full sequences only (cached decoding is checked MLX vs MLX).

Shapes: B batch, T tokens, D hidden, H heads, E routed experts, k experts per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlx_model.config import ModelArgs


def default_device() -> torch.device:
    """MPS when available (Apple silicon), else the CPU. float64 needs the CPU."""
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------- RoPE
def rope_angles(
    args: ModelArgs, T: int, offset: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim / 2] for positions offset .. offset+T-1 (angles in float64)."""
    d = args.rope_dim
    inv_freq = args.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # [T, d/2]
    cos, sin = angles.cos().to(like.dtype), angles.sin().to(like.dtype)  # cast, then move (MPS)
    return cos.to(like.device), sin.to(like.device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [..., T, d] by the angles of cos/sin [T, d/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [..., T, d/2] each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [..., T, d/2, 2]
    return out.flatten(-2)


# --------------------------------------------------------------------------- masks
def causal_mask(T: int, offset: int = 0) -> torch.Tensor:
    """[T, offset+T] bool, True = may attend: query i (at position offset+i) sees keys <= it."""
    keys = torch.arange(offset + T)
    return keys[None, :] <= (torch.arange(T) + offset)[:, None]


def attention_mask(T: int, offset: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Causal mask [1, 1, T, S], or [B, 1, T, S] hiding pad[b] left-padding keys of row b;
    a padding query still sees itself, so no softmax row is entirely masked."""
    mask = causal_mask(T, offset)[None, None]
    if pad is not None:
        keys = torch.arange(offset + T)
        not_pad = keys[None, :] >= pad[:, None].cpu()  # [B, S]
        self_key = keys[None, :] == (torch.arange(T) + offset)[:, None]  # [T, S]
        mask = (mask & not_pad[:, None, None, :]) | self_key[None, None]
    return mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T * scale) v; q [B,H,L,d], k [B,1|H,S,d], v [B,1|H,S,dv] -> [B,H,L,dv].
    Masked scores get the dtype's lowest finite value, so a fully masked row stays finite."""
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, L, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------- small layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(args: ModelArgs, dim: int) -> nn.Module:
    """RMSNorm (DeepSeek) or LayerNorm with bias, eps 1e-5 (the seed)."""
    if args.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=1e-5)
    return RMSNorm(dim, args.rms_norm_eps)


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------- attention
class MLA(nn.Module):
    """Multi-head Latent Attention, naive form: keys and values expanded from the latent."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, D, r = args.num_attention_heads, args.hidden_size, args.kv_lora_rank
        d_n, d_r, d_v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.scale = args.softmax_scale
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (d_n + d_r), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * (d_n + d_r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, r + d_r, bias=False)
        self.kv_a_layernorm = RMSNorm(r, 1e-6)
        self.kv_b_proj = nn.Linear(r, H * (d_n + d_v), bias=False)
        self.o_proj = nn.Linear(H * d_v, D, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.args
        B, T, _ = x.shape
        H, d_n, d_r, d_v = (
            a.num_attention_heads,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
        )
        if a.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, d_n + d_r).transpose(1, 2)  # [B, H, T, d_n + d_r]
        q_nope, q_rope = q.split([d_n, d_r], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, d_r], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]; only c_kv is normalised
        cos, sin = rope_angles(a, T, 0, x)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, None], cos, sin)  # [B, 1, T, d_r]: one head shared by all
        kv = self.kv_b_proj(latent).view(B, T, H, d_n + d_v).transpose(1, 2)  # [B, H, T, d_n+d_v]
        k_nope, v = kv.split([d_n, d_v], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, d_r)], dim=-1)  # [B, H, T, d_n + d_r]
        out = attend(torch.cat([q_nope, q_rope], dim=-1), k, v, self.scale, mask)  # [B, H, T, d_v]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * d_v))


class MQA(nn.Module):
    """The seed's multi-query attention: H query heads, one shared K/V head, RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, hd, bias=False)
        self.v_proj = nn.Linear(D, hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = (
            self.q_proj(x).view(B, T, self.args.num_attention_heads, -1).transpose(1, 2)
        )  # [B, H, T, hd]
        k = self.k_proj(x)[:, None]  # [B, 1, T, hd]
        v = self.v_proj(x)[:, None]
        cos, sin = rope_angles(self.args, T, 0, x)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.scale, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# ------------------------------------------------------------------------- routing
class Routing(NamedTuple):
    scores: torch.Tensor  # [B, T, E] unbiased scores s
    indices: torch.Tensor  # [B, T, k] chosen experts, best first
    counts: torch.Tensor  # [E] tokens that chose each expert (before capacity dropping)
    dropped: torch.Tensor  # [] (token, expert) slots dropped by capacity


def select_experts(logits: torch.Tensor, bias: torch.Tensor, args: ModelArgs):
    """logits [..., E] -> (weights [..., k], indices [..., k], scores [..., E]).
    Select by top-k of s + b (group-limited), weight by the unbiased s."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # never below float32
    scores = logits.sigmoid() if args.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + bias.to(scores.dtype)
    E, k, G = args.n_routed_experts, args.num_experts_per_tok, args.n_group
    if G > 1 and args.topk_group < G:
        grouped = choice.view(*choice.shape[:-1], G, E // G)  # [..., G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [..., G]: top-2 sum per group
        kept = group_score.topk(args.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score).scatter(-1, kept, 1.0)
        # masked groups get -inf (DeepSeek-V3 inference/model.py Gate.forward; transformers 5.24)
        choice = grouped.masked_fill(keep[..., None] == 0, float("-inf")).flatten(-2)
    indices = choice.topk(k, dim=-1).indices  # sorted, best first
    weights = scores.gather(-1, indices)
    if args.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * args.routed_scaling_factor, indices, scores


def capacity_keep(indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    """indices [B, T, k] -> keep [B, T, k]: each expert takes at most ceil(cf * k * T / E)
    (token, slot) pairs per sequence, in order of position, then rank within the token."""
    B, T, k = indices.shape
    cap = math.ceil(capacity_factor * k * T / n_experts)
    onehot = F.one_hot(indices.reshape(B, T * k), n_experts)  # [B, T*k, E]
    place = onehot.cumsum(dim=1) * onehot  # 1-based place in the expert's queue
    return (place.sum(-1) <= cap).view(B, T, k)


class StackedLinear(nn.Module):
    """E linear maps as one weight [E, out, in], named `.weight` like the MLX twin."""

    def __init__(self, n: int, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim_out, dim_in))


class Experts(nn.Module):
    """Routed SwiGLU experts; each expert runs on the tokens that chose it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """x [N, D], weights/indices [N, k] -> [N, D]."""
        y = torch.zeros_like(x)
        for e in range(self.gate_proj.weight.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            h = x[token]
            h = F.silu(F.linear(h, self.gate_proj.weight[e])) * F.linear(h, self.up_proj.weight[e])
            out = F.linear(h, self.down_proj.weight[e]) * weights[token, slot, None].to(x.dtype)
            y = y.index_add(0, token, out)
        return y


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        # A buffer: saved with the weights, no gradient, not seen by the optimizer.
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def forward(self, x: torch.Tensor):
        return select_experts(F.linear(x, self.weight), self.e_score_correction_bias, self.args)


class MoE(nn.Module):
    """Routed experts (top-k of E) plus always-on shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = MoEGate(args)
        self.experts = Experts(args)
        if args.n_shared_experts > 0:
            self.shared_experts = MLP(
                args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
            )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        a = self.args
        B, T, D = x.shape
        weights, indices, scores = self.gate(x)
        dropped = indices.new_zeros(())
        if a.capacity_factor > 0 and self.training:
            keep = capacity_keep(indices, a.n_routed_experts, a.capacity_factor)
            dropped = (~keep).sum()
            weights = weights * keep  # a dropped slot keeps only the residual path
        y = self.experts(
            x.reshape(B * T, D), weights.reshape(B * T, -1), indices.reshape(B * T, -1)
        )
        y = y.view(B, T, D)
        if a.n_shared_experts > 0:
            y = y + self.shared_experts(x)
        counts = torch.bincount(indices.flatten(), minlength=a.n_routed_experts)
        return y, Routing(scores, indices, counts, dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]


# -------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = MLA(args) if args.attention_type == "mla" else MQA(args)
        self.mlp = (
            MoE(args) if args.is_moe_layer(layer) else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = make_norm(args, args.hidden_size)
        self.post_attention_layernorm = make_norm(args, args.hidden_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Routing | None]:
        h = x + self.self_attn(self.input_layernorm(x), mask)
        y = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            out, routing = self.mlp.route(y)
            return h + out, routing
        return h + self.mlp(y), None


class DecoderStack(nn.Module):
    """`model.*`: embedding, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([Block(args, i) for i in range(args.num_hidden_layers)])
        self.norm = make_norm(args, args.hidden_size)


class MTPModule(nn.Module):
    """Multi-token prediction depth k: Block(eh_proj([hnorm(h_{k-1}); enorm(emb(t_{i+k}))]))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.enorm = make_norm(args, D)
        self.hnorm = make_norm(args, D)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(args, args.num_hidden_layers)
        self.norm = make_norm(args, D)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.model = DecoderStack(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.num_nextn_predict_layers > 0:
            self.mtp = nn.ModuleList(
                [MTPModule(args) for _ in range(args.num_nextn_predict_layers)]
            )
        init_weights(self, args)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None):
        """inputs [B, T] ids -> (logits [B, T, V], last hidden state before the final norm
        [B, T, D], routing of each MoE layer). mask None = causal; else bool [B|1, 1, T, T]."""
        T = inputs.shape[1]
        mask = attention_mask(T) if mask is None else mask
        h = self.model.embed_tokens(inputs)
        routing = []
        for layer in self.model.layers:
            h, r = layer(h, mask)
            if r is not None:
                routing.append(r)
        return self.lm_head(self.model.norm(h)), h, routing

    def mtp_forward(self, hidden: torch.Tensor, inputs: torch.Tensor):
        """Depth k at position i sees h_{k-1}[i] and token t_{i+k}, predicts t_{i+k+1}.
        Returns logits [B, T-k, V] per depth and the MTP blocks' routing."""
        logits, routing = [], []
        h = hidden
        for k, m in enumerate(self.mtp, start=1):
            T = h.shape[1] - 1
            e = m.enorm(self.model.embed_tokens(inputs[:, k:]))  # t_{i+k}
            h = m.eh_proj(torch.cat([m.hnorm(h[:, :T]), e], dim=-1))
            h, r = m.block(h, attention_mask(T))
            if r is not None:
                routing.append(r)
            logits.append(self.lm_head(m.norm(h)))
        return logits, routing


@torch.no_grad()
def init_weights(model: Model, args: ModelArgs) -> None:
    """As the MLX twin: Normal(0, init_std) for matrices and embeddings, output projections
    (o_proj, down_proj) scaled by 1/sqrt(2 * layers); norms 1 (and 0); routing bias 0."""
    out_std = args.init_std / (2 * args.num_hidden_layers) ** 0.5
    for name, p in model.named_parameters():
        if p.ndim < 2 or "norm" in name:
            continue
        p.normal_(0.0, out_std if ("o_proj" in name or "down_proj" in name) else args.init_std)
