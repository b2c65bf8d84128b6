"""lcmkit eval: settings grid, repeatable numbers, outputs, CLI refusals (tiny random pipelines)."""

import json

import pytest

from lcmkit.cli import main
from lcmkit_world.evaluate.run import Setting, evaluate, settings_grid


def test_settings_grid_order():
    grid = settings_grid(["lcm", "ddim"], [1, 4], [7.5])
    assert [(s.sampler, s.steps) for s in grid] == [("lcm", 1), ("lcm", 4), ("ddim", 1), ("ddim", 4)]


def test_evaluate_is_repeatable_and_writes_outputs(tiny_sd_dir, tmp_path):
    settings = [Setting("lcm", 1, 1.0), Setting("ddim", 2, 2.0)]
    kw = dict(num=6, n_real=20, batch_size=4, teacher=tiny_sd_dir, progress=False)
    a = evaluate(tiny_sd_dir, settings, out_dir=tmp_path / "a", **kw)
    b = evaluate(tiny_sd_dir, settings, **kw)
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["accuracy"] == rb["accuracy"] and ra["world_fid"] == rb["world_fid"]
        assert ra["trajectory_error"] == rb["trajectory_error"] and ra["trajectory_error"] > 0
        assert 0.0 <= ra["accuracy"] <= 1.0 and ra["n"] == 6
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["lcm", "ddim"] and saved["fid_floor"] >= 0
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert "| lcm | 1 |" in (tmp_path / "a" / "eval.md").read_text()


def test_eval_cli_and_refusals(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "e"
    args = ["eval", str(tiny_sd_dir), "--sampler", "lcm", "--steps", "1", "--guidance", "1", "--num", "4",
            "--n-real", "10", "--out", str(out)]
    assert main(args) == 0
    assert "strict accuracy" in capsys.readouterr().out
    assert (out / "sheet-lcm-1-g1.png").is_file()  # the setting's contact sheet, verdicts drawn on its tiles
    assert main(args) == 2  # results already there
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:-2] + ["--sampler", "euler", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sampler" in err[0]
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_sd_dir), "--steps", "a,b", "--out", str(tmp_path / "g")])


def test_eval_cli_fuses_loras_unless_no_fuse_loras(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    import lcmkit_world.evaluate.run as run
    from lcmkit.errors import LcmkitError

    seen = []

    def fake_evaluate(*a, fuse_loras, **k):
        seen.append(fuse_loras)
        raise LcmkitError("stopped before sampling")

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    args = ["eval", str(tiny_sd_dir), "--steps", "1", "--out", str(tmp_path / "e")]
    assert main(args) == 2 and main(args + ["--no-fuse-loras"]) == 2
    assert seen == [True, False]
    assert "stopped before sampling" in capsys.readouterr().err


def test_open_prompts_leave_attributes_out_and_count_only_the_named(tiny_sd_dir, tmp_path, capsys):
    from lcmkit.errors import LcmkitError
    from lcmkit_world import world
    from lcmkit_world.evaluate.run import eval_prompts

    specs, named, captions = eval_prompts(32, seed=0, prompts="open")
    exact_specs, exact_named, exact_captions = eval_prompts(32, seed=0)
    assert specs == exact_specs and exact_named is None  # same images asked for, fewer words
    assert all(world.parse_open_caption(c) == {a: getattr(s, a) for a in n}
               for s, n, c in zip(specs, named, captions))
    assert sum(c != e for c, e in zip(captions, exact_captions)) >= 28  # 1 in 16 subsets is the whole caption
    with pytest.raises(LcmkitError, match="prompt set"):
        eval_prompts(4, prompts="vague")
    out = tmp_path / "open"
    assert main(["eval", str(tiny_sd_dir), "--sampler", "lcm", "--steps", "1", "--guidance", "1", "--num", "4",
                 "--n-real", "10", "--prompts", "open", "--out", str(out)]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["prompt_set"] == "open" and saved["prompts"] == captions[:4]
    assert "open prompts" in capsys.readouterr().out
