"""Fault suite, LoRA family (issue 20 item 7): non-finite LoRA weights λ, LoRA files holding NaN/inf values or
alphas, malformed files (rank 0, alphas that are strings, lists or empty tensors) and other adapter types. Through the
real CLI each ends with one line on stderr and a non-zero exit, naming what is wrong; nothing is written (no image,
no merged model). Every case is recorded for benchmarks/faults.py (kinds ``bad_argument``, ``untrusted_file``).

Models: the tiny random SD of tests/tiny.py and a rank-4 LoRA for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults_support import one_line_error, record, run_cli
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A working diffusers-format LoRA for the tiny SD (alphas in the header)."""
    import tiny

    from lcmkit.lora_formats import load_lora, save_lora

    folder = tmp_path_factory.mktemp("good_lora")
    unet = tiny.tiny_unet()
    raw = tiny.tiny_lora_file(unet, folder / "raw.safetensors")
    return save_lora(load_lora(raw, unet), folder / "good.safetensors", "diffusers")


def _commands(sd, lora, tmp_path: Path) -> dict[str, list]:
    return {"generate": ["generate", sd, "--prompt", "x", "--steps", "1", "--out", tmp_path / "a.png", "--lora", lora],
            "lora combine": ["lora", "combine", sd, "--lora", lora, "--out", tmp_path / "merged"]}


def _check(kind: str, case: str, args: list, needle: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(args, capsys)
    ok = one_line_error(code, err) and needle in err and not (tmp_path / "a.png").exists() \
        and not (tmp_path / "merged").exists()
    record(kind, case, ok)
    assert ok, (case, code, err)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e30", "-1e30", "101"])
def test_lora_weights_that_are_not_finite_or_absurd(weight, tiny_sd_dir, good, tmp_path, capsys):
    for command, args in _commands(tiny_sd_dir, f"{good}:{weight}", tmp_path).items():
        _check("bad_argument", f"{command}: --lora FILE:{weight}", args, "weight", tmp_path, capsys)


def _kohya(good: Path) -> dict[str, torch.Tensor]:
    """The good LoRA in kohya keys (alphas as tensors)."""
    import tiny
    from safetensors import safe_open

    from lcmkit.lora_formats import lora_from_state_dict, to_state_dict

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    weights = lora_from_state_dict(load_file(str(good)), {"unet": tiny.tiny_unet()}, metadata)
    return to_state_dict(weights, "kohya")[0]


def _bad_files(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """case → (file, what the message must name)."""
    kohya = _kohya(good)
    diffusers = load_file(str(good))
    first = sorted(k for k in kohya if k.endswith(".lora_up.weight"))[0]
    base = first[: -len(".lora_up.weight")]
    A = next(k for k in sorted(diffusers) if k.endswith("lora_A.weight"))
    files: dict[str, tuple[dict, dict | None, str]] = {
        "NaN in a lora_up": ({**kohya, first: torch.full_like(kohya[first], float("nan"))}, None, first),
        "inf in a lora_down": ({**kohya, base + ".lora_down.weight": kohya[base + ".lora_down.weight"] * float("inf")},
                               None, base + ".lora_down.weight"),
        "NaN alpha tensor": ({**kohya, base + ".alpha": torch.tensor(float("nan"))}, None, base + ".alpha"),
        "inf alpha tensor": ({**kohya, base + ".alpha": torch.tensor(float("inf"))}, None, base + ".alpha"),
        "empty alpha tensor": ({**kohya, base + ".alpha": torch.zeros(0)}, None, base + ".alpha"),
        "two-number alpha tensor": ({**kohya, base + ".alpha": torch.ones(2)}, None, base + ".alpha"),
        "rank 0": ({**kohya, base + ".lora_down.weight": kohya[base + ".lora_down.weight"][:0],
                    first: kohya[first][:, :0]}, None, "rank 0"),
        "factors of 1e20 (update past float32)": ({**kohya, first: torch.full_like(kohya[first], 1e20),
                                                   base + ".lora_down.weight":
                                                       torch.full_like(kohya[base + ".lora_down.weight"], 1e20)},
                                                  None, "float32"),
        "alpha inf in the header": (diffusers, {"unet.lora_alpha": float("inf"), "unet.r": 4}, "lora_alpha"),
        "alpha 1e39 in the header": (diffusers, {"unet.lora_alpha": 1e39, "unet.r": 4}, "lora_alpha"),
        "string alpha in the header": (diffusers, {"unet.lora_alpha": "eight", "unet.r": 4}, "eight"),
        "list alpha in the header": (diffusers, {"unet.lora_alpha": [4, 4], "unet.r": 4}, "[4, 4]"),
        "bool alpha in the header": (diffusers, {"unet.lora_alpha": True, "unet.r": 4}, "True"),
        "alpha_pattern a list": (diffusers, {"unet.alpha_pattern": [1, 2], "unet.lora_alpha": 4}, "alpha_pattern"),
        "NaN in a diffusers lora_A": ({**diffusers, A: diffusers[A] * float("nan")}, None, A),
        "LyCORIS LoHa": ({f"{base}.hada_w1_a": torch.ones(4, 2), f"{base}.hada_w1_b": torch.ones(2, 4),
                          f"{base}.hada_w2_a": torch.ones(4, 2), f"{base}.hada_w2_b": torch.ones(2, 4)}, None,
                         "LyCORIS LoHa"),
        "LyCORIS LoKr": ({f"{base}.lokr_w1": torch.ones(2, 2), f"{base}.lokr_w2": torch.ones(4, 4)}, None,
                         "LyCORIS LoKr"),
        "LoRA with one LoKr layer": ({**kohya, f"{base}.lokr_w1": torch.ones(2, 2)}, None, "LyCORIS LoKr"),
    }
    out = {}
    for i, (case, (state, config, needle)) in enumerate(files.items()):
        path = folder / f"bad-{i}.safetensors"
        header = {"format": "pt"}
        if config is not None:
            header["lora_adapter_metadata"] = json.dumps(config)
        save_file(state, str(path), metadata=header)
        out[case] = (path, needle)
    return out


def test_bad_lora_files_are_refused_naming_the_tensor(tiny_sd_dir, good, tmp_path, capsys):
    for case, (path, needle) in _bad_files(good, tmp_path).items():
        for command, args in _commands(tiny_sd_dir, path, tmp_path).items():
            _check("untrusted_file", f"{command}: LoRA file with {case}", args, needle, tmp_path, capsys)


def test_the_good_lora_still_works(tiny_sd_dir, good, tmp_path, capsys):
    """The cases above fail for their fault, not for the setup: the same commands succeed with the good file."""
    for command, args in _commands(tiny_sd_dir, f"{good}:0.8", tmp_path).items():
        code, _, err = run_cli(args, capsys)
        assert code == 0, (command, err)
    assert (tmp_path / "a.png").is_file() and (tmp_path / "merged" / "model_index.json").is_file()
    merged = load_file(str(next((tmp_path / "merged" / "unet").glob("*.safetensors"))))
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())


def test_bad_lora_save_options(tiny_sd_dir, good, tmp_path, capsys):
    train = ["--data", "world", "--max-steps", "1", "--device", "cpu", "--no-progress"]
    cases = {
        "distill: --lora-format comfy": (["distill", "--teacher", tiny_sd_dir, "--out", tmp_path / "d", "--mode", "lora",
                                          "--lora-format", "comfy", *train], "lora_format"),
        "lora train: --lora-format ','": (["lora", "train", "--model", tiny_sd_dir, "--out", tmp_path / "s.safetensors",
                                           "--lora-format", ",", *train], "lora_format"),
        "finetune: --lora-format kohya,sgm": (["finetune", "--model", tiny_sd_dir, "--lora", good, "--out",
                                               tmp_path / "f", "--lora-format", "kohya,sgm", *train], "sgm"),
        "lora train: --save-dtype fp8": (["lora", "train", "--model", tiny_sd_dir, "--out", tmp_path / "s.safetensors",
                                          "--save-dtype", "fp8", *train], "save-dtype"),
    }
    for case, (args, needle) in cases.items():
        code, _, err = run_cli(args, capsys)
        ok = one_line_error(code, err) and needle in err and not any(tmp_path.glob("*/checkpoints"))
        record("bad_argument", case, ok)
        assert ok, (case, code, err)
