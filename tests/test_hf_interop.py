"""Hugging Face interop: our checkpoints load in transformers and mlx-lm, theirs load here.

Ours -> theirs: a tiny MLA model trained a few steps by `python -m mlx_model.train` (with a
non-zero routing bias that changes the chosen experts) loads strictly in
transformers.AutoModelForCausalLM and mlx_lm.load; logits agree with ours within 1e-4
(relative, float32) and greedy continuations are identical.
Theirs -> ours: random transformers DeepseekV3ForCausalLM saved by save_pretrained (float32,
bfloat16, sharded, fused experts) and mlx-lm converted directories load with load_model.
Bad inputs (other model_type, missing shard, shape mismatch, quantized, YaRN) raise CheckpointError;
the CLIs print `error: ...` and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm  # noqa: E402
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402

from mlx_model.checkpoint import CheckpointError, export_hf, load_model, save_model  # noqa: E402
from mlx_model.data import Tokenizer, train_tokenizer  # noqa: E402
from mlx_model.model import Model  # noqa: E402
from mlx_model.presets import preset  # noqa: E402

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
    "PYTHONPATH": str(REPO),
}
TOL = 1e-4

# Trained variants: q_lora_rank null / set, rope_theta != 10000, group routing, MTP (kept in
# mtp.safetensors). The sign rule at speed 0.05 makes 5 steps move the routing bias enough to matter.
VARIANTS = {
    "q_proj": ["--rope-theta", "50000"],
    "q_lora+groups+mtp": [
        "--q-lora-rank",
        "16",
        "--n-group",
        "2",
        "--topk-group",
        "1",
        "--rope-theta",
        "1e6",
        "--routed-scaling-factor",
        "2.5",
        "--num-nextn-predict-layers",
        "1",
    ],
}


# ----------------------------------------------------------------------------- helpers
def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_close(ours, theirs, what: str) -> None:
    e = rel_err(ours, theirs)
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
    assert e < TOL, f"{what}: relative error {e:.2e} (max abs diff {diff:.2e})"


def cli(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m argv...` in a subprocess (used for mlx-lm's own CLI)."""
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main_of(module: str, *argv: str) -> int:
    """Run `python -m module argv...` in this process (saves re-importing torch/MLX): exit status."""
    import importlib

    try:
        importlib.import_module(module).main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def hf_load(path: Path):
    """transformers model in float32, asserting a clean strict load."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, dtype=torch.float32
    )
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"transformers {k}: {info[k]}"
    return model.eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def until_eos(tokens: list[int], eos) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    """Reference greedy loop: full forward each step (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt) :]


def make_hf_model(q_lora_rank=None, rope_theta=20000.0, vocab=384, seed=0):
    """A random transformers DeepseekV3ForCausalLM with a non-zero routing bias."""
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(4) * 0.1)
    return model


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_interop")


@pytest.fixture(scope="module")
def trained(work):
    """Variant name -> training output directory (trained lazily, once)."""
    dirs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in dirs:
            out = work / f"trained-{len(dirs)}"
            rc = main_of(
                "mlx_model.train",
                "--preset",
                "tiny",
                "--max-steps",
                "5",
                "--bias-update-speed",
                "0.05",
                "--bias-update-rule",
                "sign",
                "--eval-every",
                "5",
                "--eval-batches",
                "1",
                "--progress",
                "false",
                "--out",
                str(out),
                "--cache-dir",
                str(work / "data-cache"),
                *VARIANTS[name],
            )
            assert rc == 0
            dirs[name] = out
        return dirs[name]

    return get


@pytest.fixture(scope="module")
def hf_dirs(work):
    """Kind -> a directory written by transformers (plus the in-memory reference model)."""
    made: dict[str, tuple[Path, object]] = {}

    def get(kind: str):
        if kind in made:
            return made[kind]
        out = work / f"hf-{kind}"
        model = make_hf_model(q_lora_rank=16 if kind in ("bf16", "fused") else None)
        if kind == "bf16":
            model.to(torch.bfloat16).save_pretrained(out)
        elif kind == "sharded":
            model.save_pretrained(out, max_shard_size="40KB")
        elif (
            kind == "fused"
        ):  # the in-memory layout: experts.gate_up_proj [E, 2I, H], experts.down_proj
            from safetensors.torch import save_file

            model.save_pretrained(out)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            assert any(k.endswith("experts.gate_up_proj") for k in state)
            (out / "model.safetensors").unlink()
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(out)
        made[kind] = (out, model)
        return made[kind]

    return get


# ------------------------------------------------------------------------ ours -> theirs
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_output_is_hf_checkpoint(trained, variant):
    d = trained(variant)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (
        cfg["hf_compatible"] is True
        and cfg["rope_interleave"] is True
        and cfg["tie_word_embeddings"] is False
    )
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] != 10000
    assert cfg["topk_method"] == "noaux_tc" and cfg["torch_dtype"] == "float32"
    for k in ("n_group", "topk_group", "num_nextn_predict_layers", "bos_token_id", "eos_token_id"):
        assert cfg[k] is not None, k
    main = mx.load(str(d / "model.safetensors"))
    assert not any(k.startswith("mtp.") for k in main), (
        "MTP weights must stay out of model.safetensors"
    )
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in main
    if cfg["num_nextn_predict_layers"]:
        assert any(k.startswith("mtp.") for k in mx.load(str(d / "mtp.safetensors")))

    # The trained routing bias is non-zero and changes the chosen experts.
    ours = load_model(d)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, 16))
    routed = [np.array(r.indices) for r in ours.forward(mx.array(ids))[2]]
    biases = [layer.mlp.gate.e_score_correction_bias for layer in ours.layers[1:]]
    assert all(float(mx.abs(b).max()) > 0.05 for b in biases)
    saved = [mx.array(b) for b in biases]
    for layer in ours.layers[1:]:
        layer.mlp.gate.e_score_correction_bias = mx.zeros_like(
            layer.mlp.gate.e_score_correction_bias
        )
    unbiased = [np.array(r.indices) for r in ours.forward(mx.array(ids))[2]]
    assert any((np.sort(a, -1) != np.sort(b, -1)).any() for a, b in zip(routed, unbiased)), (
        "bias changed nothing"
    )
    for layer, b in zip(ours.layers[1:], saved):
        layer.mlp.gate.e_score_correction_bias = b

    # Both libraries load it strictly and compute the same logits.
    theirs = hf_load(d)
    for layer, b in zip(theirs.model.layers[1:], saved):  # the buffer is read from our file
        np.testing.assert_array_equal(layer.mlp.gate.e_score_correction_bias.numpy(), np.array(b))
    lm_model, lm_tok = mlx_lm.load(str(d))
    ref = mlx_logits(ours, ids)
    assert_close(ref, torch_logits(theirs, ids), "transformers vs ours")
    assert_close(ref, mlx_logits(lm_model, ids), "mlx-lm vs ours")

    # Same tokenizer, same greedy continuation: ours, transformers, mlx-lm's cached decode.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    text = "The function returns"
    prompt = Tokenizer.load(str(d)).encode(text)
    assert (
        hf_tok(text, add_special_tokens=False).input_ids
        == prompt
        == lm_tok.encode(text, add_special_tokens=False)
    )
    n, eos = 12, cfg["eos_token_id"]
    mine = until_eos(greedy_ours(ours, prompt, n), eos)
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=eos
        )
    hf_greedy = until_eos(out[0, len(prompt) :].tolist(), eos)
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(prompt), lm_model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    lm_greedy = until_eos([int(t) for t, _ in steps], eos)
    assert mine == hf_greedy == lm_greedy, (mine, hf_greedy, lm_greedy)
    try:  # our cached decode, when the generation module is there
        from mlx_model.engine import Engine
        from mlx_model.sampling import SamplingParams
    except ImportError:
        return
    cached = [
        t[0] for t in Engine(ours).decode([prompt], SamplingParams(max_tokens=n, temperature=0.0))
    ]
    assert until_eos(cached, eos) == mine


def test_mlx_lm_generate_cli(trained):
    r = cli(
        "mlx_lm",
        "generate",
        "--model",
        str(trained("q_proj")),
        "--prompt",
        "The",
        "--max-tokens",
        "5",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Generation:" in r.stdout + r.stderr


def test_mlx_lm_saved_layout_loads(trained, work):
    """mlx_lm.convert writes stacked switch_mlp experts and embed_q/unembed_out (not kv_b_proj)."""
    from mlx_lm.convert import convert

    src, out = trained("q_lora+groups+mtp"), work / "mlx-lm-converted"
    convert(str(src), str(out))
    names = mx.load(str(out / "model.safetensors"))
    assert (
        "model.layers.1.mlp.switch_mlp.up_proj.weight" in names
        and "model.layers.0.self_attn.embed_q.weight" in names
    )
    ids = np.random.default_rng(2).integers(0, 512, (1, 10))
    ref = load_model(src)
    np.testing.assert_array_equal(mlx_logits(load_model(out), ids), mlx_logits(ref, ids))


def test_export_refuses_incompatible_configs(work, capfd):
    """MQA / LayerNorm / softmax / capacity configs save and load here, but say model_type
    mlx_deepseek so that mlx-lm and transformers refuse them; --to-hf names the reason."""
    args = preset("seed").replace(
        vocab_size=300,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
    )
    d = work / "seed-like"
    model = Model(args)
    save_model(d, model)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "mlx_deepseek" and cfg["hf_compatible"] is False
    assert (
        "mqa" in cfg["hf_incompatible_because"]
        and "capacity_factor" in cfg["hf_incompatible_because"]
    )
    ids = np.random.default_rng(3).integers(0, 300, (1, 7))
    np.testing.assert_array_equal(mlx_logits(load_model(d), ids), mlx_logits(model, ids))
    with pytest.raises(ValueError, match="mlx_deepseek not supported"):
        mlx_lm.load(str(d))
    with pytest.raises(ValueError, match="mlx_deepseek"):
        transformers.AutoModelForCausalLM.from_pretrained(str(d))
    with pytest.raises(CheckpointError, match="cannot be exported.*attention_type 'mqa'"):
        export_hf(d, work / "seed-like-hf")
    capfd.readouterr()
    assert main_of("tools.convert", "--to-hf", str(d), "--out", str(work / "seed-like-hf")) == 2
    err = capfd.readouterr().err
    assert (
        err.startswith("error: ")
        and "norm_type 'layernorm'" in err
        and len(err.strip().splitlines()) == 1
    ), err
    assert not (work / "seed-like-hf").exists()


def test_export_hf_copy(trained, work):
    out = work / "exported"
    export_hf(trained("q_proj"), out)
    assert not (out / "optimizer.safetensors").exists() and (out / "tokenizer.json").exists()
    ids = np.random.default_rng(4).integers(0, 512, (1, 9))
    assert_close(
        mlx_logits(load_model(trained("q_proj")), ids), torch_logits(hf_load(out), ids), "exported"
    )


# ------------------------------------------------------------------------ theirs -> ours
@pytest.mark.parametrize("kind", ["float32", "bf16", "sharded", "fused"])
def test_transformers_checkpoint_loads(hf_dirs, kind):
    d, model = hf_dirs(kind)
    if kind == "sharded":
        assert (d / "model.safetensors.index.json").exists() and len(
            list(d.glob("model-*.safetensors"))
        ) > 1
    ours = load_model(d, dtype=mx.float32)
    assert ours.args.num_nextn_predict_layers == 0  # transformers writes 1 but saves no MTP weights
    assert ours.args.rope_theta == 20000.0
    reference = hf_load(d) if kind == "bf16" else model  # same bf16-rounded weights, run in float32
    for layer, theirs in zip(ours.layers[1:], reference.model.layers[1:]):
        np.testing.assert_array_equal(
            np.array(layer.mlp.gate.e_score_correction_bias),
            theirs.mlp.gate.e_score_correction_bias.numpy(),
        )
        assert float(mx.abs(layer.mlp.gate.e_score_correction_bias).max()) > 0
    ids = np.random.default_rng(5).integers(0, 384, (2, 13))
    assert_close(
        mlx_logits(ours, ids), torch_logits(reference, ids), f"ours vs transformers ({kind})"
    )


def test_convert_from_hf_cli(hf_dirs, work):
    """`python -m tools.convert --from-hf` on a sharded transformers save; the result (which
    now has the top-level rope_theta mlx-lm reads) decodes greedily like transformers."""
    d, model = hf_dirs("sharded")
    out = work / "from-hf"
    assert main_of("tools.convert", "--from-hf", str(d), "--out", str(out)) == 0
    assert (out / "model.safetensors").exists() and not (
        out / "model.safetensors.index.json"
    ).exists()
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 20000.0
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load_model  # no tokenizer in this directory

    ours, lm_model = load_model(out), mlx_lm_load_model(out)[0]
    ids = np.random.default_rng(6).integers(0, 384, (1, 11))
    assert_close(mlx_logits(ours, ids), torch_logits(model, ids), "converted")
    assert_close(mlx_logits(lm_model, ids), torch_logits(model, ids), "converted: mlx-lm")

    # Random weights give varied continuations: a real test of greedy decoding in all three.
    prompt, n, eos = [5, 17, 42, 7], 16, model.config.eos_token_id
    mine = until_eos(greedy_ours(ours, prompt, n), eos)
    assert len(set(mine)) > 3, mine
    with torch.no_grad():
        out_ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=eos
        )
    steps = generate_step(
        mx.array(prompt), lm_model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    theirs = until_eos(out_ids[0, len(prompt) :].tolist(), eos)
    lm_greedy = until_eos([int(t) for t, _ in steps], eos)
    assert mine == theirs == lm_greedy, (mine, theirs, lm_greedy)
    try:  # our cached (absorbed-MLA) decode, when the generation module is there
        from mlx_model.engine import Engine
        from mlx_model.sampling import SamplingParams
    except ImportError:
        return
    cached = [
        t[0] for t in Engine(ours).decode([prompt], SamplingParams(max_tokens=n, temperature=0.0))
    ]
    assert until_eos(cached, eos) == mine


def test_finetune_from_transformers_checkpoint(hf_dirs, work):
    """`train --init-from` a transformers directory (tokenizer taken from it); the result keeps
    loading in both libraries and matches them."""
    d, _ = hf_dirs("float32")
    tok = train_tokenizer(
        ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x): return x + 1\n"], 300
    )
    assert tok.vocab_size <= 384
    tok.save(str(d))
    out, text = work / "finetuned", work / "finetune.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again.\n" * 300)
    assert (
        main_of(
            "mlx_model.train",
            "--init-from",
            str(d),
            "--preset",
            "tiny",
            "--max-steps",
            "2",
            "--out",
            str(out),
            "--data",
            str(text),
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--progress",
            "false",
            "--cache-dir",
            str(work / "ft-cache"),
        )
        == 0
    )
    before, after = load_model(d), load_model(out)
    assert after.args.routed_scaling_factor == 2.5 and after.args.rope_theta == 20000.0
    assert float(mx.abs(before.lm_head.weight - after.lm_head.weight).max()) > 0, (
        "no training happened"
    )
    ids = np.random.default_rng(7).integers(0, 384, (2, 10))
    ref = mlx_logits(after, ids)
    assert_close(ref, torch_logits(hf_load(out), ids), "fine-tuned: transformers")
    assert_close(ref, mlx_logits(mlx_lm.load(str(out))[0], ids), "fine-tuned: mlx-lm")


def test_hf_mtp_layers_map_to_ours(trained, work):
    """DeepSeek's MTP layer `model.layers.{N}.*` (eh_proj over [enorm(e); hnorm(h)]) maps onto
    our mtp.0.* (eh_proj over [hnorm(h); enorm(e)])."""
    src = trained("q_lora+groups+mtp")
    ref = load_model(src)
    N = ref.args.num_hidden_layers
    mtp = mx.load(str(src / "mtp.safetensors"))
    hf_names = {}
    for k, v in mtp.items():
        rest = k[len("mtp.0.") :]
        if rest == "eh_proj.weight":
            half = v.shape[1] // 2
            v = mx.concatenate([v[:, half:], v[:, :half]], axis=1)
        elif rest.startswith("norm."):
            rest = "shared_head." + rest
        elif rest.startswith("block."):
            rest = rest[len("block.") :]
        hf_names[f"model.layers.{N}.{rest}"] = v
    hf_names[f"model.layers.{N}.embed_tokens.weight"] = ref.model.embed_tokens.weight
    hf_names[f"model.layers.{N}.shared_head.head.weight"] = ref.lm_head.weight
    d = work / "hf-mtp"
    shutil.copytree(src, d)
    (d / "mtp.safetensors").unlink()
    mx.save_safetensors(
        str(d / "model.safetensors"), {**mx.load(str(src / "model.safetensors")), **hf_names}
    )
    got = load_model(d)
    assert got.args.num_nextn_predict_layers == 1
    from mlx.utils import tree_flatten

    want = dict(tree_flatten(ref.parameters()))
    for k, v in tree_flatten(got.parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(want[k]), err_msg=k)


# ----------------------------------------------------------------------------- bad inputs
def _edit_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs(hf_dirs, trained, work, capfd):
    bad = work / "bad"
    bad.mkdir()
    src, _ = hf_dirs("float32")

    other = bad / "llama"
    shutil.copytree(src, other)
    _edit_config(other, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load_model(other)

    missing = bad / "missing-shard"
    shutil.copytree(hf_dirs("sharded")[0], missing)
    gone = sorted(missing.glob("model-*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"lists {gone.name}, which is missing"):
        load_model(missing)

    shape = bad / "shape"
    shutil.copytree(src, shape)
    _edit_config(shape, moe_intermediate_size=48)
    with pytest.raises(
        CheckpointError,
        match=r"experts.down_proj.weight has shape \(4, 64, 32\), config.json implies \(4, 64, 48\)",
    ):
        load_model(shape)

    yarn = bad / "yarn"  # e.g. DeepSeek-V3's own config: RoPE scaling is refused, not ignored
    shutil.copytree(src, yarn)
    _edit_config(
        yarn,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    with pytest.raises(CheckpointError, match=r"rope_scaling=.*yarn.*YaRN\) is not implemented"):
        load_model(yarn)

    from mlx_lm.convert import convert

    quant = bad / "quantized"
    convert(str(trained("q_proj")), str(quant), quantize=True, q_group_size=32)
    with pytest.raises(
        CheckpointError, match="'quantization': quantized weights serve generation only"
    ):
        load_model(quant)
    cfg = json.loads((quant / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        cfg.pop(key)
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"\.(scales|biases) belongs to a quantized weight"):
        load_model(quant)

    # The CLIs print one `error: ...` line and exit 2.
    capfd.readouterr()
    assert main_of("tools.convert", "--from-hf", str(missing), "--out", str(bad / "x")) == 2
    err = capfd.readouterr().err
    assert (
        err.startswith("error: ")
        and "which is missing" in err
        and len(err.strip().splitlines()) == 1
    ), err
    assert (
        main_of(
            "mlx_model.train",
            "--init-from",
            str(other),
            "--max-steps",
            "1",
            "--out",
            str(bad / "y"),
        )
        == 2
    )
    err = capfd.readouterr().err
    assert "error: " in err and "model_type 'llama'" in err, err
