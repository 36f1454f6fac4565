"""`mtplx bench`: one process, AR and depths interleaved, table + JSON with the cost model."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_json_report(demo_bf16_path, tmp_path):
    """On the demo's bf16 trunk: its cost model times verify passes, a quarter of the 4-bit demo's time."""
    out_file = tmp_path / "bench.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\\n    return\nimport os\\n\n")
    run = subprocess.run([sys.executable, "-m", "mtplx", "bench", "--model", str(demo_bf16_path), "--depths", "0,1,2",
                          "--max-tokens", "10", "--prompts", str(prompts), "--json", str(out_file)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "tok/s" in run.stdout and "Verify cost relative to one AR step" in run.stdout
    report = json.loads(out_file.read_text())
    assert set(report["depths"]) == {"0", "1", "2"}
    assert report["prompts"] == 2
    assert report["mlx_lm_generate_tps"] > 0
    cost = report["cost_model"]
    assert set(cost["verify_ms"]) == {"1", "2", "3"} and cost["draft_ms"] > 0
    for d in ("1", "2"):
        r = report["depths"][d]
        assert len(r["acceptance"]) == int(d) and r["tokens_per_step"] >= 1
        assert r["bound"] > 0 and r["share_of_bound"] > 0
        assert abs(sum(r["phase_share"].values()) - 1) < 1e-3  # shares are rounded to 4 digits
    assert report["depths"]["0"]["speedup_vs_ar"] == 1.0
