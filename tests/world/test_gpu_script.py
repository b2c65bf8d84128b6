"""benchmarks/gpu.py (the GPU acceptance run behind benchmarks/gpu.sh) in ``--smoke`` mode: every part runs on tiny
models (on CPU here, where the CUDA tests skip), so the driver cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_smoke_writes_every_part(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    parts = result["parts"]
    assert list(parts) == ["pytest", "distill-sd15", "distill-sdxl", "latency-sd15", "latency-sdxl", "fsdp"]
    assert parts["fsdp"]["status"] == "not implemented"
    assert parts["pytest"]["status"] == "ok" and (tmp_path / "pytest.txt").is_file()
    for name in ("distill-sd15", "distill-sdxl"):
        d = parts[name]
        assert d["status"] == "ok" and d["losses_finite"] and d["steps_per_second"] > 0, d
        assert abs(d["images_per_second"] - d["batch_size"] * d["steps_per_second"]) < 1e-6 * d["images_per_second"]
        assert d["estimate"]["peak_mb"] > 0, d["estimate"]
    assert parts["distill-sdxl"]["architecture"] == "tiny-xl"
    for name in ("latency-sd15", "latency-sdxl"):
        lat = parts[name]
        assert lat["status"] == "ok" and lat["images_finite"], lat
        assert set(lat["median_seconds"]) == {"lcmkit", "diffusers"} and lat["lcmkit_over_diffusers"] > 0
        assert lat["same_image_max_abs_diff"] < 1e-3  # the same weights and noise: the same image
    md = (tmp_path / "gpu.md").read_text()
    assert "smoke" in md and "FSDP on one GPU: not implemented" in md
    if not result["machine"]["cuda_available"]:
        assert parts["pytest"]["counts"].get("passed", 0) == 0 and parts["pytest"]["counts"].get("skipped", 0) > 0
