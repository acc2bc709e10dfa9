"""The per-step metrics file: appends, truncation on resume, damaged lines."""

import json
import math

import pytest

from rf_jax import metrics_log


def _write_rows(workdir, steps):
    log = metrics_log.MetricsLog(str(workdir))
    for step in steps:
        log.append(step, {"loss": 1.0 / step, "grad_norm": float(step)})
    return log


def test_append_round_trips_floats_exactly(tmp_path):
    log = metrics_log.MetricsLog(str(tmp_path))
    values = {"loss": 0.1 + 0.2, "tiny": 1e-38, "nan": float("nan"), "inf": float("inf")}
    log.append(3, values)
    (row,) = metrics_log.read_metrics(log.path)
    assert row["step"] == 3
    assert row["loss"] == 0.1 + 0.2
    assert row["tiny"] == 1e-38
    assert math.isnan(row["nan"])
    assert row["inf"] == float("inf")


def test_truncate_drops_rows_after_step(tmp_path):
    log = _write_rows(tmp_path, range(1, 8))
    log.truncate(4)
    rows = metrics_log.read_metrics(log.path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[3]["loss"] == 1.0 / 4


def test_truncate_then_append_lists_each_step_once(tmp_path):
    log = _write_rows(tmp_path, range(1, 8))
    log.truncate(3)
    for step in range(4, 10):
        log.append(step, {"loss": 1.0 / step, "grad_norm": float(step)})
    steps = [row["step"] for row in metrics_log.read_metrics(log.path)]
    assert steps == list(range(1, 10))


def test_truncate_to_zero_empties_file(tmp_path):
    log = _write_rows(tmp_path, range(1, 4))
    log.truncate(0)
    assert metrics_log.read_metrics(log.path) == []


def test_truncate_without_file_is_noop(tmp_path):
    log = metrics_log.MetricsLog(str(tmp_path))
    log.truncate(5)
    assert not (tmp_path / metrics_log.FILE_NAME).exists()


def test_partial_last_line_dropped(tmp_path):
    log = _write_rows(tmp_path, range(1, 4))
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # A write cut short by SIGKILL.
    assert [row["step"] for row in metrics_log.read_metrics(log.path)] == [1, 2, 3]
    log.truncate(3)
    with open(log.path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3]


def test_corrupt_line_names_file_and_line(tmp_path):
    log = _write_rows(tmp_path, range(1, 3))
    with open(log.path, "a", encoding="utf-8") as f:
        f.write("not json\n")
        f.write('{"step": 4}\n')
    with pytest.raises(ValueError, match=r"Line 3 of .*metrics.jsonl is not valid JSON"):
        metrics_log.read_metrics(log.path)


def test_row_without_step_rejected(tmp_path):
    path = tmp_path / metrics_log.FILE_NAME
    path.write_text('{"loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='Line 1 of .* has no integer "step"'):
        metrics_log.read_metrics(str(path))


def test_disabled_log_writes_nothing(tmp_path):
    log = metrics_log.MetricsLog(str(tmp_path), enabled=False)
    log.append(1, {"loss": 1.0})
    log.truncate(0)
    assert not (tmp_path / metrics_log.FILE_NAME).exists()
