"""The benchmark runs end to end on a tiny shape (one repeat) so that it cannot rot; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench/run.py", "--quick", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "× transformers generate" in result.stdout
    data = json.loads(out.read_text())
    tiny = data["shapes"]["tiny"]
    assert set(tiny["decode"]) == {"gpt2viz, no capture", "gpt2viz, app capture", "gpt2viz, eager attention + logit lens every step",
                                   "transformers generate", "transformers + attentions + hidden states"}
    assert all(v["tokens_per_s"] > 0 for v in tiny["decode"].values())
    assert set(map(int, tiny["prefill"])) == {32, 128}
    # 3 tokens come in 3 messages, or fewer when the server sends tokens made meanwhile together (the stream's batches)
    assert 1 <= tiny["app"]["steps"] <= 3 and tiny["app"]["bytes_per_step_median"] > 0
    assert all(v > 0 for v in tiny["view_recompute"].values()) and "lens_one_position_s" in tiny["view_recompute"]
    memory = tiny["memory_mib"]
    assert set(memory) == {"decode", "prefill 128"}
    assert set(memory["decode"]) == set(tiny["decode"]) and len(memory["prefill 128"]) == 4
    # each contender measured in its own process: a full capture of 128 positions holds something
    assert memory["prefill 128"]["gpt2viz trace (with logit lens at every position)"] > 0
    # the README's tables are written from such a file
    report = subprocess.run([sys.executable, "bench/report.py", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| gpt2viz, no capture | " in report.stdout and "| tiny, 128 | " in report.stdout


def test_the_ceiling_benchmark_runs_and_reports_each_level(tmp_path):
    out = tmp_path / "ceiling.json"
    result = subprocess.run([sys.executable, "bench/ceiling.py", "--quick", "--sessions", "3", "--repeats", "1", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["alone_tps"] > 0 and [level["sessions"] for level in data["levels"]] == [3]
    level = data["levels"][0]
    assert all(level[k] > 0 for k in ("together_tps", "products_tps", "products_choosing_tps", "pass_ms", "products_ms", "choosing_ms"))
    assert "| 3 | " in result.stdout
