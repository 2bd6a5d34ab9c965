"""benchmarks/finetune_step.py on tiny-qwen3, CPU, 2 steps: both sides train through their own loops and the ratio
is printed (the plumbing, not a speed claim), and the GPU suite's finetune section runs as its CPU twin."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "finetune_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("finetune_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_steps_on_tiny_qwen3_time_both_sides(tmp_path, capsys):
    bench = _module()
    out = tmp_path / "result.json"
    bench.main(["--model", "tiny-qwen3", "--device", "cpu", "--batch", "2", "--length", "24", "--steps", "2",
                "--warmup", "1", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ratio ours / Trainer" in printed
    result = json.loads(out.read_text())
    assert result["precision"] == "32-true" and result["batch"] == 2 and result["length"] == 24
    for side in ("ours", "trainer"):
        assert len(result["times"][side]) == 2, result["times"]  # warm-up left out
        assert all(t > 0 for t in result["times"][side])
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert 0 < result["labelled_tokens_per_batch"] <= 2 * 24


def test_rows_fill_the_length_and_carry_bio_tags():
    bench = _module()
    rows = bench.token_rows(3, 10)
    assert [len(r["tokens"]) for r in rows] == [10, 10, 10]
    assert all(len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= set(bench.TAGS) for r in rows)
    assert rows == bench.token_rows(3, 10)  # seeded
    # stamps: the end of steps 1..4; a step's time starts at the previous step's end
    assert bench.step_times([0.0, 1.0, 3.0, 6.0], warmup=1) == [1.0, 2.0, 3.0]
    assert bench.step_times([0.0, 1.0, 3.0, 6.0], warmup=2) == [2.0, 3.0]


def test_gpu_suite_finetune_section_cpu_twin(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--tiny", "--sections",
           "finetune", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    [section] = report["sections"]
    assert section["section"] == "finetune" and section["status"] == "ok", section
    [row] = section["rows"]
    assert row["model"] == "tiny-qwen3" and row["ours_s_per_step"] > 0 and row["trainer_s_per_step"] > 0
    assert row["ratio_ours_over_trainer"] > 0
    assert "| finetune | ok |" in (tmp_path / "gpu_suite.md").read_text()
