"""Self-distillation of the MTP drafter: teach MTP module 0 the model's own greedy continuations.

    python -m mlx_model.mtp_distill --model DIR --out DIR [--steps 200] [--prompts 256]

For self-speculative decoding (mlx_model/speculative.py) the MTP module should predict what the
model will say, not what the corpus says: in greedy decoding, module 0 sees the model's hidden
state at i and the model's own token at i+1 and drafts i+2, which the model then verifies. So
(as Medusa-2 and EAGLE train their draft heads on the target model's outputs) this module:
1. cuts `--prompts` windows of `--prompt-tokens` tokens from the training corpus (pydoc's text,
   the corpus the `small` fixtures train on; or `--data` files) and decodes `--new-tokens`
   greedy tokens after each with the model (batched, through the Engine);
2. trains only the MTP module (the model is frozen, so plain decoding is unchanged bit for bit)
   with the usual MTP cross-entropy on those sequences, counting only targets inside the
   model's continuation: the target at i+2 is then the model's own greedy choice there;
3. saves the checkpoint (same main weights, new mtp.safetensors) to --out.
Greedy speculative output stays identical to plain decoding whatever the drafter learns; only
acceptance changes. It never sees the text it is later measured on unless you give it that.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def corpus_prompts(tok: Any, n: int, length: int, seed: int, paths: list[str]) -> list[list[int]]:
    """n windows of `length` tokens at seeded random places of the training corpus."""
    import numpy as np

    from .data import load_texts

    ids: list[int] = []
    for doc in load_texts(paths or None):
        ids += tok.encode(doc)
        if len(ids) > 200 * n * length:
            break
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, n)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return [bos + ids[s : s + length] for s in starts.tolist()]


def continuations(model: Any, prompts: list[list[int]], new: int, batch: int = 64) -> Any:
    """[n, T + new] ids: each prompt and the model's greedy continuation of it."""
    import mlx.core as mx

    from .engine import Engine
    from .sampling import SamplingParams

    engine, params = Engine(model), SamplingParams(max_tokens=new, temperature=0.0)
    rows = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        gen = list(engine.decode(ps, params))  # new x [rows]
        rows.append(mx.concatenate([mx.array(ps), mx.array(gen).T], axis=1))
    return mx.concatenate(rows)


def distill(model: Any, seqs: Any, start: int, steps: int, batch: int, lr: float, seed: int):
    """Train model.mtp[0] on seqs [n, L] (targets at positions >= start only); yields losses."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    n, L = seqs.shape
    module = model.mtp[0]  # the only trained part (its own frozen arrays stay frozen)
    weight = (mx.arange(2, L) >= start).astype(mx.float32)  # targets seqs[:, 2:]

    def loss_fn(_, x):  # value_and_grad swaps module's parameters in; model holds module
        _, h, _ = model.forward(x)
        logits, _, _ = model.mtp_block(0, mx.stop_gradient(h[:, :-2]), x[:, 1:-1])
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), x[:, 2:])  # [B, L-2]
        return (ce * weight).sum() / (weight.sum() * x.shape[0])

    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps), weight_decay=0.0)
    step = nn.value_and_grad(module, loss_fn)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = seqs[mx.array(rng.integers(0, n, batch))]
        loss, grads = step(module, x)
        opt.update(module, grads)
        mx.eval(module.parameters(), opt.state, loss)
        yield loss.item()


def agreement(model: Any, seqs: Any, start: int) -> float:
    """Share of continuation positions where MTP module 0's argmax equals the model's token."""
    import mlx.core as mx

    _, h, _ = model.forward(seqs)
    logits, _, _ = model.mtp_block(0, h[:, :-2], seqs[:, 1:-1])
    hit = (mx.argmax(logits, -1) == seqs[:, 2:])[:, max(start - 2, 0) :]
    return hit.astype(mx.float32).mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_model.mtp_distill", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, help="checkpoint with MTP weights")
    p.add_argument("--out", required=True, help="where to write the distilled checkpoint")
    p.add_argument("--data", nargs="*", default=[], help="prompt text files (default: pydoc)")
    p.add_argument("--prompts", type=int, default=256, help="corpus windows to continue")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per window")
    p.add_argument("--new-tokens", type=int, default=96, help="greedy tokens per window")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps on the MTP module")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="window places and batch order")
    a = p.parse_args(argv)
    from .speedups import enable_for_cli

    enable_for_cli()
    from .checkpoint import save_model
    from .generation import load

    model, tok = load(a.model)
    if not getattr(model, "mtp", None):
        print(f"error: {a.model} has no MTP weights: nothing to distil", file=sys.stderr)
        raise SystemExit(2)
    t = time.perf_counter()
    prompts = corpus_prompts(tok, a.prompts, a.prompt_tokens, a.seed, a.data)
    seqs = continuations(model, prompts, a.new_tokens)
    start = len(prompts[0])  # first continuation position
    print(f"{len(prompts)} greedy continuations in {time.perf_counter() - t:.0f} s")
    before = agreement(model, seqs[:32], start)
    t = time.perf_counter()
    for i, loss in enumerate(distill(model, seqs, start, a.steps, a.batch_size, a.lr, a.seed)):
        if (i + 1) % 50 == 0 or i + 1 == a.steps:
            print(f"step {i + 1}: MTP loss {loss:.3f}", flush=True)
    print(
        f"{a.steps} steps in {time.perf_counter() - t:.0f} s; MTP argmax = the model's greedy "
        f"token (first 32 continuations, seen in training): {before:.1%} -> "
        f"{agreement(model, seqs[:32], start):.1%}"
    )
    out = Path(a.out)
    save_model(out, model, tok)
    src = Path(a.model) / "trainer_state.json"
    if src.is_file():  # provenance: the main model's training
        shutil.copy(src, out / "trainer_state.json")


if __name__ == "__main__":
    main()
