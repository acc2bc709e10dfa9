"""The TPU pod launcher: dry-run commands and argument errors (no gcloud is ever run)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")
ARGS = [
    "--name",
    "demo",
    "--zone",
    "us-central2-b",
    "--accelerator",
    "v4-32",
    "--config",
    "experiments/quickstart.py",
    "--workdir",
    "gs://demo-bucket/run",
]


@pytest.fixture
def no_gcloud_path(tmp_path):
    """A PATH holding only the tools the script needs, so gcloud cannot be found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "git", "mktemp", "cat"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    return str(bin_dir)


def run(args, path):
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", SCRIPT] + args, capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_dry_run_prints_every_step(no_gcloud_path):
    result = run(ARGS + ["--dry-run", "--", "--config.train.steps=10"], no_gcloud_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("gcloud")]
    assert any(" describe demo " in line for line in lines)
    assert any(" create demo " in line and "v4-32" in line for line in lines)
    assert any(" scp " in line and "--worker=all" in line for line in lines)
    install = [line for line in lines if "requirements-tpu.txt" in line]
    assert len(install) == 1
    assert "--worker=all" in install[0]
    train = [line for line in lines if "rf_jax.train" in line]
    assert len(train) == 1
    assert "--worker=all" in train[0]
    assert "gs://demo-bucket/run" in train[0]
    assert "--distributed" in train[0]
    assert "--config.train.steps=10" in train[0]


@pytest.mark.parametrize("drop", ["--name", "--zone", "--accelerator", "--config", "--workdir"])
def test_missing_argument_is_named(no_gcloud_path, drop):
    index = ARGS.index(drop)
    args = ARGS[:index] + ARGS[index + 2 :] + ["--dry-run"]
    result = run(args, no_gcloud_path)
    assert result.returncode == 2
    assert f"missing {drop}" in result.stderr


def test_option_without_value_is_rejected(no_gcloud_path):
    args = ["--zone", "--dry-run"] + ARGS[:2] + ARGS[4:]
    result = run(args, no_gcloud_path)
    assert result.returncode == 2
    assert "option --zone needs a value" in result.stderr


def test_local_workdir_is_rejected(no_gcloud_path):
    args = ARGS[:-1] + ["workdirs/local", "--dry-run"]
    result = run(args, no_gcloud_path)
    assert result.returncode == 2
    assert "gs://" in result.stderr


def test_missing_gcloud_is_plain_error(no_gcloud_path):
    result = run(ARGS, no_gcloud_path)
    assert result.returncode == 2
    assert "gcloud not found" in result.stderr
    assert result.stdout == ""
