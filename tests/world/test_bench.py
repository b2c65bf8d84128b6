"""lcmkit bench: every bench in --smoke mode on tiny random models writes well-formed JSON with its stable keys;
UNet evaluations counted by forward hooks; the LCM-LoRA preset's parameter counts on SD 1.5 and SDXL; the
distillation step's forward check and the paper-claim verdicts on hand-made rows."""

from __future__ import annotations

import json

import pytest
import torch

from lcmkit.cli import main
from lcmkit.errors import LcmkitError
from lcmkit.pipelines import generate
from lcmkit_world.bench import configs
from lcmkit_world.bench.distill import check_forwards
from lcmkit_world.bench.hooks import count_unet_evaluations
from lcmkit_world.bench.quality import (
    claim_beats_control,
    claim_ddim_large_k,
    claim_k1_slow,
    claim_lcm_vs_dpmpp,
)

torch.set_num_threads(1)

MACHINE_KEYS = {"cpu", "cpu_count", "torch_threads", "torch", "diffusers", "gpu", "date"}


def _load(path):
    data = json.loads(path.read_text())
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["command"].startswith("lcmkit bench")
    return data


# --------------------------------------------------------------------------------------------------------------
# counting and parameter counts
# --------------------------------------------------------------------------------------------------------------

def test_unet_evaluations_teacher_cfg_and_lcm():
    pipe = configs.build_pipeline(configs.TINY)
    lcm = configs.lcm_pipeline_from(pipe, configs.build_unet(configs.TINY, full_lcm=True))
    run = lambda p, **kw: lambda: generate(p, "a red circle", height=32, width=32, progress=False,  # noqa: E731
                                           output_type="np", **kw)
    teacher = count_unet_evaluations(pipe, run(pipe, sampler="dpm-solver++", steps=25, guidance=7.5))
    assert teacher == {"unet_calls": 25, "unet_evaluations": 50}  # 25 batched [uncond; cond] forwards
    for n in (1, 2, 4, 8):
        counted = count_unet_evaluations(lcm, run(lcm, sampler="lcm", steps=n, guidance=7.5))
        assert counted == {"unet_calls": n, "unet_evaluations": n}


@pytest.mark.parametrize("name, expected", [("sd15", 67.3e6), ("ssd1b", 104.9e6), ("sdxl", 196.8e6)])
def test_lcm_lora_parameter_counts(name, expected):
    counted = configs.lora_trainable_parameters(configs.ARCHITECTURES[name])
    assert abs(counted["trainable_params"] - expected) <= 0.3e6
    assert counted["unet_params"] == pytest.approx({"sd15": 859.5e6, "ssd1b": 1331.3e6, "sdxl": 2567.5e6}[name], rel=1e-3)


def test_check_forwards_refuses_a_second_computation():
    ok = {"teacher": [4, 4], "target": [2], "student": [2], "backward": [], "optimizer": [], "other": []}
    assert check_forwards(ok, "dpm-solver++", 2) == {"teacher": 2, "target": 1, "student": 1}
    with pytest.raises(LcmkitError, match="computed twice"):
        check_forwards(dict(ok, backward=[2]), "dpm-solver++", 2)  # e.g. a recomputed student forward
    with pytest.raises(LcmkitError):
        check_forwards(ok, "ddim", 2)  # DDIM makes one teacher forward, not two


# --------------------------------------------------------------------------------------------------------------
# smoke runs of the three benches
# --------------------------------------------------------------------------------------------------------------

def test_bench_speed_smoke(tmp_path):
    assert main(["bench", "speed", "--smoke", "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "speed.json")
    assert data["speedup_lcm4_vs_teacher_dpmpp25_cfg"] > 0
    assert data["lcmkit_over_diffusers_time_ratio"] > 0
    tiny = data["models"]["tiny"]
    methods = tiny["methods"]
    assert methods["teacher"]["unet_evaluations"] == 50
    for n in (1, 2, 4):
        assert methods[f"lcm-{n}"]["unet_evaluations"] == n
        assert methods[f"lcm-lora-{n}"]["unet_evaluations"] == n
        assert tiny["speedup"][f"lcm-{n}"]["ceiling"] == 50 / n
    assert methods["diffusers-lcm-4"]["unet_evaluations"] == 4
    for pair in tiny["lcmkit_vs_diffusers"].values():
        assert pair["same_image_max_abs_diff"] < 1e-4  # same model, same seed: the same image
    assert all(m["seconds_per_image"] > 0 for m in methods.values())
    # LCM-LoRA ÷ the full LCM at 4 steps: held fused around the calls (fuse timed apart) and fused per call
    assert methods["lcm-lora-call-4"]["unet_evaluations"] == 4 and "fuse_seconds" not in methods["lcm-lora-call-4"]
    assert methods["lcm-lora-4"]["fuse_seconds"] > 0 and methods["lcm-lora-4"]["restore_seconds"] > 0
    assert methods["lcm-lora-merged-4"]["unet_evaluations"] == 4
    pairs = tiny["lora_vs_merged"]
    assert {k: (p["method"], p["over"]) for k, p in pairs.items()} == {
        "held": ("lcm-lora-4", "lcm-4"), "per_call": ("lcm-lora-call-4", "lcm-4"),
        "held_vs_merged_lora": ("lcm-lora-4", "lcm-lora-merged-4"),
        "per_call_vs_merged_lora": ("lcm-lora-call-4", "lcm-lora-merged-4")}
    assert all(p["ratio"] > 0 and p["cpu_ratio"] > 0 for p in pairs.values())
    # fused (held or per call) and merged into a copy: the same weights, so the same image
    assert pairs["held_vs_merged_lora"]["same_image_max_abs_diff"] == 0
    assert pairs["per_call_vs_merged_lora"]["same_image_max_abs_diff"] == 0
    assert len(data["machine"]["load_average"]) == 3 and len(data["machine"]["load_average_end"]) == 3
    text = (tmp_path / "speed.md").read_text()
    assert text.startswith("# lcmkit bench speed") and "| lcm-lora-4 ÷ lcm-4 |" in text and "Load average" in text
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_bench_speed_without_the_teacher_at_another_resolution(tmp_path, capsys):
    assert main(["bench", "speed", "--smoke", "--repeats", "1", "--no-teacher", "tiny", "--resolution", "tiny=64",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny: lcm-lora-4 / lcm-4 = " in out and "tiny: lcm-lora-call-4 / lcm-lora-merged-4 = " in out
    data = _load(tmp_path / "speed.json")
    assert data["command"] == ("lcmkit bench speed --out " + str(tmp_path) + " --smoke --repeats 1 "
                               "--resolution tiny=64 --no-teacher tiny")
    tiny = data["models"]["tiny"]
    assert tiny["resolution"] == 64 and tiny["latent_size"] == 8
    assert "teacher" not in tiny["methods"] and tiny["speedup"] == {}
    assert tiny["methods"]["lcm-4"]["unet_evaluations"] == 4 and tiny["lora_vs_merged"]["held"]["ratio"] > 0
    assert main(["bench", "speed", "--smoke", "--no-teacher", "sd15", "--out", str(tmp_path)]) == 2
    assert "not among --models" in capsys.readouterr().err


def test_bench_speed_keeps_models_measured_by_an_earlier_run(tmp_path):
    from lcmkit_world.bench.speed import keep_other_models

    earlier = {"command": "lcmkit bench speed --models world,sd15", "machine": {"date": "d0"},
               "models": {"world": {"methods": {"old": 1}}, "sd15": {"methods": {"teacher": 2}},
                          "sdxl": {"unet_forward_seconds": 71.0}}}  # an estimate only: not a measurement to keep
    (tmp_path / "speed.json").write_text(json.dumps(earlier))
    now = {"options": {"estimate_only": False}, "models": {"world": {"methods": {"new": 1}, "command": "c1"}}}
    keep_other_models(now, tmp_path)
    assert list(now["models"]) == ["world", "sd15"]
    assert now["models"]["world"]["methods"] == {"new": 1}
    assert now["models"]["sd15"]["command"] == earlier["command"] and now["models"]["sd15"]["date"] == "d0"
    # an SDXL run alone keeps the world first: the headline's reference model stays the world
    (tmp_path / "speed.json").write_text(json.dumps(dict(earlier, models={"world": {"methods": {"w": 1}}})))
    now = {"options": {"estimate_only": False}, "models": {"sdxl": {"methods": {"x": 1}, "command": "c2"}}}
    keep_other_models(now, tmp_path)
    assert list(now["models"]) == ["world", "sdxl"]


def test_bench_distill_smoke(tmp_path):
    argv = ["bench", "distill", "--smoke", "--in-process", "--solvers", "ddim,dpm-solver++", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = _load(tmp_path / "distill.json")
    assert {(c["mode"], c["solver"]) for c in data["configurations"]} == {
        (m, s) for m in ("full", "lora") for s in ("ddim", "dpm-solver++")}
    for c in data["configurations"]:
        assert c["seconds_per_step"] > 0 and set(c["phases"]) >= {"teacher", "target", "student", "backward",
                                                                   "optimizer", "other"}
        assert c["unet_forwards_per_step"] == {"teacher": 1 if c["solver"] == "ddim" else 2, "target": 1,
                                               "student": 1}
    lora = data["lora_trainable_params"]
    assert list(lora) == ["sd15", "ssd1b", "sdxl"] and all(v["matches_reference"] for v in lora.values())
    assert (tmp_path / "distill.md").exists() and (tmp_path / "distill.png").exists()


def test_bench_distill_configuration_in_a_fresh_process():
    from lcmkit_world.bench.distill import DistillBenchOptions, run_configuration, specs

    spec = specs(DistillBenchOptions(models=["tiny"], modes=["lora"], solvers=["ddim"], steps=1, batch_size=1,
                                     device="cpu", threads=1))[0]
    result = run_configuration(spec, isolated=True)
    assert result["memory_isolated"] and result["memory"]["peak_during_steps_mb"] > 0


@pytest.mark.slow
def test_bench_quality_smoke(tmp_path):
    assert main(["bench", "quality", "--smoke", "--out", str(tmp_path)]) == 0
    keys = {"method", "solver", "steps", "guidance", "accuracy", "world_fid", "n"}
    for name in ("quality", "ablation_skip", "ablation_guidance"):
        data = _load(tmp_path / f"{name}.json")
        assert data["rows"] and all(keys <= set(r) for r in data["rows"])
        assert (tmp_path / f"{name}.png").exists()
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert {r["method"] for r in quality["rows"]} == {"teacher", "control", "lcm-lora", "lcm"}
    assert all(r["guidance"] == 1.0 and r["solver"] == "lcm" for r in quality["rows"] if r["method"] == "control")
    assert all(c["verdict"] in ("agree", "disagree", "not measured") for c in quality["claims"])
    skip = json.loads((tmp_path / "ablation_skip.json").read_text())["rows"]
    assert {(r["skip"], r["solver"]) for r in skip} == {(1, "ddim"), (50, "ddim"), (1, "dpm-solver++"),
                                                        (50, "dpm-solver++")}
    assert "Agreement with the LCM paper" in (tmp_path / "quality.md").read_text()


@pytest.mark.slow
def test_bench_quality_open_prompts(tmp_path):
    assert main(["bench", "quality", "--smoke", "--parts", "table", "--methods", "control", "--prompts", "open",
                 "--out", str(tmp_path)]) == 0
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert quality["options"]["prompts"] == "open" and "--prompts open" in quality["command"]
    assert {r["method"] for r in quality["rows"]} == {"control"}
    assert "Open prompts" in (tmp_path / "quality.md").read_text()


@pytest.mark.slow
def test_bench_quality_skip_ablation_split_over_runs_is_merged(tmp_path):
    """The skip ablation's (solver, k) runs may be made by separate calls into one folder: each keeps the other's
    rows (same budget, checkpoints and scoring), the claims are judged on all of them, and both commands show."""
    base = ["bench", "quality", "--smoke", "--parts", "skip", "--skips", "1,50", "--out", str(tmp_path)]
    assert main(base + ["--solvers", "ddim"]) == 0
    first = _load(tmp_path / "ablation_skip.json")
    assert main(base + ["--solvers", "dpm-solver++"]) == 0
    merged = _load(tmp_path / "ablation_skip.json")
    assert [(r["solver"], r["skip"]) for r in merged["rows"]] == [
        ("ddim", 1), ("ddim", 50), ("dpm-solver++", 1), ("dpm-solver++", 50)]
    assert [r for r in merged["rows"] if r["solver"] == "ddim"] == first["rows"]
    assert len(merged["measured_by"]) == 2 and "--solvers ddim" in merged["measured_by"][0]
    claims = {c["claim"]: c["verdict"] for c in _load(tmp_path / "quality.json")["claims"]}
    assert claims["at large k, DDIM is weaker than DPM-Solver and DPM-Solver++ (k = 50)"] != "not measured"
    assert "--solvers dpm-solver++" in (tmp_path / "quality.md").read_text()
    # a different budget is another experiment: its rows replace the earlier ones instead of mixing with them
    assert main(base + ["--solvers", "ddim", "--budget", "3"]) == 0
    assert {r["solver"] for r in _load(tmp_path / "ablation_skip.json")["rows"]} == {"ddim"}

def test_claim_beats_control():
    row = lambda m, acc, fid: {"method": m, "solver": "lcm", "steps": 1, "accuracy": acc, "world_fid": fid}  # noqa: E731
    control = row("control", 0.88, 2.5)
    assert claim_beats_control([control, row("lcm", 0.95, 1.0), row("lcm-lora", 0.93, 1.2)])["verdict"] == "agree"
    # the world of session 3: the undistilled teacher is as good as the distilled models
    assert claim_beats_control([control, row("lcm", 0.845, 4.3), row("lcm-lora", 0.90, 2.1)])["verdict"] == "disagree"
    assert claim_beats_control([row("lcm", 0.9, 1.0)])["verdict"] == "not measured"


def test_bench_quality_methods_rescore_one_model_and_keep_the_other_rows(tmp_path):
    assert main(["bench", "quality", "--smoke", "--parts", "table", "--out", str(tmp_path)]) == 0
    first = _load(tmp_path / "quality.json")
    assert main(["bench", "quality", "--smoke", "--parts", "table", "--methods", "lcm-lora", "--seed", "1",
                 "--out", str(tmp_path)]) == 0
    second = _load(tmp_path / "quality.json")
    by_method = lambda q, m: [r for r in q["rows"] if r["method"] == m]  # noqa: E731
    for m in ("teacher", "control", "lcm"):
        assert by_method(second, m) == by_method(first, m)                  # kept as the first run wrote them
        assert second["measured_by"][m] == first["command"]
    assert second["measured_by"]["lcm-lora"] == second["command"] and "--methods lcm-lora" in second["command"]
    assert len(by_method(second, "lcm-lora")) == len(by_method(first, "lcm-lora"))
    assert [r["method"] for r in second["rows"]] == [r["method"] for r in first["rows"]]  # same order
    assert "Rows `teacher` measured by" in (tmp_path / "quality.md").read_text()
    assert main(["bench", "quality", "--smoke", "--methods", "lcm,nope", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_bench_quality_parts_run_separately_keep_each_other(tmp_path):
    assert main(["bench", "quality", "--smoke", "--parts", "guidance", "--out", str(tmp_path)]) == 0
    guidance = _load(tmp_path / "ablation_guidance.json")
    assert guidance["rows"] and not (tmp_path / "ablation_skip.json").exists()
    assert main(["bench", "quality", "--smoke", "--parts", "table", "--out", str(tmp_path)]) == 0
    assert _load(tmp_path / "ablation_guidance.json") == guidance          # not overwritten by the table run
    quality = _load(tmp_path / "quality.json")
    assert quality["rows"] and "--parts guidance" not in quality["command"]
    md = (tmp_path / "quality.md").read_text()
    measured_by = [line for line in md.splitlines() if line.startswith("Measured by `lcmkit bench quality")]
    assert len(measured_by) == 1 and "--parts guidance" in measured_by[0]    # the other run's own command
    assert any("ω" in c["claim"] and c["verdict"] != "not measured" for c in quality["claims"])


@pytest.mark.slow
def test_bench_style_smoke(tmp_path):
    assert main(["bench", "style", "--smoke", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path / "style.json")
    names = [r["name"] for r in data["rows"]]
    assert names == ["real", "lcm", "lcf", "style-lora", "style-lora-control", "lcm-lora", "combined 0.5",
                     "combined 1"]
    assert all(0.0 <= r["style_rate"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 for r in data["rows"])
    combined = [r for r in data["rows"] if "lambda_style" in r]
    assert [len(r["loras"]) for r in combined] == [2, 2] and combined[0]["loras"][0]["weight"] == 0.5
    assert {b["bar"] for b in data["bars"]} == {"LCF", "task arithmetic", "beats the control"}
    for name in ("style.md", "style.png", "style_grid.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_style_bars_judge_the_measured_rows():
    from lcmkit_world.bench.style import bars

    def row(name, acc, rate, **kw):
        return dict(name=name, accuracy=acc, style_rate=rate, **kw)

    rows = [row("real", 1.0, 0.98), row("lcm", 1.0, 0.0), row("lcf", 0.9, 0.8), row("lcm-lora", 0.8, 0.0),
            row("combined 0.4", 0.79, 0.5, lambda_style=0.4), row("combined 0.8", 0.70, 0.9, lambda_style=0.8),
            row("combined 1.2", 0.5, 0.99, lambda_style=1.2)]
    lcf, ta = bars(rows)
    assert lcf["met"] and abs(lcf["style_rate_needed"] - 0.8 * 0.98) < 1e-12   # 0.8 >= 0.784, 0.9 >= 0.85
    assert ta["row"] == "combined 0.8" and ta["met"]                           # 0.9 >= 0.784, 0.70 >= 0.68
    rows[5] = row("combined 0.8", 0.60, 0.9, lambda_style=0.8)
    assert not bars(rows)[1]["met"]
    assert bars(rows[:2]) == []                                                 # nothing to judge: no bar
    rows[5] = row("combined 0.8", 0.70, 0.9, lambda_style=0.8, world_fid=2.0)
    rows[6] = row("combined 1.2", 0.69, 0.99, lambda_style=1.2, world_fid=1.0)
    control = bars(rows + [row("style-lora-control", 0.75, 0.95, world_fid=3.0)])[2]
    assert control["bar"] == "beats the control" and control["row"] == "combined 0.8" and not control["met"]
    assert bars(rows + [row("style-lora-control", 0.6, 0.95, world_fid=3.0)])[2]["met"]
    assert not bars(rows + [row("style-lora-control", 0.6, 0.95, world_fid=0.5)])[2]["met"]  # FID counts too
    # the most accurate bar-meeting combination loses on FID, another one that meets the bar beats the control
    control = bars(rows + [row("style-lora-control", 0.6, 0.95, world_fid=1.5)])[2]
    assert control["met"] and control["row"] == "combined 1.2"


# --------------------------------------------------------------------------------------------------------------
# claims judged from numbers
# --------------------------------------------------------------------------------------------------------------

def _row(method, solver, steps, fid, acc, **extra):
    return dict(method=method, solver=solver, steps=steps, guidance=7.5, accuracy=acc, world_fid=fid, n=10, **extra)


def test_claims_follow_the_numbers():
    table = [_row("lcm", "lcm", 2, 10.0, 0.8), _row("teacher", "dpm-solver++", 2, 70.0, 0.2)]
    assert claim_lcm_vs_dpmpp(table)["verdict"] == "agree"
    table[0]["world_fid"] = 50.0  # ahead, but not far ahead
    assert claim_lcm_vs_dpmpp(table)["verdict"] == "disagree"
    assert claim_lcm_vs_dpmpp(table[1:])["verdict"] == "not measured"

    skip = [_row("lcm", s, 4, fid, 0.5, skip=k, train_steps=t) for s, k, t, fid in [
        ("ddim", 1, 100, 40.0), ("ddim", 20, 100, 20.0), ("ddim", 50, 100, 35.0),
        ("dpm-solver", 1, 100, 45.0), ("dpm-solver", 20, 100, 18.0), ("dpm-solver", 50, 100, 22.0),
        ("ddim", 1, 50, 10.0)]]  # an earlier checkpoint: only the final one counts
    assert claim_k1_slow(skip)["verdict"] == "agree"
    assert claim_ddim_large_k(skip)["verdict"] == "agree"
    skip[2]["world_fid"] = 15.0
    assert claim_ddim_large_k(skip)["verdict"] == "disagree"


def test_bad_bench_arguments(tmp_path, capsys):
    assert main(["bench", "distill", "--smoke", "--in-process", "--modes", "half", "--out", str(tmp_path)]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["bench", "quality", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "world teacher not found" in capsys.readouterr().err
    # a wrong LoRA path fails before any row is measured (the teacher rows alone take many minutes)
    assert main(["bench", "quality", "--parts", "table", "--lora", str(tmp_path / "nope"), "--num", "2",
                 "--out", str(tmp_path)]) == 2
    assert "LCM-LoRA file" in capsys.readouterr().err and not (tmp_path / "quality.json").exists()


def test_pooled_rows_average_seeds_and_keep_each():
    from lcmkit_world.bench.pooled import pool

    def row(acc, fid):
        return {"method": "lcm", "steps": 1, "accuracy": acc, "attributes": acc, "well_formed": 1.0, "fidelity": 0.9,
                "world_fid": fid, "seconds_per_image": 0.1, "n": 100}

    (p,) = pool([[row(0.8, 4.0)], [row(0.9, 6.0)], [row(0.7, 5.0)]], [0, 1, 2])
    assert p["accuracy"] == pytest.approx(0.8) and p["world_fid"] == pytest.approx(5.0) and p["n"] == 300
    assert p["spread"] == pytest.approx(0.1) and [s["seed"] for s in p["per_seed"]] == [0, 1, 2]


def test_bars_are_ratios_of_the_reference_row():
    from lcmkit_world.bench.pooled import bars

    rows = [{"method": "reference", "steps": 25, "guidance": 2.0, "accuracy": 0.96, "world_fid": 2.0, "n": 3000},
            {"method": "lcm-lora", "steps": 4, "accuracy": 0.92, "world_fid": 2.7, "n": 3000},
            {"method": "lcm-lora", "steps": 2, "accuracy": 0.86, "world_fid": 3.0, "n": 3000},
            {"method": "lcm", "steps": 1, "accuracy": 0.80, "world_fid": 9.0, "n": 3000}]
    judged = {(b["method"], b["steps"], b["metric"]): b for b in bars(rows)}
    assert set(judged) == {("lcm-lora", 4, "accuracy"), ("lcm-lora", 2, "accuracy"), ("lcm", 1, "accuracy"),
                           ("lcm-lora", 4, "world_fid")}
    assert judged[("lcm-lora", 4, "accuracy")]["needed"] == pytest.approx(0.912)
    assert judged[("lcm-lora", 4, "accuracy")]["met"]               # 0.92 ≥ 0.95 × 0.96
    assert not judged[("lcm-lora", 2, "accuracy")]["met"]           # 0.86 < 0.9 × 0.96 = 0.864
    assert not judged[("lcm", 1, "accuracy")]["met"]                # 0.80 < 0.85 × 0.96 = 0.816
    assert not judged[("lcm-lora", 4, "world_fid")]["met"]          # 2.7 > 1.3 × 2.0
    assert bars(rows[1:]) == []                                     # no reference row, no bars


def test_flow_teachers_are_judged_by_the_flow_bars():
    """A reference row sampled with Euler (a flow-matching teacher): LCM-LoRA at 4 and 2 steps against it, at one
    step against the control at one step."""
    from lcmkit_world.bench.pooled import bars, bars_markdown

    rows = [{"method": "reference", "solver": "euler", "steps": 25, "guidance": 3.0, "accuracy": 0.96,
             "world_fid": 2.0, "n": 3000},
            {"method": "control", "solver": "lcm", "steps": 1, "accuracy": 0.10, "world_fid": 60.0, "n": 3000},
            {"method": "lcm-lora", "solver": "lcm", "steps": 4, "accuracy": 0.92, "world_fid": 2.7, "n": 3000},
            {"method": "lcm-lora", "solver": "lcm", "steps": 1, "accuracy": 0.19, "world_fid": 30.0, "n": 3000}]
    judged = {(b["method"], b["steps"]): b for b in bars(rows)}
    assert set(judged) == {("lcm-lora", 4), ("lcm-lora", 1)}       # no 2-step row, no FID bar for flow
    assert judged[("lcm-lora", 1)]["against"] == "control" and judged[("lcm-lora", 1)]["needed"] == pytest.approx(0.2)
    assert not judged[("lcm-lora", 1)]["met"] and judged[("lcm-lora", 4)]["met"]
    assert "Euler 25 steps" in bars_markdown(rows) and "2 × control" in bars_markdown(rows)
    rows[1]["accuracy"] = rows[3]["accuracy"] = 0.0
    assert not {(b["method"], b["steps"]): b for b in bars(rows)}[("lcm-lora", 1)]["met"]  # 0 is not 2 × 0
