"""Per-step training metrics as JSON lines in `<workdir>/metrics.jsonl`.

At every log point process 0 appends one line such as
`{"step": 12, "loss": 3.07, "grad_norm": 0.8, ..., "step_time_s": 0.02}`:
the metrics averaged over the steps since the previous line, plus timing.
At start-up a run drops the lines after the step it resumes from (all of
them on a fresh start), and then writes those steps again. So after any
number of kills and restarts the file lists each logged step once, in
order.
"""

import json
import os

from absl import logging

FILE_NAME = "metrics.jsonl"


def metrics_path(workdir):
    return os.path.join(workdir, FILE_NAME)


def read_metrics(path):
    """Return the rows of a metrics file as a list of dicts, in file order.

    A final line without a newline is a write cut short by a kill, so it is
    dropped with a warning.

    Raises:
        ValueError: a complete line is not a JSON object with an integer "step".
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return _parse(text, path)


def _parse(text, path):
    lines = text.split("\n")
    if lines[-1]:
        logging.warning("Dropping the incomplete last line of %s: %r.", path, lines[-1][:80])
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Line {number} of {path} is not valid JSON ({error}): {line[:80]!r}. "
                "Delete the file or that line; training rewrites it from the restored step."
            ) from error
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(
                f'Line {number} of {path} has no integer "step": {line[:80]!r}. '
                "Delete the file or that line; training rewrites it from the restored step."
            )
        rows.append(row)
    return rows


class MetricsLog:
    """Writer of metric rows to `<workdir>/metrics.jsonl`, which writes nothing unless `enabled`."""

    def __init__(self, workdir, enabled=True):
        self.path = metrics_path(workdir)
        self.enabled = enabled
        if enabled and "://" in str(workdir):
            # NOTE: object stores cannot append to or rewrite a file in place, so a bucket
            # workdir keeps its metrics in the TensorBoard events only.
            logging.warning("Not writing %s: the workdir is on a bucket.", self.path)
            self.enabled = False

    def truncate(self, last_step):
        """Drop the rows after `last_step` (0 drops all), replacing the file atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return
        rows = read_metrics(self.path)
        rows_to_keep = [row for row in rows if row["step"] <= last_step]
        if len(rows_to_keep) == len(rows) and not _has_partial_line(self.path):
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(_line(row) for row in rows_to_keep)
        os.replace(temporary, self.path)
        logging.info(
            "Dropped %d rows after step %d from %s; the run writes them again.",
            len(rows) - len(rows_to_keep),
            last_step,
            self.path,
        )

    def append(self, step, scalars):
        """Append `{"step": step, **scalars}` as one line and flush it to the file."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line({"step": int(step), **scalars}))


def _line(row):
    # Python floats round-trip exactly through json; NaN and Infinity are written as such.
    return json.dumps(row) + "\n"


def _has_partial_line(path):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
