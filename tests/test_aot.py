"""Ahead-of-time compilation of the train step over a simulated 8-device mesh."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_reports_memory_on_fake_mesh():
    command = [
        sys.executable,
        "-m",
        "rf_jax.aot",
        "--config",
        os.path.join(ROOT, "experiments", "quickstart.py") + ":runlocal",
        "--devices",
        "8",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "devices: 8 (cpu)" in result.stdout
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert int(lines["argument_size_in_bytes"].split()[0]) > 0
    assert int(lines["temp_size_in_bytes"].split()[0]) > 0
    assert float(lines["flops per step (per device, XLA estimate)"]) > 0
