"""The optimizer step: compiled micro-steps that sum gradients, one compiled update, the MoE
bias update; optionally spread over parallel CPU lanes.

Lanes (CPU only). MLX's CPU backend runs each stream's operations on one thread; only its BLAS
calls use more cores. On a CPU the step is mostly element-wise work, so a second core sits idle
for most of it. With `lanes` > 1 the step's work is cut into equal units, which run on that many
CPU streams side by side (each stream its own thread, the BLAS given cores // lanes threads):
- accum divisible by lanes: lane j takes micro-batches j, j + lanes, ... (the shapes the loop
  asks for);
- otherwise each micro-batch is cut into `lanes` row blocks (batch_size divisible by lanes).
Every unit's loss is a mean over equally many tokens (and sequences), so the mean of the units'
gradients is the step's gradient whatever the cut; only the order of float32 sums changes.
Each lane sums its own gradients; the lanes' sums are added before the update.

On one lane the micro-steps after the first add their gradients to the sum a group of
parameters at a time (`_add_leafwise`), so a micro-step's whole gradient set is never alive
beside the sum (measured: one gradient set less at the peak, the same parameters bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ._blas import set_blas_threads
from .config import ModelArgs
from .data import Tokenizer
from .loss import LossTerms, loss_terms, summed_cross_entropy, update_bias
from .model import Model
from .optim import clip_by_global_norm, clip_scale, global_norm, make_optimizer, make_schedule
from .train_config import TrainConfig
from .train_state import save_checkpoint

# one lane: micro-steps after the first add their gradients to the sums in groups of about this
# many bytes, each evaluated before the next (Trainer._add_leafwise)
ADD_CHUNK_BYTES = 32_000_000


def auto_lanes(batch_size: int, accum: int) -> int:
    """2 on a Linux CPU with at least 2 cores when the work divides in two, else 1."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return 1
    if (os.cpu_count() or 1) < 2:
        return 1
    return 2 if accum % 2 == 0 or batch_size % 2 == 0 else 1


def lane_units(batches: list, lanes: int) -> list[list]:
    """Cut one step's micro-batches into `lanes` equal lists of equally sized units."""
    if lanes == 1:
        return [list(batches)]
    if len(batches) % lanes == 0:
        return [list(batches[j::lanes]) for j in range(lanes)]
    rows = batches[0].shape[0] // lanes
    return [[b[j * rows : (j + 1) * rows] for b in batches] for j in range(lanes)]


class Trainer:
    """Holds model, optimizer and the compiled step functions for one run."""

    def __init__(
        self,
        cfg: TrainConfig,
        args: ModelArgs,
        model: Model,
        group: mx.distributed.Group | None = None,
        optimizer_state: dict | None = None,
    ) -> None:
        self.cfg, self.args, self.model = cfg, args, model
        self.group = group
        self.world = group.size() if group is not None else 1
        self.schedule = make_schedule(
            cfg.lr, cfg.warmup, cfg.max_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction
        )
        lanes = cfg.lanes or auto_lanes(cfg.batch_size, cfg.accum)
        if lanes > 1 and cfg.accum % lanes and cfg.batch_size % lanes:
            raise ValueError(
                f"lanes {lanes} divides neither accum {cfg.accum} nor batch_size {cfg.batch_size}"
            )
        self.lanes = lanes
        # one lane: micro-steps after the first add their gradients leaf by leaf (no second
        # gradient set, see _add_leafwise); lanes > 1 keep the one compiled add per unit
        self.leafwise = lanes == 1
        self.units = cfg.accum * (1 if cfg.accum % lanes == 0 else lanes)  # gradient units per step
        self.streams = (
            [mx.new_stream(mx.cpu) for _ in range(lanes)]
            if lanes > 1
            else [mx.default_stream(mx.default_device())]
        )
        self.lane_blas_threads = max(
            1, (os.cpu_count() or 1) // lanes
        )  # BLAS threads while lanes run
        moments = None if cfg.moments_dtype == "auto" else getattr(mx, cfg.moments_dtype)
        self.optimizer = make_optimizer(
            self.schedule, cfg.weight_decay, moments_dtype=moments, second_moment=cfg.second_moment
        )
        model.grad_checkpoint = cfg.grad_checkpoint
        self.optimizer.init(model.trainable_parameters())
        if optimizer_state is not None:  # before compiling: the compiled steps capture this state
            self.optimizer.state = optimizer_state
        # Per lane: one function for a lane's first unit (its gradients start the sum) and one
        # that adds to the sum. Separate function objects, so each is traced on its own stream.
        self.micro_fns = [
            (self._compiled(first=True), self._compiled(first=False)) for _ in self.streams
        ]
        update = self._update
        if cfg.update_chunk_mb > 0:
            update = self._update_in_chunks
        elif cfg.compile:
            state = [model.state, self.optimizer.state]
            update = mx.compile(update, inputs=state, outputs=state)
        self.update_fn = update

    def _compiled(self, first: bool) -> Callable:
        model = self.model

        def micro(params: dict, batch: mx.array, *acc: dict) -> tuple[dict, LossTerms]:
            # Functional in the trainable parameters (passed in, not read from the model), so
            # the compiled function writes nothing back into the model: two lanes can run at once.
            def loss(p: dict) -> tuple[mx.array, LossTerms]:
                model.update(p)
                t = loss_terms(model, batch[:, :-1], batch[:, 1:])
                return t.total, t

            (_, terms), grads = mx.value_and_grad(loss)(params)
            return (grads if first else tree_map(mx.add, acc[0], grads)), terms

        if not self.cfg.compile:
            return micro
        # inputs=model.state: the frozen routing bias (which update_bias moves) is read at call time.
        return mx.compile(micro, inputs=model.state)

    def _update(self, acc: dict) -> mx.array:
        prescale = 1.0 / self.units  # the mean over units
        if self.world > 1:  # mean over ranks: all gradients concatenated into one all_sum
            acc = nn.average_gradients(tree_map(lambda g: g * prescale, acc), group=self.group)
            prescale = 1.0
        grads, norm = clip_by_global_norm(acc, self.cfg.grad_clip, prescale)
        self.optimizer.update(self.model, grads)
        return norm

    def _update_in_chunks(self, acc: dict) -> mx.array:
        """The same update as `_update`, applied to about `update_chunk_mb` of parameters at a
        time, each chunk evaluated before the next: the old and new values of only one chunk
        of parameters and moments are alive together, instead of a second copy of all."""
        prescale = 1.0 / self.units
        if self.world > 1:
            acc = nn.average_gradients(tree_map(lambda g: g * prescale, acc), group=self.group)
            prescale = 1.0
        norm = global_norm(acc) * prescale
        scale = clip_scale(norm, self.cfg.grad_clip, prescale)
        mx.eval(norm, scale)
        opts = self.optimizer.optimizers
        steps = [o.state["step"] for o in opts]
        limit, chunk, size = self.cfg.update_chunk_mb * 1e6, [], 0
        flat = tree_flatten(acc)
        for i, (k, g) in enumerate(flat):
            chunk.append((k, g * scale.astype(g.dtype)))
            size += g.nbytes
            if size >= limit or i == len(flat) - 1:
                for o, s in zip(opts, steps):  # every chunk is the same optimizer step
                    o.state["step"] = s
                self.optimizer.update(self.model, tree_unflatten(chunk))
                mx.eval(self.model.parameters(), self.optimizer.state)
                chunk, size = [], 0
        return norm

    def _add_leafwise(self, acc: dict, grad_fn: Callable, params: dict, batch: mx.array):
        """Add one micro-step's gradients to `acc` (in place) a few parameters at a time (about
        ADD_CHUNK_BYTES), last layer first, each group of sums evaluated before the next
        gradients are computed: the backward pass runs in pieces, and only one group's
        gradients are alive beside the sums, not the whole gradient set that evaluating all
        sums at once holds (MLX computes every gradient before the first add). The same
        float32 adds as the compiled sum. Returns the micro-step's loss terms."""
        grads, terms = grad_fn(params, batch)
        self.model.update(params)  # a trace leaves its placeholders in the model
        flat = tree_flatten(grads)
        del grads  # `flat` holds the only references: each gradient is freed once added
        group, size = [terms], 0  # the loss terms come with the first group
        while flat:
            path, g = flat.pop()
            *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
            node = acc
            for k in keys:
                node = node[k]
            node[last] = node[last] + g
            group.append(node[last])
            size += g.nbytes
            del g
            if size >= ADD_CHUNK_BYTES or not flat:
                mx.eval(group)
                group, size = [], 0
        return terms

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.world > 1 else x

    def _gradients(self, batches: list[mx.array]) -> tuple[dict, mx.array, Any, mx.array]:
        """Summed gradients, summed loss terms [4], expert counts and dropped slots of one step."""
        params = self.model.trainable_parameters()
        work = lane_units(batches, self.lanes)
        accs: list = [None] * self.lanes
        sums, counts, dropped = mx.zeros((4,)), None, mx.array(0)
        threads = set_blas_threads(self.lane_blas_threads) if self.lanes > 1 else None
        try:
            for i in range(len(work[0])):
                terms = []
                for j, stream in enumerate(
                    self.streams
                ):  # queue every lane's unit, then run them together
                    first, more = self.micro_fns[j]
                    with mx.stream(stream):
                        if accs[j] is None:
                            accs[j], t = first(params, work[j][i])
                        elif self.leafwise:
                            t = self._add_leafwise(accs[j], first, params, work[j][i])
                        else:
                            accs[j], t = more(params, work[j][i], accs[j])
                    self.model.update(
                        params
                    )  # a trace leaves its placeholders in the model: put the arrays back
                    terms.append(t)
                mx.eval(accs, terms)
                for t in terms:
                    sums = sums + mx.stack([t.total, t.ce, t.balance, t.mtp])
                    counts = t.counts if counts is None else counts + t.counts
                    dropped = dropped + t.dropped
        finally:
            if threads is not None:
                set_blas_threads(threads)
        acc = accs[0]
        for other in accs[1:]:
            acc = tree_map(mx.add, acc, other)
        return acc, sums, counts, dropped

    def step(self, batches: list[mx.array]) -> dict[str, Any]:
        """One optimizer step over `accum` micro-batches; returns metrics (summed over ranks)."""
        acc, sums, counts, dropped = self._gradients(batches)
        norm = self.update_fn(acc)
        reduced = self.all_sum(
            mx.concatenate(
                [sums, dropped.reshape(1).astype(mx.float32), counts.reshape(-1).astype(mx.float32)]
            )
        )
        counts = reduced[5:].reshape(counts.shape)
        update_bias(self.model, counts)
        mx.eval(self.model.state, self.optimizer.state, norm, reduced)
        n = self.units * self.world
        total, ce, bal, mtp = (reduced[:4] / n).tolist()
        out = {"loss": total, "ce": ce, "ppl": math.exp(min(ce, 50.0)), "grad_norm": norm.item()}
        if counts.size:
            c = np.array(counts)
            load = c.max(-1) / np.maximum(c.mean(-1), 1e-9)
            out.update(
                balance=bal,
                expert_load_max_over_mean=float(load.max()),
                expert_load=[round(float(v), 4) for v in load],
            )
            if self.args.capacity_factor > 0:
                out["dropped_fraction"] = float(reduced[4].item() / max(1.0, c.sum()))
        if self.args.num_nextn_predict_layers:
            out["mtp"] = mtp
        return out

    def evaluate(self, batches: list[np.ndarray]) -> dict[str, float]:
        """Token-weighted mean CE on fixed validation batches (capacity dropping off)."""
        tot, n = summed_cross_entropy(self.model, batches)
        self.model.train()
        vals = self.all_sum(mx.stack([tot, mx.array(float(n))]))
        val_ce = (vals[0] / vals[1]).item()
        return {"val_ce": val_ce, "val_ppl": math.exp(min(val_ce, 50.0))}

    # ---------------------------------------------------------------- persistence
    def save(self, out: Path, tok: Tokenizer, step: int) -> None:
        """One whole checkpoint of this run in `out` (see train_state.py)."""
        opt = dict(tree_flatten(self.optimizer.state))
        state = {
            "step": step,
            "train_config": dataclasses.asdict(self.cfg),
            "world_size": self.world,
        }
        save_checkpoint(out, self.model, tok, opt, state, keep=self.cfg.keep)
