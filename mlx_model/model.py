"""The DeepSeek-style decoder: pre-norm blocks of attention + (dense MLP | DeepSeekMoE).

Module attribute names give the Hugging Face `deepseek_v3` weight names (SPEC section 2):
`model.embed_tokens`, `model.layers.{i}.self_attn.*`, `model.layers.{i}.mlp.*`, `model.norm`,
`lm_head`. Routed experts are stacked ([E, out, in]); the checkpoint module unstacks them.
Optional multi-token prediction modules live under `mtp.{k}` (SPEC section 5).
The model returns logits; losses live in the training code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .attention import Mask, make_attention
from .config import ModelArgs
from .layers import MLP, make_norm
from .moe import MoE, Routing


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = make_attention(args)
        self.mlp = (
            MoE(args) if args.is_moe_layer(layer) else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = make_norm(args, args.hidden_size)
        self.post_attention_layernorm = make_norm(args, args.hidden_size)

    def __call__(
        self, x: mx.array, mask: Mask, cache: Any = None, at: Any = None
    ) -> tuple[mx.array, Routing | None]:
        """x [B, L, D] -> [B, L, D]; with `at` (a scalar array) every row enters the cache but
        only row `at` goes on (mask: that row's [B, 1, 1, S]) -> [B, 1, D]."""
        a = self.self_attn(self.input_layernorm(x), mask, cache, at)
        h = (x if at is None else mx.take(x, at.reshape(1), axis=1)) + a
        y = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            out, routing = self.mlp.route(y)
            return h + out, routing
        return h + self.mlp(y), None


def recomputed(fn: Callable[[dict, mx.array], tuple]) -> Callable[[dict, mx.array], tuple]:
    """fn(params, x) -> tuple of float arrays, whose backward pass recomputes fn's activations
    from (params, x) instead of keeping them (activation checkpointing); gradients as fn's.

    Two orderings, which `mx.checkpoint` lacks: the recomputation waits for the outputs'
    cotangents, and x's cotangent waits for the parameters' gradients. Without the second,
    MLX's breadth-first evaluation order leaves every block's weight-gradient products (the
    arrays nearest the graph's outputs) to the end, keeping all blocks' recomputed activations
    alive at once. Measured (issue 14, small, batch 8, one compiled step at the CLI's graph
    width 1000): peak 304 MB unchecked, 284 MB with mx.checkpoint, 222 MB with this; with
    depth-first order (speedups.depth_first_order, which --grad-checkpoint sets) 186-190 MB
    with either."""

    @mx.custom_function
    def run(params: dict, x: mx.array) -> tuple:
        return fn(params, x)

    @run.vjp
    def run_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple:
        params, x = primals
        names, leaves = zip(*tree_flatten(params))
        *leaves, x = mx.depends([*leaves, x], list(cotangents))

        def flat(*arrays: mx.array) -> tuple:
            return fn(tree_unflatten(list(zip(names, arrays[:-1]))), arrays[-1])

        _, grads = mx.vjp(flat, [*leaves, x], list(cotangents))
        *dparams, dx = grads
        (dx,) = mx.depends([dx], dparams)
        return tree_unflatten(list(zip(names, dparams))), dx

    return run


def checkpointed(block: Block, x: mx.array, mask: Mask) -> tuple[mx.array, Routing | None]:
    """block(x, mask) under `recomputed`: only the block's input is kept for the backward
    pass, which runs the block's forward again (activation checkpointing, training only).
    The block's parameters are explicit inputs, so their gradients flow as without it."""

    def run(params: dict, x: mx.array) -> tuple[mx.array, ...]:
        own = block.trainable_parameters()
        block.update(params)
        try:
            y, r = block(x, mask)
        finally:
            block.update(own)  # the backward pass's recomputed parameters do not stay
        if r is None:
            return (y,)
        # integer outputs (indices, counts) leave as float32: the backward pass takes a
        # cotangent per output, which integer arrays do not get
        return (y, r.scores, *(a.astype(mx.float32) for a in r[1:]))

    out = recomputed(run)(block.trainable_parameters(), x)
    if len(out) == 1:
        return out[0], None
    ints = (mx.stop_gradient(a).astype(mx.int32) for a in out[2:])
    return out[0], Routing(out[1], *ints)


class DecoderStack(nn.Module):
    """`model.*`: embedding, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = make_norm(args, args.hidden_size)


class MTPModule(nn.Module):
    """Multi-token prediction depth k: h_k = Block(eh_proj([hnorm(h_{k-1}); enorm(emb(t_{i+k}))]))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.enorm = make_norm(args, D)
        self.hnorm = make_norm(args, D)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(args, args.num_hidden_layers)
        self.norm = make_norm(args, D)


def attention_mask(T: int, offset: int = 0, pad: mx.array | None = None) -> Mask:
    """Causal mask for T new tokens after `offset` cached ones, optionally hiding left padding.

    pad: [B] number of left-padding tokens per row. Returns "causal" (fused) when no padding
    needs masking, else a boolean [B, 1, T, offset + T] (True = may attend).
    """
    if pad is None:
        return "causal" if T > 1 else None
    S = offset + T
    keys = mx.arange(S)
    queries = mx.arange(T) + offset
    causal = keys[None, :] <= queries[:, None]  # [T, S]
    not_pad = keys[None, :] >= pad[:, None]  # [B, S]
    # A padding query still sees itself, so no softmax row is entirely masked.
    self_key = keys[None, :] == queries[:, None]  # [T, S]
    return (causal[None, None] & not_pad[:, None, None, :]) | self_key[None, None]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.model = DecoderStack(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.num_nextn_predict_layers > 0:
            self.mtp = [MTPModule(args) for _ in range(args.num_nextn_predict_layers)]
        init_weights(self, args)
        self.grad_checkpoint = False  # training: recompute each block's activations (backward)

    def _run_block(self, layer: Block, h: mx.array, mask: Mask, cache: Any = None) -> tuple:
        """One decoder block, checkpointed when `grad_checkpoint` is on (and no cache)."""
        if self.grad_checkpoint and cache is None:
            return checkpointed(layer, h, mask)
        return layer(h, mask, cache)

    def forward(
        self, inputs: mx.array, cache: list | None = None, mask: Mask | bool = True
    ) -> tuple[mx.array, mx.array, list[Routing]]:
        """inputs [B, T] ids -> (logits [B, T, V], last hidden state before the final norm
        [B, T, D], routing statistics of each MoE layer). mask=True builds the causal mask."""
        T = inputs.shape[1]
        if mask is True:
            mask = attention_mask(T)
        h = self.model.embed_tokens(inputs)
        routing = []
        for i, layer in enumerate(self.model.layers):
            h, r = self._run_block(layer, h, mask, cache[i] if cache is not None else None)
            if r is not None:
                routing.append(r)
        return self.lm_head(self.model.norm(h)), h, routing

    def __call__(
        self, inputs: mx.array, cache: list | None = None, mask: Mask | bool = True
    ) -> mx.array:
        """inputs [B, T] token ids -> logits [B, T, vocab]."""
        return self.forward(inputs, cache, mask)[0]

    def mtp_forward(
        self, hidden: mx.array, inputs: mx.array
    ) -> tuple[list[mx.array], list[Routing]]:
        """MTP logits for depths k = 1..D from the main model's last hidden state.

        Depth k at position i sees h_{k-1}[i] and token t_{i+k} and predicts t_{i+k+1}; its
        sequence is k shorter. Returns logits [B, T-k, V] per depth and their routing.
        """
        logits, routing = [], []
        h = hidden
        for k in range(len(self.mtp)):
            T = h.shape[1] - 1
            out, h, r = self.mtp_block(k, h[:, :T], inputs[:, k + 1 :])
            if r is not None:
                routing.append(r)
            logits.append(out)
        return logits, routing

    def mtp_block(
        self,
        k: int,
        hidden: mx.array,
        tokens: mx.array,
        cache: Any = None,
        mask: Mask | bool = True,
        at: Any = None,
    ) -> tuple[mx.array, mx.array, Routing | None]:
        """MTP module k (0-based) on hidden [B, T, D] beside the tokens one ahead [B, T]:
        (logits [B, T, V], its hidden state before the norm [B, T, D], routing). With a cache,
        it decodes (speculative drafting; see mlx_model/speculative.py); `at` (with a cache):
        all T positions enter the cache, only position `at` is computed on (T becomes 1)."""
        m = self.mtp[k]
        if mask is True:
            mask = attention_mask(tokens.shape[1])
        e = m.enorm(self.model.embed_tokens(tokens))
        h = m.eh_proj(mx.concatenate([m.hnorm(hidden), e], axis=-1))
        if at is not None:
            h, r = m.block(h, mask, cache, at)
        else:
            h, r = self._run_block(m.block, h, mask, cache)
        return self.lm_head(m.norm(h)), h, r

    @property
    def layers(self) -> list:
        return self.model.layers


def init_weights(model: Model, args: ModelArgs) -> None:
    """Normal(0, init_std) for every matrix and embedding; norms stay 1/0; routing bias 0.
    Output projections (o_proj, down_proj) are scaled by 1/sqrt(2 * layers), as in GPT-2."""
    std = args.init_std
    out_std = std / (2 * args.num_hidden_layers) ** 0.5
    new = []
    for name, p in tree_flatten(model.parameters()):
        if p.ndim < 2 or "norm" in name:
            continue
        s = out_std if ("o_proj" in name or "down_proj" in name) else std
        new.append((name, mx.random.normal(p.shape, dtype=p.dtype) * s))
    model.update(tree_unflatten(new))
