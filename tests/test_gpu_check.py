"""The GPU check (benchmarks/gpu_check.py) in its CPU mode: CI has no GPU, so this keeps the script working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import config, plan
from helpers.curate import curate
from helpers.dataset import has_curated

PARTS = ["data", "model_3b", "train_3b", "t4_path", "model_8b", "train_8b", "after_train", "predict"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The script run once in its own process, its state folder a temporary one holding the smoke data."""
    home = tmp_path_factory.mktemp("home")
    smoke = config.get_profile("smoke")
    if not has_curated(smoke):
        curate(smoke)
    shutil.copytree(smoke.curated_dir, home / "data" / "curated" / "smoke")
    out = home / "out"
    environment = {**os.environ, config.HOME_ENV: str(home), config.CACHE_ENV: str(config.CACHE_DIR)}
    run = subprocess.run([sys.executable, str(config.REPO_ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                         cwd=config.REPO_ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (home / "results" / plan.GPU_CHECK_REPORT).exists()  # a CPU run never replaces a GPU report
    report = json.loads((home / "results" / "gpu_check_cpu.json").read_text())
    assert json.loads((out / "gpu_check_cpu.json").read_text()) == report
    return run, report, (out / "gpu_check_cpu.md").read_text()


@pytest.mark.slow
def test_the_cpu_mode_says_so_and_runs_every_part(cpu_run):
    run, report, table = cpu_run
    assert "No CUDA GPU here" in run.stdout and table in run.stdout
    assert report["mode"] == "cpu" and report["finished"] and "No CUDA GPU here" in report["note"]
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["seconds"] >= 0
    machine = report["machine"]
    assert machine["device"] == "CPU" and machine["capability"] is None
    assert all(machine["versions"][name] for name in ("torch", "transformers", "bitsandbytes", "peft", "trl"))


@pytest.mark.slow
def test_the_training_rows_measure_speed_with_memory_left_empty(cpu_run):
    _, report, _ = cpu_run
    for key in ("3b", "8b"):
        part = report["parts"][f"train_{key}"]
        assert part["chosen_batch"] == 1 and not part["skipped_batches"]
        assert [(row["batch_size"], row["gradient_accumulation_steps"]) for row in part["rows"]] == [(1, 2), (2, 1)]
        for row in part["rows"]:
            assert row["tokens_per_second"] > 0 and row["seconds_per_1000_books"] > 0 and row["timed_steps"] == 1
            assert row["peak_allocated_gib"] is None and row["peak_reserved_gib"] is None
            assert row["device_in_use_gib"] is None and row["estimate_gib"]["total"] > 0
            checks = row["checks"]
            assert checks["activation_checkpointing"] and checks["optimizer_holds_only_lora"]
            assert checks["optimizer_dtypes"] == ["float32"] and checks["hidden_state_dtypes"] == ["float32"]
            assert checks["losses_finite"] and checks["scaler_scales"] is None


@pytest.mark.slow
def test_the_t4_path_forces_fp16_and_keeps_the_adapter_in_float32(cpu_run):
    _, report, _ = cpu_run
    t4 = report["parts"]["t4_path"]
    assert t4["amp_flags"] == {"bf16": False, "fp16": True} and t4["sft_config_flags"] == {"fp16": True, "bf16": False}
    assert t4["compute_dtype"] == t4["quantization_compute_dtype"] == "float16" and t4["settings_fp16"]
    assert t4["lora_float32_in_optimizer"] is True
    assert t4["scaler_scale_finite"] is None  # no fp16 steps without CUDA
    assert t4["row"]["planned_for"] == ["T4"]


@pytest.mark.slow
def test_train_and_batched_prediction_run(cpu_run):
    _, report, _ = cpu_run
    after = report["parts"]["after_train"]
    assert after["status_of_run"] == "trained" and after["steps"] == 1 and after["gradient_checkpointing"]
    assert after["gpu_memory_after_gib"] is None and after["memory_allocated_after_gib"] is None
    rows = report["parts"]["predict"]["rows"]
    assert [(row["path"], row["precision"]) for row in rows] == [("single-token", "fp32"), ("digit tree", "fp32")]
    for row in rows:
        assert row["medians_equal"] == row["books"] == 3  # in batches of 2, left-padded
        assert row["max_abs_dp"] < 1e-4 and len(row["max_abs_dp_per_row"]) == 3
        assert all(row[f"items_per_second_{kind}"] > 0 for kind in ("batched", "one", "greedy"))


@pytest.mark.slow
def test_cpu_rates_never_reach_the_throughputs_that_plans_read(cpu_run, tmp_path):
    _, report, table = cpu_run
    assert report["throughputs"] == []
    rows = report["cpu_mode_throughputs"]
    assert [row["base_model"] for row in rows] == [config.LLAMA_3B_HUB_ID, config.LLAMA_HUB_ID]
    assert all(row["kind"] == "cpu mode: not a GPU figure" and row["tokens_per_second"] > 0 for row in rows)
    assert "cpu mode: not a GPU figure" in table and "For config.THROUGHPUTS" not in table
    # the same rows in the GPU report's key are what a plan reads: the shape the script writes fits it
    (tmp_path / "results").mkdir()
    gpu_rows = [{**row, "device": "NVIDIA H200", "kind": "measured"} for row in rows]
    (tmp_path / "results" / plan.GPU_CHECK_REPORT).write_text(json.dumps({"throughputs": gpu_rows}))
    measured = plan.measured_throughputs(home=tmp_path)
    assert measured["H200", config.LLAMA_HUB_ID].tokens_per_second == rows[1]["tokens_per_second"]
    assert measured["H200", config.LLAMA_3B_HUB_ID].kind == "measured"  # the GPU check's machine, not this one
