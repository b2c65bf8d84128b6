"""lcmkit demo wiring on a tiny random teacher: distil, evaluate every column, write the grid and report."""

import json

from lcmkit.cli import main
from lcmkit_world.demo import TEACHER_GUIDANCE, DemoConfig, columns, run_demo


def test_columns():
    labels = [c[0] for c in columns("lora")]
    assert labels == ["teacher DPM-Solver++ 25", "teacher DDIM 4", "control: teacher, LCM 1",
                      "LCM-LoRA 1", "LCM-LoRA 2", "LCM-LoRA 4"]
    control = columns("lora")[2]
    assert control[1] == "teacher" and (control[2].sampler, control[2].steps, control[2].guidance) == ("lcm", 1, 1.0)
    assert all(s.guidance == 1.0 for _, which, s in columns("lora") if which == "student")  # guidance baked in
    for prompts, g in TEACHER_GUIDANCE.items():  # teacher and full LCM at the teacher's best guidance
        assert all(s.guidance == g for label, _, s in columns("full", prompts) if not label.startswith("control"))


def test_demo_end_to_end_on_tiny_teacher(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), teacher=str(tiny_sd_dir), max_steps=2, batch_size=2, num=4, grid_prompts=2)
    run_demo(cfg, progress=False)
    report = json.loads((out / "report.json").read_text())
    assert [r["column"] for r in report["rows"]] == [c[0] for c in columns("lora")]
    assert all(0 <= r["accuracy"] <= 1 and r["seconds_per_image"] > 0 for r in report["rows"])
    assert (out / "grid.png").stat().st_size > 0
    assert (out / "distill" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "| LCM-LoRA 4 |" in (out / "report.md").read_text()
    config = (out / "distill" / "config.yaml").read_text()
    assert "lora_ema: 0.95" in config  # the EMA target is the default
    assert "data: world:open" in config and report["config"]["prompts"] == "open"  # open captions by default
    from lcmkit_world import world

    assert all(world.parse_open_caption(p) for p in report["grid_prompts"])
    assert "open prompts" in (out / "report.md").read_text()
    # a finished demo is not overwritten without --overwrite
    assert main(["demo", "--out", str(out), "--teacher", str(tiny_sd_dir), "--steps", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
