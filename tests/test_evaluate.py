"""The evaluation harness: metrics, colours, bad predictors, charts and the leaderboard."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_item
from matplotlib.figure import Figure

from helpers import config
from helpers.charts import chart_stem, plot_calibration, plot_error_by_bucket, plot_scatter, save_charts
from helpers.config import Profile, get_profile
from helpers.dataset import eval_items
from helpers.evaluate import Evaluation, evaluate, is_machine_failure
from helpers.leaderboard import Leaderboard, leaderboard
from helpers.predict import PriceDistributions


def scored(truths: list[float], predictions: list[float], name: str = "model") -> Evaluation:
    """An evaluation of a per-item predictor that answers ``predictions`` in order."""
    items = [make_item(asin=str(index), price=price) for index, price in enumerate(truths)]
    answers = dict(zip((item.asin for item in items), predictions))
    return evaluate(name, lambda item: answers[item.asin], items)


def test_metrics_match_hand_computed_values() -> None:
    metrics = scored([10, 20, 100], [12, 15, 50]).metrics  # errors 2, 5, 50
    assert metrics["n"] == 3 and metrics["n_failed"] == 0
    assert metrics["mae"] == pytest.approx(19.0)
    assert metrics["median_ae"] == pytest.approx(5.0)
    squared_logs = [(math.log(13) - math.log(11)) ** 2, (math.log(16) - math.log(21)) ** 2,
                    (math.log(51) - math.log(101)) ** 2]
    assert metrics["rmsle"] == pytest.approx(math.sqrt(sum(squared_logs) / 3))
    assert metrics["hit_rate"] == pytest.approx(2 / 3)  # the $50 miss on $100 is orange


def test_metrics_skip_failures_but_hit_rate_counts_them_as_misses() -> None:
    evaluation = scored([10, 20, 30, 40], [11, 22, None, "oops"])
    metrics = evaluation.metrics
    assert (metrics["n"], metrics["n_failed"]) == (4, 2)
    assert metrics["mae"] == pytest.approx(1.5)
    assert metrics["hit_rate"] == pytest.approx(0.5)
    assert evaluation.colors == ["green", "green", "red", "red"]


def test_metrics_are_computed_once_on_an_evaluation_that_does_not_change() -> None:
    evaluation = scored([10, 20, 100], [12, 15, 50])
    assert evaluation.metrics is evaluation.metrics  # one bootstrap, however often it is read
    with pytest.raises(dataclasses.FrozenInstanceError):
        evaluation.predictions = np.array([10.0, 20.0, 100.0])


def test_all_failed_gives_nan_metrics_and_a_summary() -> None:
    evaluation = scored([10, 20], [None, None], name="mute")
    metrics = evaluation.metrics
    assert metrics["n_failed"] == 2 and math.isnan(metrics["mae"]) and metrics["hit_rate"] == 0
    assert "2 failed" in evaluation.summary()


@pytest.mark.parametrize(("truth", "prediction", "color"), [
    (100, 139, "green"), (100, 140, "orange"),  # $40, absolute
    (100, 61, "green"), (100, 60, "orange"),  # under-predictions too
    (500, 599, "green"), (500, 600, "orange"),  # 20% of $500 = $100
    (100, 179, "orange"), (100, 180, "red"),  # $80, absolute
    (500, 699, "orange"), (500, 700, "red"),  # 40% of $500 = $200
])
def test_colour_boundaries_are_strict(truth: float, prediction: float, color: str) -> None:
    assert scored([truth], [prediction]).colors == [color]


def test_bootstrap_interval_contains_the_mae_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    truths = rng.uniform(5, 100, 50)
    predictions = truths + rng.normal(0, 10, 50)
    metrics = scored(list(truths), list(predictions)).metrics
    assert metrics["mae_ci_low"] < metrics["mae"] < metrics["mae_ci_high"]
    assert metrics == scored(list(truths), list(predictions)).metrics
    constant_error = scored(list(truths), list(truths + 3)).metrics
    assert constant_error["mae_ci_low"] == pytest.approx(3) == constant_error["mae_ci_high"]


def test_bad_predictions_are_counted_not_crashed() -> None:
    def flaky(item):
        if item.asin == "0":
            raise RuntimeError("model crashed")
        return {"1": None, "2": math.nan, "3": -5.0, "4": "12.00", "5": math.inf,
                "6": 10, "7": np.float32(7.5), "8": True}[item.asin]

    items = [make_item(asin=str(index), price=10.0) for index in range(9)]
    evaluation = evaluate("flaky", flaky, items)
    reasons = dict(evaluation.failures)
    assert sorted(reasons) == [0, 1, 2, 3, 4, 5, 8]
    assert "RuntimeError: model crashed" in reasons[0]
    assert "None" in reasons[1] and "nan" in reasons[2] and "negative" in reasons[3]
    assert "str" in reasons[4] and "inf" in reasons[5] and "bool" in reasons[8]
    assert np.isnan(evaluation.predictions[[0, 1, 2, 3, 4, 5, 8]]).all()
    assert evaluation.predictions[6] == 10 and evaluation.predictions[7] == 7.5
    summary = evaluation.summary()
    assert "7 failed" in summary and "model crashed" in summary


def test_batched_predictor_bad_answers_are_counted() -> None:
    items = [make_item(asin=str(index)) for index in range(3)]
    partial = evaluate("partial", lambda batch: np.array([10.0, np.nan, -1.0]), items, batched=True)
    assert [index for index, _ in partial.failures] == [1, 2]
    assert partial.predictions[0] == 10.0
    answers = evaluate("answers", lambda batch: [None, "twelve", math.inf], items, batched=True)
    assert answers.metrics["n_failed"] == 3


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    MemoryError("Unable to allocate 12.0 GiB"),
])
@pytest.mark.parametrize("batched", [True, False])
def test_machine_failures_stop_the_evaluation_with_the_fix(error: Exception, batched: bool) -> None:
    items = [make_item(asin=str(index)) for index in range(3)]

    def out_of_memory(_):
        raise error

    with pytest.raises(RuntimeError, match="predict_batch_size") as raised:
        evaluate("big model", out_of_memory, items, batched=batched)
    assert str(error) in str(raised.value) and raised.value.__cause__ is error
    assert is_machine_failure(error) and not is_machine_failure(RuntimeError("model crashed"))


DEVICE_MISMATCH = RuntimeError("Expected all tensors to be on the same device, but found at least two "
                               "devices, cuda:0 and cpu! (when checking argument for argument index in method "
                               "wrapper_CUDA__index_select)")


def test_a_device_mismatch_is_a_bug_in_the_code_not_a_machine_failure() -> None:
    assert not is_machine_failure(DEVICE_MISMATCH)
    items = [make_item(asin=str(index)) for index in range(3)]

    def long_books_on_the_wrong_device(item):
        if item.asin == "0":
            raise DEVICE_MISMATCH
        return 10.0

    evaluation = evaluate("half-moved model", long_books_on_the_wrong_device, items)
    assert [index for index, _ in evaluation.failures] == [0]
    assert "Expected all tensors to be on the same device" in evaluation.failures[0][1]


@pytest.mark.parametrize("error", [DEVICE_MISMATCH, ValueError("cannot parse the prompt")])
@pytest.mark.parametrize("batched", [True, False])
def test_a_predictor_that_raises_on_every_book_stops_as_a_bug(error: Exception, batched: bool) -> None:
    items = [make_item(asin=str(index)) for index in range(3)]

    def broken(_):
        raise error

    with pytest.raises(RuntimeError, match="every prediction raised") as raised:
        evaluate("broken", broken, items, batched=batched)
    assert "bug in the predictor" in str(raised.value) and "predict_batch_size" not in str(raised.value)
    assert str(error) in str(raised.value) and raised.value.__cause__ is error


def test_batched_predictor_of_wrong_length_is_a_programming_error() -> None:
    items = [make_item(asin=str(index)) for index in range(3)]
    with pytest.raises(ValueError, match="short"):
        evaluate("short", lambda batch: [10.0, 12.0], items, batched=True)
    with pytest.raises(ValueError, match="silent"):
        evaluate("silent", lambda batch: None, items, batched=True)


def test_leaderboard_replaces_a_rerun_and_sorts_by_mae(tmp_path) -> None:
    board = Leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert board.table().empty
    board.record(scored([10, 20], [30, 40], name="first try"), train_items=91)
    board.record(scored([10, 20], [11, 21], name="good"))
    board.record(scored([10, 20], [12, 22], name="first try"), train_items=91)
    table = board.table()
    assert table["name"].tolist() == ["good", "first try"]
    assert table["mae"].tolist() == pytest.approx([1.0, 2.0])
    assert table.loc[1, "train_items"] == 91
    assert sorted(path.name for path in board.path.parent.iterdir()) == [
        "leaderboard-predictions.csv", "leaderboard.csv"]  # no temp files left
    assert isinstance(board.plot(tmp_path / "board.png"), Figure)
    assert (tmp_path / "board.png").stat().st_size > 0


def test_leaderboard_prints_markdown_best_first(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    board.record(scored([10.0, 20.0], [12.0, 20.0], name="good"))
    board.record(scored([10.0, 20.0], [30.0, 50.0], name="bad"))
    lines = board.markdown().splitlines()
    assert lines[0].startswith("| model | MAE | 95% CI |") and len(lines) == 4  # no reference: no note under it
    assert lines[2].startswith("| good | $1.00 |") and lines[3].startswith("| bad | $25.00 |")
    assert lines[2].endswith("| - | point |")  # no intervals, no baseline to compare with


def test_the_printed_leaderboard_is_narrow_and_rounded(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    truths = [10.0, 20.0, 30.0]
    board.record(scored(truths, [12.0, 19.0, 33.0], name="baseline"), train_items=10)
    board.record(scored(truths, [11.123456, 20.5, 29.0], name="LLM"))
    board.record(scored(truths, [11.0, None, 31.0], name="sometimes silent"))
    summary = board.summary()
    assert len(summary.columns) <= config.TABLE_COLUMNS and len(board.table().columns) > 15  # the CSV keeps everything
    cells = [cell for row in summary.itertuples(index=False) for cell in row]
    assert all(isinstance(cell, str) for cell in cells)
    assert not any(re.search(r"\.\d{3}", cell) for cell in cells)  # 2 decimals at most
    rows = summary.set_index("model")
    assert rows.loc["LLM", "MAE"] == "$0.87" and rows.loc["baseline", "vs reference ($)"] == "reference"
    assert rows.loc["sometimes silent", "reading"] == "point, 1 of 3 failed"
    assert max(len(line) for line in summary.to_string(index=False).splitlines()) <= config.LINE_WIDTH
    assert "the paired MAE difference against baseline" in board.markdown()


def test_the_leaderboard_chart_cuts_a_far_worse_model_so_close_ones_can_be_told_apart(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    rng = np.random.default_rng(0)
    truths = list(rng.uniform(5, 60, 30))
    for name, off in [("Random", 400.0), ("A", 10.0), ("B", 11.0), ("C", 12.0)]:
        board.record(scored(truths, [truth + off for truth in truths], name=name), train_items=10)
    axes = board.plot().axes[0]
    assert axes.get_xlim()[1] < 20  # the close models fill the axis; Random's bar is cut at its edge
    texts = [text.get_text() for text in axes.texts]
    assert r"\$400.00 (bar cut)" in texts and r"\$10.00" in texts  # escaped: matplotlib shows "$", not maths
    assert axes.get_legend() is not None


def distribution_predictor(probabilities: np.ndarray, reading: str = "median"):
    """A batched predictor that answers the given price distributions (one row per book)."""
    return lambda batch: PriceDistributions(probabilities[: len(batch)], reading)


def test_a_distribution_gives_its_reading_coverage_and_calibration(tmp_path) -> None:
    probabilities = np.zeros((4, 999))
    probabilities[:, [9, 19, 29, 39, 49]] = 0.2  # $10..$50, 20% each: the 80% interval is $10-$50
    items = [make_item(asin=str(index), price=price) for index, price in enumerate([20.0, 35.0, 60.0, 10.0])]
    evaluation = evaluate("spread", distribution_predictor(probabilities), items, batched=True)
    assert evaluation.reading == "median" and evaluation.predictions.tolist() == [30.0] * 4
    assert evaluation.metrics["coverage"] == pytest.approx(0.75)  # $60 is outside $10-$50
    calibration = evaluation.calibration()
    assert calibration["nominal"].tolist() == sorted({config.INTERVAL_LEVEL, *config.CALIBRATION_LEVELS})
    assert calibration["observed"].between(0, 1).all()
    assert "median reading, 80% interval covers 75%" in evaluation.summary()
    assert isinstance(plot_calibration(evaluation, tmp_path / "calibration.png"), Figure)
    mean = evaluate("spread", distribution_predictor(probabilities, "mean"), items, batched=True)
    assert mean.reading == "mean" and mean.predictions.tolist() == pytest.approx([30.0] * 4)
    point = scored([20.0], [30.0])
    assert point.reading == "point" and math.isnan(point.metrics["coverage"])
    with pytest.raises(ValueError, match="no intervals"):
        plot_calibration(point)


def test_paired_bootstrap_against_the_best_classical_baseline(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    rng = np.random.default_rng(1)
    truths = list(rng.uniform(5, 100, 40))
    baseline = [truth + error for truth, error in zip(truths, rng.choice([-6.0, 6.0], 40))]  # always $6 off
    board.record(scored(truths, [truth + 30 for truth in truths], name="weak baseline"), train_items=10)
    board.record(scored(truths, baseline, name="strong baseline"), train_items=10)
    board.record(scored(truths, [truth + 4 for truth in truths], name="LLM"))  # always $4 off
    assert board.reference() == "strong baseline"
    table = board.table().set_index("name")
    assert table.loc["LLM", "diff"] == pytest.approx(-2.0)
    assert table.loc["LLM", ["diff_ci_low", "diff_ci_high"]].tolist() == pytest.approx([-2.0, -2.0])
    assert table.loc["weak baseline", "diff"] == pytest.approx(24.0)
    noisy = [truth + error for truth, error in zip(truths, rng.normal(0, 8, 40))]
    board.record(scored(truths, noisy, name="noisy LLM"))
    low, high = board.table().set_index("name").loc["noisy LLM", ["diff_ci_low", "diff_ci_high"]]
    assert low < board.paired("noisy LLM", "strong baseline")[0] < high
    lines = board.markdown().splitlines()
    assert "against strong baseline on the same books" in lines[-1]
    assert "| LLM | $4.00 |" in lines[2] and "| -2.00 (-2.00 to -2.00) |" in lines[2]
    assert any(line.startswith("| strong baseline |") and "| reference |" in line for line in lines)


def test_two_runs_of_one_name_keep_their_own_rows_by_key(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    board.record(scored([10, 20], [15, 25], name="baseline"), train_items=10)
    board.record(scored([10, 20], [12, 22], name="QLoRA r=8"), key="runs/a/adapter")
    board.record(scored([10, 20], [13, 23], name="QLoRA r=8"), key="runs/b/adapter")
    board.record(scored([10, 20], [11, 21], name="QLoRA r=8"), key="runs/a/adapter")  # a re-run of a
    table = board.table()
    assert table["key"].tolist() == ["runs/a/adapter", "runs/b/adapter", "baseline"]
    assert table["mae"].tolist() == pytest.approx([1.0, 3.0, 5.0])
    assert table["diff"].tolist() == pytest.approx([-4.0, -2.0, 0.0])
    assert board.predictions().columns.tolist() == ["truth", "baseline", "runs/a/adapter", "runs/b/adapter"]
    assert board.paired("runs/b/adapter", "runs/a/adapter")[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="runs/a/adapter, runs/b/adapter"):
        board.paired("QLoRA r=8", "baseline")  # which of the two?
    lines = board.markdown().splitlines()
    assert lines[2].startswith("| QLoRA r=8 [runs/a/adapter] | $1.00 |")
    assert lines[3].startswith("| QLoRA r=8 [runs/b/adapter] | $3.00 |") and lines[4].startswith("| baseline |")
    assert len(board.plot().axes[0].patches) == 3  # one bar each, not one shared by the repeated name


def test_a_leaderboard_written_before_keys_reads_each_name_as_its_key(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    board.record(scored([10, 20], [15, 25], name="baseline"), train_items=10)
    board.record(scored([10, 20], [12, 22], name="LLM"))
    rows = pd.read_csv(board.path).drop(columns="key")
    rows.to_csv(board.path, index=False)  # as the leaderboard was written before rows had keys
    assert board.table()["key"].tolist() == ["LLM", "baseline"]
    assert board.table().loc[0, "diff"] == pytest.approx(-3.0)
    board.record(scored([10, 20], [11, 21], name="LLM"))
    assert board.table()["name"].tolist() == ["LLM", "baseline"]  # replaced, not added
    assert board.table().loc[0, "mae"] == pytest.approx(1.0)


def test_an_explicit_reference_replaces_the_best_baseline(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    board.record(scored([10, 20], [15, 25], name="baseline"), train_items=10)
    board.record(scored([10, 20], [12, 22], name="QLoRA 4-bit"), key="runs/smoke/qlora/adapter")
    board.record(scored([10, 20], [13, 23], name="QLoRA merged bf16"), key="runs/smoke/qlora/merged")
    table = board.table(reference="QLoRA 4-bit")
    assert set(table["vs_reference"]) == {"runs/smoke/qlora/adapter"}
    assert table.set_index("name")["diff"].to_dict() == pytest.approx(
        {"QLoRA 4-bit": 0.0, "QLoRA merged bf16": 1.0, "baseline": 3.0})
    lines = board.markdown(reference="runs/smoke/qlora/adapter").splitlines()
    assert "against QLoRA 4-bit on the same books" in lines[-1]
    assert "| reference |" in lines[2] and "| +1.00 (+1.00 to +1.00) |" in lines[3]
    assert "against baseline on the same books" in board.markdown()
    with pytest.raises(ValueError, match="no-such-model"):
        board.table(reference="no-such-model")


def test_rows_scored_on_other_books_are_marked_and_compared_with_nothing(tmp_path) -> None:
    board = Leaderboard(tmp_path / "leaderboard.csv")
    board.record(scored([10, 20], [11, 21], name="old baseline"), train_items=10)
    board.record(scored([10, 20], [12, 22], name="old LLM"))
    board.record(scored([30, 40, 50], [35, 45, 55], name="new baseline"), train_items=10)  # other books
    board.record(scored([30, 40, 50], [32, 42, 52], name="new LLM"))
    assert board.reference() == "new baseline"  # the best baseline on the books the others can be compared on
    table = board.table().set_index("name")
    assert table["latest_books"].to_dict() == {"old baseline": False, "old LLM": False, "new LLM": True,
                                               "new baseline": True}
    assert table.loc["new LLM", "diff"] == pytest.approx(-3.0) and table.loc["old LLM", ["diff"]].isna().all()
    markdown = board.markdown()
    assert "| old LLM | $2.00 | $2.00-2.00 | other books |" in markdown
    assert "*other books* were scored on another set of books" in markdown


def test_profile_paths_and_the_fixed_eval_subset() -> None:
    profile = get_profile("smoke", eval_size=2)
    assert leaderboard(profile).path == profile.results_dir / "leaderboard.csv"
    test = [make_item(asin=str(index)) for index in range(5)]
    assert [item.asin for item in eval_items(test, profile)] == ["0", "1"]
    with pytest.raises(ValueError):
        eval_items([], profile)


def test_charts_are_figures_and_saved_as_png(tmp_path, monkeypatch) -> None:
    evaluation = scored([5, 15, 45, 90, 150, 400], [6, 10, 50, None, 100, 300], name="Bag of words + LR")
    for plot in (plot_scatter, plot_error_by_bucket):
        assert isinstance(plot(evaluation), Figure)
    monkeypatch.setattr(Profile, "results_dir", property(lambda self: tmp_path))
    paths = save_charts(evaluation, get_profile("smoke"))
    assert set(paths) == {"scatter", "error_by_bucket"}
    for path in paths.values():
        assert path.parent == tmp_path / "charts" and path.name.startswith("bag-of-words-lr")
        assert path.read_bytes().startswith(b"\x89PNG")
    assert chart_stem("Gradient boosting (text + features)") == "gradient-boosting-text-features"
