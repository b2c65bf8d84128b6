"""lcmkit bench memory: the allocation counter, the per-GPU formulas, a fake step counting what the same real step
allocates, and the invariants of the committed table (benchmarks/results/memory/memory.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lcmkit.cli import main
from lcmkit.errors import LcmkitError
from lcmkit_world.bench.memory import CARDS_GIB, GIB, USABLE, headline, max_batch, parse_check, per_gpu
from lcmkit_world.bench.memtrack import LiveBytes, StepSpec, run_step

torch.set_num_threads(1)
RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory" / "memory.json"


def test_live_bytes_counts_new_storages_once_and_frees_them():
    tracker = LiveBytes()
    with tracker:
        with tracker.phase("a"):
            x = torch.empty(1000)          # 4000 bytes
            view = x.view(10, 100)         # same storage: nothing new
            x.add_(1)                      # in place: nothing new
            y = view * 2                   # 4000 more
            del y
        with tracker.phase("b"):
            z = torch.empty(250, dtype=torch.float64)  # 2000
    peaks = tracker.peaks(set())
    assert peaks["a"] == 8000 and peaks["b"] == 6000
    assert tracker.peaks({tracker.key_of(z)}, grad_scale=0.5)["b"] == 5000  # a "gradient" counted half
    del x, view, z


def _measurement(peaks_1, peaks_8):
    return {"spec": {"batch": 4}, "trainable_params": 100, "grad_bytes": 400, "activation_bytes": 1000,
            "resident_bytes": {"student": 800, "target": 800, "teacher": 400, "text_encoders": 100, "vae": 50,
                               "optimizer": 1600},
            "phase_peak_bytes": {"1": peaks_1, "8": peaks_8},
            "fsdp_units": {"count": 3, "max_params": 10, "root_params": 5}}


PEAKS_1 = {"encode": 100, "teacher": 200, "target": 150, "student": 900, "backward": 1300, "clip": 400,
           "adamw": 2000, "ema": 400}
PEAKS_8 = dict(PEAKS_1, backward=950, clip=50, adamw=1650, ema=50)


def test_per_gpu_shards_the_trained_parts_and_adds_what_fsdp_gathers():
    m = _measurement(PEAKS_1, PEAKS_8)
    one = per_gpu(m, "adamw", 1)
    assert one["resident"] == m["resident_bytes"]
    assert one["peak"] == 3750 + 2000 and one["peak_phase"] == "adamw"
    assert one["peak_cached_latents"] == one["peak"]
    eight = per_gpu(m, "adamw", 8)
    for part in ("student", "target", "optimizer"):
        assert eight["resident"][part] * 8 == m["resident_bytes"][part]
    for part in ("teacher", "text_encoders", "vae"):
        assert eight["resident"][part] == m["resident_bytes"][part]
    assert eight["working"]["adamw"] == 2000 / 8
    assert eight["working"]["student"] == 900 + 4 * (5 + 2 * 10)
    assert eight["working"]["backward"] == 950 + 4 * (5 + 3 * 10)
    assert eight["working"]["teacher"] == 200  # the replicated teacher gathers nothing
    bits = per_gpu(m, "adamw8bit", 1)
    assert bits["resident"]["optimizer"] == 2 * 100
    assert bits["working"]["adamw"] == PEAKS_1["clip"]  # in-place update: what clipping costs
    with pytest.raises(LcmkitError):
        per_gpu(m, "adamw", 4)  # no gradient peaks measured for 4


def test_max_batch_is_linear_between_the_two_measured_batches():
    small = _measurement({p: v // 4 for p, v in PEAKS_1.items()}, PEAKS_8)
    small["spec"] = {"batch": 1}
    big = _measurement(PEAKS_1, PEAKS_8)
    resident = sum(per_gpu(big, "adamw", 1)["resident"].values())
    # adamw grows 500 per sample from 500 at batch 1; backward 325 per sample from 325
    assert max_batch(big, small, "adamw", 1, resident + 2000) == 4
    assert max_batch(big, small, "adamw", 1, resident + 2499) == 4
    assert max_batch(big, small, "adamw", 1, resident + 2500) == 5
    assert max_batch(big, small, "adamw", 1, resident + 100) == 0


def test_parse_check():
    assert parse_check("sd15-lora-bf16-b2-r256-ckpt") == {"arch": "sd15", "mode": "lora", "precision": "bf16",
                                                         "batch": 2, "resolution": 256, "checkpointing": True}
    for bad in ("sd15-lora-bf16", "sd15-lora-fp16-b2", "sd15-lora-bf16-b2-x3"):
        with pytest.raises(LcmkitError):
            parse_check(bad)


@pytest.mark.parametrize("mode, precision, ckpt", [pytest.param("full", "fp32", False, marks=pytest.mark.slow),
                                                    ("lora", "bf16", True)])
def test_a_fake_step_counts_what_the_real_step_allocates(mode, precision, ckpt):
    spec = StepSpec("tiny", mode, precision, ckpt, batch=2, foreach=False, cuda_autocast=False)
    fake, real = run_step(spec, fake=True), run_step(spec, fake=False)
    assert fake["resident_bytes"] == real["resident_bytes"]
    assert fake["phase_peak_bytes"] == real["phase_peak_bytes"]
    assert fake["grad_bytes"] == real["grad_bytes"] == 4 * fake["trainable_params"]
    assert fake["phase_peak_bytes"]["1"]["backward"] > fake["phase_peak_bytes"]["8"]["backward"]


@pytest.mark.slow
def test_cli_writes_the_three_outputs(tmp_path):
    assert main(["bench", "memory", "--smoke", "--modes", "lora", "--precisions", "fp32", "--checks", "none",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["command"].startswith("lcmkit bench memory") and data["checks"] == []
    assert len(data["rows"]) == 2 * 2 * 2  # 2 checkpointing × 2 optimizers × 2 world sizes
    assert (tmp_path / "memory.md").read_text().startswith("# lcmkit bench memory")
    assert (tmp_path / "memory.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------------------
# the committed table
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table():
    return json.loads(RESULT.read_text())


def _rows(table, **match):
    return [r for r in table["rows"] if all(r[k] == v for k, v in match.items())]


def _one(table, **match):
    found = _rows(table, **match)
    assert len(found) == 1, match
    return found[0]


SETTING = ("arch", "mode", "precision", "optimizer", "checkpointing", "world_size")


def _other(table, row, **change):
    return _one(table, **{**{k: row[k] for k in SETTING}, **change})


def test_table_covers_every_setting(table):
    assert {r["arch"] for r in table["rows"]} >= {"sd15", "sdxl"}
    assert len(table["rows"]) == len({tuple(r[k] for k in SETTING) for r in table["rows"]})
    assert len(table["rows"]) == len({r["arch"] for r in table["rows"]}) * 2 * 2 * 2 * 2 * 2


def test_table_lora_counts(table):
    assert _rows(table, arch="sd15", mode="lora")[0]["trainable_params"] == 67_252_224
    assert _rows(table, arch="sdxl", mode="lora")[0]["trainable_params"] == pytest.approx(196.8e6, abs=0.1e6)


def test_table_fsdp_shards_the_trained_parts_by_8(table):
    for row in _rows(table, world_size=8):
        one = _other(table, row, world_size=1)
        for part in ("student", "target", "optimizer"):
            assert row["resident"][part] * 8 == pytest.approx(one["resident"][part])
        for part in ("teacher", "text_encoders", "vae"):
            assert row["resident"][part] == one["resident"][part]
        assert row["grads"] * 8 == pytest.approx(one["grads"])
        assert row["activations"] == one["activations"]
        if row["mode"] == "full":
            assert row["peak"] < one["peak"]


def test_table_eight_bit_state_is_a_quarter_of_adamw(table):
    for row in _rows(table, optimizer="adamw8bit"):
        adam = _other(table, row, optimizer="adamw")
        assert row["resident"]["optimizer"] * 4 == pytest.approx(adam["resident"]["optimizer"], rel=1e-3)
        assert row["resident"]["optimizer"] == 2 * row["trainable_params"] / row["world_size"]
        assert row["peak"] <= adam["peak"]


def test_table_checkpointing_lowers_activations_and_bf16_the_weights(table):
    for row in _rows(table, checkpointing=True):
        plain = _other(table, row, checkpointing=False)
        assert row["activations"] < 0.5 * plain["activations"], row
    for row in _rows(table, precision="bf16"):
        fp32 = _other(table, row, precision="fp32")
        assert row["resident"]["teacher"] * 2 == fp32["resident"]["teacher"]
        assert row["resident"]["student"] == fp32["resident"]["student"]  # trainable weights stay float32


def test_table_lora_needs_less_than_full(table):
    for row in _rows(table, mode="lora"):
        full = _other(table, row, mode="full")
        assert row["resident"]["optimizer"] < full["resident"]["optimizer"] / 5
        if row["world_size"] == 1 or row["checkpointing"]:
            assert row["peak"] < full["peak"], row
    # not always: without checkpointing over 8 GPUs the adapters' own activations outweigh full mode's sharded
    # weights (SDXL bf16: LoRA 115.7 GiB, full 114.2)
    lora = _one(table, arch="sdxl", mode="lora", precision="bf16", optimizer="adamw", checkpointing=False,
                world_size=8)
    assert lora["activations"] > _other(table, lora, mode="full")["activations"]


def test_table_headline_names_settings_that_fit(table):
    assert headline(table["rows"]) == table["headline"]
    for name, entry in table["headline"].items():
        for card in CARDS_GIB:
            if entry[str(card)]:
                assert entry[str(card)]["peak_gib"] <= USABLE * card
        # a bigger card never fits a smaller batch
        batches = [entry["leanest_one_gpu_max_batch"][str(c)] for c in CARDS_GIB]
        assert batches == sorted(batches)
    sd15 = _one(table, arch="sd15", mode="lora", precision="bf16", optimizer="adamw8bit", checkpointing=True,
                world_size=1)
    assert sd15["peak"] <= USABLE * 24 * GIB  # SD 1.5 LCM-LoRA as the reference scripts run it fits a 24 GB card


def test_table_checks_agree_with_the_real_steps(table):
    assert table["checks"]
    for check in table["checks"]:
        assert check["ratio_tracked_step"] == pytest.approx(1.0, abs=0.01)  # fake tensors = real tensors
        assert 0.9 <= check["ratio_total"] <= 2.0, check["check"]
