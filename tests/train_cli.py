"""Helpers that launch `python -m rf_jax.train` on the tiny config and inspect its workdir."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from rf_jax import checkpointing
from rf_jax.metrics_log import metrics_path, read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "tests", "scripts", "tiny_train_config.py")
# Wall-clock limit of one launch. A launch of the tiny run took 10 to 120 s on 2 shared
# CPU cores.
LAUNCH_TIMEOUT_S = 300
# Metrics that depend on the wall clock, not on the computation.
TIMING_KEYS = ("step_time_s", "examples_per_s")


def cli_env(cache_dir):
    """Environment for a launch: this checkout's rf_jax, the CPU, a shared compile cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        # Without LLVM optimisation XLA compiles the tiny model about twice as fast.
        # Every launch uses the same flags, so they all run the same programs.
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )
    return env


def command(workdir, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "rf_jax.train",
        "--config",
        CONFIG,
        f"--config.data.dir={data_dir}",
        "--workdir",
        workdir,
        *extra,
    ]


def start(workdir, data_dir, log_path, env, *extra):
    """Start one training process whose stdout and stderr go to `log_path`."""
    log = open(log_path, "w", encoding="utf-8")
    try:
        return subprocess.Popen(
            command(workdir, data_dir, *extra), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    finally:
        log.close()


def run(workdir, data_dir, log_path, env, *extra):
    """Run one training process to completion, and fail with the tail of its log if it fails."""
    process = start(workdir, data_dir, log_path, env, *extra)
    finish(process, log_path)


def finish(process, log_path):
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"Training did not finish in {LAUNCH_TIMEOUT_S} s:\n{tail(log_path)}")
    assert code == 0, f"Training exited with {code}:\n{tail(log_path)}"


def tail(log_path, lines=40):
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def read_log(log_path):
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def resumed_step(log_path):
    """The step the launch restored (0 for a fresh start), from its start-up log."""
    text = read_log(log_path)
    found = re.search(r"Resuming from the checkpoint of step (\d+)", text)
    if found:
        return int(found.group(1))
    assert "starting from fresh initialisation" in text, tail(log_path)
    return 0


def committed_steps(workdir):
    """Steps whose checkpoint directory Orbax has committed (renamed into place)."""
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def uncommitted_dirs(workdir):
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if ".orbax-checkpoint-tmp" in name)


class LogWatcher:
    """Reads a growing log file incrementally and collects its "Step N: loss" lines."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.steps = []
        self._offset = 0
        self._partial = ""

    def poll(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            f.seek(self._offset)
            text = self._partial + f.read()
            self._offset = f.tell()
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            found = re.search(r"Step (\d+): loss", line)
            if found:
                self.steps.append(int(found.group(1)))
        return self.steps


def wait_until(process, condition, description, log_path, poll_s=0.001):
    """Poll `condition()` until it is true, and fail if the process exits first."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"Training exited ({process.returncode}) before {description}.\n{tail(log_path)}"
            )
        if time.monotonic() > deadline:
            kill(process)
            raise AssertionError(f"Timed out waiting for {description}.\n{tail(log_path)}")
        time.sleep(poll_s)


def kill(process):
    """SIGKILL the process (also when stopped) and reap it."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def metric_rows(workdir):
    """Rows of metrics.jsonl without the wall-clock fields."""
    rows = read_metrics(metrics_path(workdir))
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_checkpoint(workdir):
    """The latest checkpoint as stored: (step, {path: numpy array}, {file: iterator state}).

    Arrays are read as numpy, so a checkpoint saved on another device
    topology (two processes) reads the same way as one from a single device.
    """
    directory = checkpointing.checkpoint_dir(workdir)
    step = max(committed_steps(workdir))
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = os.path.join(directory, str(step), "state")
    metadata = checkpointer.metadata(state_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    leaves = {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    data_dir = os.path.join(directory, str(step), "data")
    data = {}
    for name in sorted(n for n in os.listdir(data_dir) if n.startswith("process_")):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            data[name] = json.load(f)
    return step, leaves, data
