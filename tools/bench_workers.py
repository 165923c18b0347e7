"""The worker side of `python -m tools.bench`: one contender per process (see tools/bench.py).

Each worker builds its contender from the shared checkpoint, warms it up, then answers `run`
(one timed step) and `quit` (final figures: peak memory, tokens, cache bytes) lines on stdin
with one JSON line each. What is measured inside a process (memory, BLAS, CPU model, FLOPs) is in
tools/bench_measure.py; the coordinator's process handling in tools/bench_procs.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench_measure import blas_label, max_rss_bytes, rss_bytes


def _random_ids(vocab: int, shape: tuple, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _mlx_peak(device_gpu: bool) -> int | None:
    import mlx.core as mx

    return int(mx.get_peak_memory()) if device_gpu else None


def make_checkpoint(preset: str, out: str, overrides: dict) -> Any:
    """A random model of `preset` (+ overrides), seed 0, saved to `out` (the contenders' shared
    checkpoint); returns the model."""
    import mlx.core as mx

    from mlx_model.checkpoint import save_model
    from mlx_model.model import Model
    from mlx_model.presets import preset as get_preset

    args = get_preset(preset).replace(**overrides)
    mx.random.seed(0)
    model = Model(args)
    save_model(out, model)
    return model


class TrainWorker:
    """Builds one contender from the checkpoint; `run()` times one optimizer step."""

    def __init__(self, name: str, ckpt: str, spec: dict):
        self.name, self.spec = name, spec
        B, T, A = spec["batch_size"], spec["seq_len"], spec["accum"]
        with open(os.path.join(ckpt, "config.json")) as f:
            self.config = json.load(f)
        vocab = self.config["vocab_size"]
        self.ids = [_random_ids(vocab, (B, T + 1), 1000 + m) for m in range(A)]
        getattr(self, "_build_" + name)(ckpt)

    # ours ---------------------------------------------------------------------------
    def _build_mlx_model(self, ckpt: str) -> None:
        import mlx.core as mx

        from mlx_model.checkpoint import load_model
        from mlx_model.train import pick_dtype
        from mlx_model.train_config import TrainConfig
        from mlx_model.trainer import Trainer

        s = self.spec
        cfg = TrainConfig(
            preset=s["preset"],
            batch_size=s["batch_size"],
            seq_len=s["seq_len"],
            accum=s["accum"],
            dtype=s["dtype"],
            max_steps=1000,
            warmup=10,
            progress=False,
            lanes=s.get("lanes", 0),
            grad_checkpoint=s.get("grad_checkpoint", False),
            moments_dtype=s.get("moments_dtype", "auto"),
            second_moment=s.get("second_moment", "full"),
            update_chunk_mb=s.get("update_chunk_mb", 0.0),
        )
        model = load_model(ckpt, dtype=pick_dtype(cfg.dtype))
        if s.get("dispatch"):
            for layer in model.layers:
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.experts.dispatch = s["dispatch"]
        model.train()
        self.trainer = Trainer(cfg, model.args, model)
        self.batches = [mx.array(b) for b in self.ids]
        self.gpu = mx.default_device() == mx.gpu

    def _run_mlx_model(self) -> None:
        self.trainer.step(self.batches)

    def _build_mlx_dense(self, ckpt: str) -> None:
        """Our trainer on the dense baseline of the same active parameters (every layer dense,
        as the `small-dense` preset is to `small`), from seeded random weights."""
        import tempfile

        import mlx.core as mx

        from mlx_model.checkpoint import load_args, save_model
        from mlx_model.model import Model
        from mlx_model.presets import dense_baseline

        mx.random.seed(0)
        self._dense_dir = tempfile.TemporaryDirectory(prefix="bench-dense-")
        save_model(self._dense_dir.name, Model(dense_baseline(load_args(ckpt))))
        self._build_mlx_model(self._dense_dir.name)

    _run_mlx_dense = _run_mlx_model

    # the PyTorch twin ---------------------------------------------------------------
    def _build_torch_reference(self, ckpt: str) -> None:
        import numpy as np
        import torch

        from mlx_model.checkpoint import load_args, read_safetensors
        from mlx_model.hf import stack_experts
        from torch_reference.loss import loss_terms, make_optimizer, update_bias
        from torch_reference.model import Model

        torch.set_num_threads(os.cpu_count() or 1)
        args = load_args(ckpt)
        torch.manual_seed(0)
        self.model = Model(args)
        w = stack_experts(
            read_safetensors(Path(ckpt) / "model.safetensors"), lambda xs: np.stack(xs)
        )
        self.model.load_state_dict(
            {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in w.items()}
        )
        self.model.train()
        self.opt = make_optimizer(self.model, 1e-3)
        self.loss_terms, self.update_bias = loss_terms, update_bias
        self.batches = [torch.from_numpy(b.astype(np.int64)) for b in self.ids]
        self.torch = torch
        self.gpu = False

    def _run_torch_reference(self) -> None:
        torch, A = self.torch, len(self.batches)
        counts = None
        for b in self.batches:
            t = self.loss_terms(self.model, b[:, :-1], b[:, 1:])
            (t.total / A).backward()
            counts = t.counts if counts is None else counts + t.counts
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if counts is not None and counts.numel():
            self.update_bias(self.model, counts)

    # mlx-lm ---------------------------------------------------------------------------
    def _build_mlx_lm(self, ckpt: str) -> None:
        from functools import partial

        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map
        from mlx_lm.tuner.trainer import default_loss
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(ckpt))  # sanitize + load_weights (strict)
        model.train()
        if self.spec.get("grad_checkpoint"):  # mlx-lm's own --grad-checkpoint
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        optimizer = optim.AdamW(learning_rate=1e-3, betas=[0.9, 0.95], weight_decay=0.1)
        loss_value_and_grad = nn.value_and_grad(model, default_loss)
        state = [model.state, optimizer.state, mx.random.state]
        A = self.spec["accum"]

        @partial(mx.compile, inputs=state, outputs=state)  # as mlx_lm.tuner.trainer.train
        def step(batch, lengths, prev_grad, do_update):
            (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                if A > 1:
                    grad = tree_map(lambda x: x / A, grad)
                optimizer.update(model, grad)
                grad = None
            return lvalue, toks, grad

        B, T = self.spec["batch_size"], self.spec["seq_len"]
        self.lengths = mx.array([[0, T]] * B)
        self.batches = [mx.array(b) for b in self.ids]
        self.step_fn, self.lm_state, self.mx = step, state, mx
        self.gpu = mx.default_device() == mx.gpu

    def _run_mlx_lm(self) -> None:
        grad = None
        for i, b in enumerate(self.batches):
            lvalue, toks, grad = self.step_fn(b, self.lengths, grad, i == len(self.batches) - 1)
            self.mx.eval(lvalue, toks, grad, self.lm_state)

    def run(self) -> None:
        getattr(self, "_run_" + self.name)()


class PeakWorker:
    """Times a float32 matmul (n x n) with MLX on its default device and, on CPU, with torch."""

    def __init__(self, name: str, ckpt: str, spec: dict, n: int = 2048):
        import mlx.core as mx

        self.mx, self.n = mx, n
        self.a, self.b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(self.a, self.b)
        self.torch = None
        self.gpu = mx.default_device() == mx.gpu
        if not self.gpu:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            self.torch, self.ta, self.tb = torch, torch.randn(n, n), torch.randn(n, n)
        self.run()

    def run(self) -> dict:
        mx, reps, out = self.mx, 4, {}
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(self.a @ self.b)
        out["mlx"] = 2 * self.n**3 * reps / (time.perf_counter() - t)
        if self.torch is not None:
            t = time.perf_counter()
            for _ in range(reps):
                self.ta @ self.tb
            out["torch"] = 2 * self.n**3 * reps / (time.perf_counter() - t)
        return out


class GenerateWorker:
    """Greedy generation at batch 1 from a fixed random prompt; `run()` returns decode tokens/s."""

    def __init__(self, name: str, ckpt: str, spec: dict):
        import mlx.core as mx

        self.mx, self.name, self.spec = mx, name, spec
        with open(os.path.join(ckpt, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        self.prompt = _random_ids(vocab, (spec["prompt_len"],), 7).tolist()
        self.gpu = mx.default_device() == mx.gpu
        if name == "mlx_model":
            from mlx_model.checkpoint import load_model

            self.model = load_model(ckpt)
        else:
            from mlx_lm.utils import load_model

            self.model, _ = load_model(Path(ckpt))
            self.tokenizer = _word_tokenizer(vocab)
        self.model.eval()
        self.tokens: list[int] = []
        self.cache_bytes = 0

    def run(self) -> dict:
        n = self.spec["new_tokens"]
        if self.name == "mlx_model":
            from mlx_model.engine import Engine, Stats
            from mlx_model.sampling import SamplingParams

            stats = Stats()
            params = SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0)
            engine = Engine(self.model)
            self.tokens = [t[0] for t in engine.decode([self.prompt], params, stats)]
            self.cache_bytes = stats.cache_bytes_per_token
            return {"tokens_per_s": stats.generated_tokens / stats.generate_time}
        from mlx_lm.generate import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        mx = self.mx
        cache = make_prompt_cache(self.model)
        last, toks = None, []
        for r in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(self.prompt),
            max_tokens=n,
            sampler=lambda logp: mx.argmax(logp, axis=-1),
            prompt_cache=cache,
        ):
            last = r
            toks.append(int(r.token))
        self.tokens = toks
        # bytes per cached position (their buffers grow in steps: count one position's worth)
        self.cache_bytes = sum(
            a.nbytes // a.shape[2] for c in cache for a in (c.keys, c.values) if a is not None
        )
        return {"tokens_per_s": last.generation_tps}


def _word_tokenizer(vocab: int) -> Any:
    """A real Hugging Face tokenizer over the ids ("t0".."t{V-1}", word-level, no eos), so
    mlx-lm's stream_generate detokenizes as usual and never stops early."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tk))


def speed_setup(name: str, spec: dict) -> None:
    """The speed set-up `mlx_model.train` makes, in a contender's process before it imports
    mlx.core: `enable_for_cli()`, and depth-first graph order for our model with
    --grad-checkpoint. Torch's process keeps its own BLAS and OpenMP only."""
    if name == "torch_reference":
        return
    from mlx_model.speedups import depth_first_order, enable_for_cli

    enable_for_cli()
    if name == "mlx_model" and spec.get("grad_checkpoint"):
        depth_first_order()


def worker_main(kind: str, name: str, ckpt: str, spec_json: str, cls: Any = None) -> None:
    """A contender's process: build, warm up, then answer `run` / `quit` lines on stdin.
    `cls` builds the contender (default: by kind and name)."""
    spec = json.loads(spec_json)
    speed_setup(name, spec)
    import importlib

    # Import each contender's libraries before the memory baseline: they are not its footprint.
    for mod in {
        "torch_reference": ["torch", "torch_reference.loss"],
        "peak": ["torch", "mlx.core"],
        "mlx_model": ["mlx.core", "mlx_model.train", "mlx_model.engine"],
        "mlx_dense": ["mlx.core", "mlx_model.train", "mlx_model.engine"],
        "mlx_lm": ["mlx.core", "mlx_lm.utils", "mlx_lm.generate", "mlx_lm.tuner.trainer"],
    }[name]:
        importlib.import_module(mod)
    base = rss_bytes()
    if cls is None:
        cls = PeakWorker if name == "peak" else (TrainWorker if kind == "train" else GenerateWorker)
    t = time.perf_counter()
    w = cls(name, ckpt, spec)
    for _ in range(spec.get("warmup", 2) if name != "peak" else 0):
        w.run()
    out = sys.stdout
    label = blas_label(name)
    trainer = getattr(w, "trainer", None)
    if trainer is not None and trainer.lanes > 1:
        label += f" (training: {trainer.lanes} CPU lanes, {trainer.lane_blas_threads} BLAS thread(s) each)"
    out.write(json.dumps({"ready": time.perf_counter() - t, "blas": label}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip() == "run":
            t, cpu = time.perf_counter(), time.process_time()
            res = w.run() or {}
            res["seconds"] = time.perf_counter() - t
            res["cpu_seconds"] = time.process_time() - cpu  # all of the process's threads
            out.write(json.dumps(res) + "\n")
        else:
            gpu_peak = _mlx_peak(True) if getattr(w, "gpu", False) else None
            # A worker that samples its own resident set (after each run) reports that peak:
            # ru_maxrss starts at the coordinator's size when the coordinator is large.
            cpu_peak = getattr(w, "peak_rss", None) or max_rss_bytes()
            final = {
                "peak_memory_bytes": gpu_peak if gpu_peak else cpu_peak - base,
                "tokens": getattr(w, "tokens", [])[:64],
                "cache_bytes": getattr(w, "cache_bytes", 0),
            }
            out.write(json.dumps(final) + "\n")
            out.flush()
            return
        out.flush()
