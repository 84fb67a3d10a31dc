"""The training benchmarks run end to end in --quick mode and write their table, CSV, JSON and plot."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def run_benchmark(script: str, out: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def read_rows(path: Path) -> list[dict]:
    with path.open() as rows:
        return list(csv.DictReader(rows))


@pytest.mark.ci
def test_train_throughput_quick_writes_its_results(tmp_path):
    run_benchmark("train_throughput.py", tmp_path)
    stem = tmp_path / "train_throughput_quick"
    table = stem.with_suffix(".md").read_text()
    assert "| recipe | variant | tokens/s | vs sdpa |" in table and "HF sdpa (baseline)" in table
    rows = read_rows(stem.with_suffix(".csv"))
    assert {(r["recipe"], r["variant"]) for r in rows} == {
        (recipe, variant) for recipe in ("gpt2", "bert") for variant in ("eager", "sdpa", "schedule")
    }
    for row in rows:
        assert float(row["tokens_per_s"]) > 0 and float(row["total_peak_mib"]) > 0 and 0 < float(row["mfu"]) < 1
    assert all(float(r["speedup_vs_sdpa"]) == 1.0 for r in rows if r["variant"] == "sdpa")
    assert json.loads(stem.with_suffix(".json").read_text())["machine"]["threads"] >= 1
    assert stem.with_suffix(".png").stat().st_size > 0


def test_memory_quick_writes_its_results(tmp_path):
    run_benchmark("memory.py", tmp_path, "--recipes", "gpt2")
    stem = tmp_path / "memory_quick"
    assert "| recipe | variant | batch | peak MiB (total) |" in stem.with_suffix(".md").read_text()
    rows = read_rows(stem.with_suffix(".csv"))
    assert [r["variant"] for r in rows] == ["sdpa", "schedule", "schedule_checkpoint"]
    assert all(float(r["total_mib"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert stem.with_suffix(".png").stat().st_size > 0


@pytest.mark.ci
def test_finetune_quick_writes_its_results(tmp_path):
    run_benchmark("finetune.py", tmp_path)
    table = (tmp_path / "finetune_quick.md").read_text()
    assert "| variant | real tokens/s | computed tokens/s | speed vs sdpa | peak MiB |" in table
    results = json.loads((tmp_path / "finetune_quick.json").read_text())["results"]
    assert set(results) == {"sdpa", "schedule"}
    assert all(r["round_s"] > 0 and r["peak_mib"] > 0 and r["real_tokens"] < r["computed_tokens"]
               for r in results.values())
    dispatch = results["schedule"]["dispatch"]
    assert dispatch["specialisations"]["BertSelfAttention"] == 2 and dispatch["dispatch_us"] > 0


@pytest.mark.timeout(900)
def test_parallel_memory_quick_halves_the_state_per_rank(tmp_path):
    run_benchmark("parallel_memory.py", tmp_path)
    results = json.loads((tmp_path / "parallel_memory_quick.json").read_text())["results"]
    total = lambda r: r["params"] + r["grads"] + r["optimizer"]  # noqa: E731
    one = total(results["one process"][0])
    for layout in ("FSDP", "TP"):
        assert len(results[layout]) == 2
        assert 0.45 < total(results[layout][0]) / one < 0.6, layout
