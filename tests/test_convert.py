"""tools.convert: MLX checkpoint <-> torch state dict, bit-exact round trips, dtype casts, and
bad input (one-line error naming the key, exit status 2, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map
from safetensors import safe_open

from conftest import TOL_LOGITS, assert_close, mqa_args, tiny_args
from mlx_model.checkpoint import load_model, save_model, write_config
from mlx_model.loss import moe_layers
from mlx_model.model import Model as MLXModel
from tools import convert
from torch_reference.model import Model as TorchModel

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, args, dtype=None) -> Path:
    """A random MLX model saved with mlx_model.checkpoint (optionally cast, bias kept float32)."""
    model = MLXModel(args)
    if dtype is not None:
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
        for moe in moe_layers(model):
            moe.gate.e_score_correction_bias = mx.random.normal((args.n_routed_experts,)) * 0.01
    mx.eval(model.parameters())
    save_model(path, model)
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}\n')
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_bytes(a: Path, b: Path) -> None:
    """Same names, dtypes, shapes and bytes in every tensor of two safetensors files."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].contiguous().view(torch.uint8).equal(tb[k].contiguous().view(torch.uint8)), (
            f"{k}: bytes differ"
        )


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    try:
        convert.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


CONFIGS = {
    "tiny-mtp": lambda: tiny_args(num_nextn_predict_layers=1, q_lora_rank=24),
    "mqa": lambda: mqa_args(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "dtype", [None, mx.bfloat16, mx.float16], ids=["float32", "bfloat16", "float16"]
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_is_bit_exact(tmp_path, capsys, name, dtype, suffix):
    src = make_checkpoint(tmp_path / "src", CONFIGS[name](), dtype)
    code, out, err = run_cli(
        "--to-torch", str(src), "--out", str(tmp_path / f"m{suffix}"), capsys=capsys
    )
    assert code == 0 and "wrote" in out, err
    code, out, err = run_cli(
        "--from-torch",
        str(tmp_path / f"m{suffix}"),
        "--config",
        str(src),
        "--out",
        str(tmp_path / "back"),
        capsys=capsys,
    )
    assert code == 0, err
    for f in ("model.safetensors", "mtp.safetensors"):
        assert (src / f).exists() == (tmp_path / "back" / f).exists(), f
        if (src / f).exists():
            assert_same_bytes(src / f, tmp_path / "back" / f)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (
        src / "tokenizer.json"
    ).read_text()
    assert (tmp_path / "back" / "config.json").read_text() == (src / "config.json").read_text()


def test_torch_file_loads_into_twin(tmp_path):
    """The .pt file is a plain state dict for torch_reference, and the twin gives the logits
    of the MLX checkpoint."""
    args = tiny_args(num_nextn_predict_layers=1)
    src = make_checkpoint(tmp_path / "src", args)
    state = convert.to_torch(src, tmp_path / "m.pt")
    ref = TorchModel(args)
    ref.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    assert all(ref.state_dict()[k].equal(v) for k, v in state.items())
    mlx = load_model(src)
    mlx.eval()
    ref.double().eval()
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, size=(2, 9))
    assert_close(
        mlx(mx.array(tokens)),
        ref(torch.from_numpy(tokens))[0],
        TOL_LOGITS,
        "logits after conversion",
    )


def test_dtype_cast_keeps_bias_float32(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src", tiny_args())
    code, _, err = run_cli(
        "--to-torch",
        str(src),
        "--out",
        str(tmp_path / "m.pt"),
        "--dtype",
        "bfloat16",
        capsys=capsys,
    )
    assert code == 0, err
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    for k, v in state.items():
        assert v.dtype == (torch.float32 if "e_score_correction_bias" in k else torch.bfloat16), k
    original = dict(tree_flatten(load_model(src).parameters()))
    assert torch.equal(
        state["lm_head.weight"], torch.from_numpy(np.array(original["lm_head.weight"])).bfloat16()
    )
    # Back to MLX in float16 on request.
    code, _, err = run_cli(
        "--from-torch",
        str(tmp_path / "m.pt"),
        "--config",
        str(src / "config.json"),
        "--out",
        str(tmp_path / "h"),
        "--dtype",
        "float16",
        capsys=capsys,
    )
    assert code == 0, err
    back = tensors(tmp_path / "h" / "model.safetensors")
    assert {str(v.dtype) for k, v in back.items() if "bias" not in k} == {"torch.float16"}


def test_float64_twin_needs_a_dtype(tmp_path, capsys):
    args = tiny_args()
    src = make_checkpoint(tmp_path / "src", args)
    torch.save(TorchModel(args).double().state_dict(), tmp_path / "f64.pt")
    argv = [
        "--from-torch",
        str(tmp_path / "f64.pt"),
        "--config",
        str(src),
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and "float64" in err and "--dtype" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli(*argv, "--dtype", "float32", capsys=capsys)
    assert code == 0, err
    assert load_model(tmp_path / "o").lm_head.weight.dtype == mx.float32


def bad_state(kind: str, args) -> dict[str, torch.Tensor]:
    state = TorchModel(args).state_dict()
    if kind == "shape":
        state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 5)
    elif kind == "unknown":
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    elif kind == "missing":
        del state["model.layers.1.mlp.experts.up_proj.weight"]
    return state


@pytest.mark.parametrize(
    "kind,key",
    [
        ("shape", "model.layers.0.self_attn.o_proj.weight"),
        ("unknown", "model.layers.0.self_attn.rotary_emb.inv_freq"),
        ("missing", "model.layers.1.mlp.experts.up_proj.weight"),
    ],
)
def test_bad_state_dict(tmp_path, capsys, kind, key):
    args = tiny_args()
    src = make_checkpoint(tmp_path / "src", args)
    torch.save(bad_state(kind, args), tmp_path / "bad.pt")
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli(
        "--from-torch",
        str(tmp_path / "bad.pt"),
        "--config",
        str(src),
        "--out",
        str(tmp_path / "out"),
        capsys=capsys,
    )
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and key in err, err
    assert sorted(os.listdir(tmp_path)) == before, "something was written"


def test_bad_checkpoint_dirs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    save_cfg = tiny_args()
    write_config(tmp_path / "noweights", save_cfg)
    src = make_checkpoint(tmp_path / "src", tiny_args())
    before = sorted(os.listdir(tmp_path))
    for argv, needle in [
        (["--to-torch", str(tmp_path / "empty"), "--out", str(tmp_path / "a.pt")], "config.json"),
        (
            ["--to-torch", str(tmp_path / "missing"), "--out", str(tmp_path / "a.pt")],
            "not a directory",
        ),
        (
            ["--to-torch", str(tmp_path / "noweights"), "--out", str(tmp_path / "a.pt")],
            "model.safetensors",
        ),
        (["--to-torch", str(src), "--out", str(tmp_path / "a.txt")], ".pt"),
        (
            [
                "--from-torch",
                str(tmp_path / "nope.pt"),
                "--config",
                str(src),
                "--out",
                str(tmp_path / "o"),
            ],
            "nope.pt",
        ),
        (
            [
                "--from-torch",
                str(src / "config.json"),
                "--config",
                str(src),
                "--out",
                str(tmp_path / "o"),
            ],
            "cannot read",
        ),
        (
            [
                "--from-torch",
                str(tmp_path / "x.pt"),
                "--config",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "o"),
            ],
            "config.json",
        ),
        (["--from-torch", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")], "--config"),
    ]:
        code, out, err = run_cli(*argv, capsys=capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, (
            argv,
            err,
        )
    assert sorted(os.listdir(tmp_path)) == before, "something was written"


def test_mismatched_shapes_in_checkpoint(tmp_path, capsys):
    """A checkpoint whose config.json does not match its weights: the key is named."""
    src = make_checkpoint(tmp_path / "src", tiny_args())
    write_config(src, tiny_args(intermediate_size=96))
    code, _, err = run_cli("--to-torch", str(src), "--out", str(tmp_path / "a.pt"), capsys=capsys)
    assert code == 2 and "model.layers.0.mlp" in err and "shape" in err, err
    assert not (tmp_path / "a.pt").exists()


def test_cli_subprocess(tmp_path):
    """`python -m tools.convert` as a user runs it: exit codes and stderr."""
    src = make_checkpoint(tmp_path / "src", tiny_args())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "tools.convert", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    ok = run("--to-torch", str(src), "--out", "m.pt")
    assert ok.returncode == 0 and "wrote m.pt" in ok.stdout, ok.stderr
    bad = run("--to-torch", str(tmp_path), "--out", "n.pt")
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    ), bad.stderr
    assert not (tmp_path / "n.pt").exists()
