"""The GPU suite's CPU twin: `benchmarks/gpu_suite.py --device cpu --tiny` runs every section on tiny models,
so the one command a lent GPU gets cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny"]


def test_tiny_suite_writes_every_section_with_sane_numbers(tmp_path):
    proc = subprocess.run([*SUITE, "--output", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == ["correctness", "mntp", "contrastive", "encode", "ubmoe", "ddp"]
    assert all(s["status"] == "ok" and s["rows"] for s in sections.values())
    assert all(s["environment"]["torch"] and "device" in s["environment"] for s in sections.values())
    for row in sections["correctness"]["rows"]:  # bf16 autocast noise, not a leak or a wrong mask
        assert row["max_abs_hidden"] < 0.05 * row["ref_hidden_scale"], row
        assert row["max_abs_grad"] == "n/a (no CPU backward)" or row["max_abs_grad"] < 1e-3, row
    assert {r["mode"] for r in sections["correctness"]["rows"]} == {"causal", "bidirectional"}
    assert sections["mntp"]["rows"][-1]["lever"].startswith("best:")
    assert all(r["tokens_per_sec"] > 0 for r in sections["mntp"]["rows"])
    assert sections["encode"]["rows"][0]["max_abs_embedding_diff"] < 1e-4
    assert [r["stage"] for r in sections["ubmoe"]["rows"]] == ["stage 1", "stage 2"]
    for row in sections["ddp"]["rows"]:  # 2 gloo processes == 1 process with the same global batch
        assert row["max_abs_weight_diff"] < 1e-4, row
    table = (tmp_path / "gpu_suite.md").read_text()
    for name in sections:
        assert f"| {name} | ok |" in table


def test_a_section_over_its_limit_is_reported_and_the_rest_still_run(tmp_path):
    proc = subprocess.run([*SUITE, "--sections", "encode", "ddp", "--limit", "0.5", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [(s["section"], s["status"]) for s in report["sections"]] == [("encode", "timeout"), ("ddp", "timeout")]
    assert "over its 0.5 s limit" in (tmp_path / "gpu_suite.md").read_text()
