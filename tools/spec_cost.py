"""Where speculative decoding's time goes: `python -m tools.spec_cost [--model DIR] [--num-draft 1 2 3]`.

One process, interleaved (plain and every speculative setting take turns, repeated), so the
ratios hold on a busy machine. Two parts:

1. Whole decoding runs (greedy, batch 1, the bench's prompt and length): plain tokens/s, and for
   each N the speculative tokens/s, acceptance, tokens per round and the cost of one round in
   plain steps (round time / step time). Speed-up = tokens per round / round cost; the line
   `needs` says what tokens per round 1.5x would take at that round cost.
2. Parts of a round, each one compiled function evaluated alone (best of the repeats, ms): the
   plain decode step, the model's verification forward over L = N+1 tokens, one MTP pass over 1
   and N+1 tokens, the lm_head over L rows; plus the number of primitives in a plain step
   (before compile fuses elementwise chains).
3. A ceiling per N from those parts (`round_floor`): a round costs at least the forward over
   N+1 tokens plus N one-position MTP passes, so even if every draft were accepted the speed-up
   is at most (N+1) / that cost; and at the measured tokens per round, that over the same cost.

Set MKL_NUM_THREADS=1 (as the bench does) for batch-1 decoding on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from mlx_model import speedups


def bench_prompt(tok: Any, n: int) -> list[int]:
    """The generate bench's prompt: held-out stdlib docstrings, first n tokens."""
    from tools.bench_generate import held_out_text

    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(" ".join(held_out_text()))
    return ids[:n]


def decode_runs(engine: Any, prompt: list[int], new: int, drafts: list[int], repeats: int):
    """Interleaved whole runs: name -> list of Stats (plain first, then each N)."""
    from mlx_model.engine import Stats
    from mlx_model.sampling import SamplingParams
    from mlx_model.speculative import run as run_speculative

    params = SamplingParams(max_tokens=new, temperature=0.0, top_p=1.0)
    names = ["plain"] + [f"N={n}" for n in drafts]
    runs: dict[str, list[Stats]] = {k: [] for k in names}
    tokens: dict[str, list[int]] = {}
    for r in range(repeats + 1):  # round 0 warms up (compiles)
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            stats = Stats()
            cpu = time.process_time()
            if name == "plain":
                toks = [t[0] for t in engine.decode([prompt], params, stats)]
            else:
                n = int(name[2:])
                toks = [
                    t
                    for b in run_speculative(engine, [prompt], params, n, None, stats)
                    for t in b[0]
                ]
            stats.cpu_time = time.process_time() - cpu  # prefill included (small)
            tokens[name] = toks
            if r:
                runs[name].append(stats)
    return runs, {k: v == tokens["plain"] for k, v in tokens.items()}


def timed(fns: dict[str, tuple], repeats: int, inner: int = 20) -> dict[str, float]:
    """Best-of-repeats ms per call of each (compiled fn, args), interleaved."""
    import mlx.core as mx

    for f, args in fns.values():
        for _ in range(3):
            mx.eval(f(*args))
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, (f, args) in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                mx.eval(f(*args))
            best[k] = min(best[k], (time.perf_counter() - t) / inner * 1e3)
    return best


def parts(model: Any, engine: Any, prompt: list[int], drafts: list[int], repeats: int):
    """Component costs (ms) and the primitive count of one plain step."""
    import mlx.core as mx

    from mlx_model.cache import StaticKVCache
    from mlx_model.engine import decode_mask, static_caches

    pre = engine.prefill([prompt])
    cap = engine.capacity(len(prompt), 256, 8)
    main = [s for k in pre.cache for s in StaticKVCache.from_cache(k, cap).state]
    mtp_cache = [mx.zeros((1, 1, cap, s.shape[-1]), s.dtype) for s in main[:2]]
    mx.eval(main, mtp_cache)
    nl, off, pad, D = (
        len(pre.cache),
        mx.array(len(prompt), mx.int32),
        pre.pad,
        model.args.hidden_size,
    )

    def verify(x, *state):
        caches = static_caches(state, off, nl)
        mask = decode_mask(off, pad, cap, x.shape[1])
        logits, h, _ = model.forward(x, caches, mask)
        return (mx.argmax(logits, -1), h, *[s for c in caches for s in c.state])

    def mtp(h, x, a, b):
        c = StaticKVCache(a, b, off)
        logits, hh, _ = model.mtp_block(0, h, x, c, decode_mask(off, pad, cap, x.shape[1]))
        return mx.argmax(logits, -1), hh, c.a, c.b

    def head(h):
        return mx.argmax(model.lm_head(model.model.norm(h)), -1)

    fns: dict[str, tuple] = {}
    for L in sorted({1, *[n + 1 for n in drafts]}):
        x = mx.array([prompt[:L]])
        h = mx.random.normal((1, L, D))
        fns[f"model forward L={L}"] = (mx.compile(verify), (x, *main))
        if getattr(model, "mtp", None):
            fns[f"MTP pass L={L}"] = (mx.compile(mtp), (h, x, *mtp_cache))
        fns[f"norm+lm_head+argmax L={L}"] = (mx.compile(head), (h,))
    return timed(fns, repeats), primitive_count(verify, mx.array([prompt[:1]]), *main)


def round_floor(costs: dict[str, float], n: int) -> float | None:
    """The least a round with n drafts can cost, in plain forwards: the model's forward over the
    n + 1 tokens it verifies plus n MTP passes over one position each (what drafting n tokens
    and re-reading the kept one needs at the least), with the accept logic free. An MTP pass
    over more positions costs no less than over one, so the cheapest measured MTP pass stands
    in for it (timing noise can only make the bound more generous). None when the parts were
    not measured (no MTP module)."""
    mtp = [v for k, v in costs.items() if k.startswith("MTP pass")]
    verify = costs.get(f"model forward L={n + 1}")
    if not mtp or verify is None:
        return None
    return (verify + n * min(mtp)) / costs["model forward L=1"]


def primitive_count(fn, *args) -> int:
    """Primitives in fn's graph before compilation (from MLX's dot export)."""
    import re
    import tempfile

    import mlx.core as mx

    with tempfile.NamedTemporaryFile(suffix=".dot", mode="r") as f:
        mx.export_to_dot(f.name, *fn(*args))
        return len(re.findall(r'label ="[A-Za-z]', f.read()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tools.spec_cost", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--model", default="weights/bench-gen-small-mtp1", help="checkpoint with MTP weights"
    )
    p.add_argument(
        "--num-draft", type=int, nargs="+", default=[1, 2, 3], help="draft lengths N to compare"
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each run")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    p.add_argument("--quantize", type=int, default=None, help="quantize on load (4 or 8 bits)")
    a = p.parse_args(argv)
    speedups.enable_for_cli()  # a fast BLAS and vectorised kernels, before mlx.core loads
    from mlx_model.engine import Engine
    from mlx_model.generation import load

    model, tok = load(a.model, a.quantize)
    engine = Engine(model)
    prompt = bench_prompt(tok, a.prompt_len)
    runs, same = decode_runs(engine, prompt, a.new_tokens, a.num_draft, a.repeats)
    med = statistics.median
    step = med(s.generate_time / s.generated_tokens for s in runs["plain"])
    cstep = med(s.cpu_time / s.generated_tokens for s in runs["plain"])
    print(
        f"plain: {1 / step:.1f} tokens/s, step {step * 1e3:.2f} ms wall, {cstep * 1e3:.2f} ms CPU "
        f"(median of {a.repeats})"
    )
    for n in a.num_draft:
        rs = runs[f"N={n}"]
        rnd = med(s.generate_time / s.verify_steps for s in rs)
        crnd = med(s.cpu_time / s.verify_steps for s in rs)
        tpr = med(s.tokens_per_step for s in rs)
        print(
            f"N={n}: {med(s.generated_tokens / s.generate_time for s in rs) * step:.2f}x plain "
            f"(wall), {med(cstep * s.generated_tokens / s.cpu_time for s in rs):.2f}x (CPU) | "
            f"acceptance {med(s.acceptance for s in rs):.1%}, {tpr:.2f} tokens per round | "
            f"round = {rnd / step:.2f} steps wall, {crnd / cstep:.2f} CPU | 1.5x needs "
            f"{1.5 * rnd / step:.2f} (wall) / {1.5 * crnd / cstep:.2f} (CPU) tokens per round at "
            f"this cost | same tokens {same[f'N={n}']}"
        )
    costs, prims = parts(model, engine, prompt, a.num_draft, a.repeats)
    base = costs["model forward L=1"]
    print(
        f"parts (best of {a.repeats}, ms; x = share of a plain forward); plain step graph: {prims} primitives"
    )
    for k, v in costs.items():
        print(f"  {k:28s} {v:7.3f} ms  {v / base:5.2f}x")
    for n in a.num_draft:
        floor = round_floor(costs, n)
        if floor is not None:
            tpr = med(s.tokens_per_step for s in runs[f"N={n}"])
            print(
                f"N={n} ceiling: a round costs at least forward L={n + 1} + {n} MTP pass(es) L=1 "
                f"= {floor:.2f} plain forwards, so at most {(n + 1) / floor:.2f}x plain if every "
                f"draft were accepted, {tpr / floor:.2f}x at the measured {tpr:.2f} tokens per round"
            )


if __name__ == "__main__":
    main()
