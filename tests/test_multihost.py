"""Two CPU processes train as one multi-host run and match a single-process run.

Both processes run `python -m rf_jax.train --distributed` on 127.0.0.1 and
exchange collectives over Gloo. Each reads its own rows of every global
batch and the mesh is (data 2, fsdp 1, tensor 1). The first launch is
killed (SIGKILL to both processes) as soon as the Orbax checkpoint of step
6 is committed. The second launch, the same command, restores the latest
checkpoint and trains to step 15. Losses and the final state are compared
with the uninterrupted single-process run of the same config, which reads
the same global batches.
"""

import json
import os
import socket
import time

import numpy as np
import pytest

import train_cli
from rf_jax import checkpointing
from rf_jax import train

STEPS = 15
KILL_AFTER_COMMIT = 6
# Two devices sum the two halves of each batch's loss and gradient, one device sums
# all rows at once, so float32 rounding differs. Over 15 steps the losses and the
# gradient norm differed by at most 2.6e-6 relative (CPU, jax 0.10.2), so 1e-4 is allowed.
LOSS_RTOL = 1e-4
# Adam divides by the root of the second moment. So an array whose gradient is near
# zero (the attention key biases here) moves by up to the learning rate on rounding
# noise alone, and single arrays can differ far more than the model does. Each part
# of the state is therefore compared as a whole by its relative norm error. That
# error was at most 1.1e-6 after 15 steps, so 1e-4 is allowed.
STATE_RELATIVE_NORM = 1e-4
STATE_PARTS = ("params/", "opt_state/", "ema_encoder/", "codebook/")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_two_processes(workdir, data_dir, env, name):
    """Start both processes of one launch and return (processes, log paths)."""
    port = _free_port()
    logs = [os.path.join(workdir, f"{name}_process_{i}.log") for i in range(2)]
    processes = [
        train_cli.start(
            workdir,
            data_dir,
            logs[i],
            env,
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    return processes, logs


def _wait_for_two(processes, logs, condition, description):
    """Poll until `condition()`, and fail with the log of a process that exits with an error."""
    deadline = time.monotonic() + train_cli.LAUNCH_TIMEOUT_S
    while not condition():
        # A failed process leaves the other waiting in a collective, so watch both.
        failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
        assert not failed, f"Process {failed[0]} failed:\n{train_cli.tail(logs[failed[0]])}"
        assert (
            time.monotonic() < deadline
        ), f"Timed out waiting for {description}:\n{train_cli.tail(logs[0])}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cli_data_dir, cli_env):
    """Kill a two-process run after its step-6 checkpoint and run it again to the end.

    Returns (workdir, first launch logs, second launch logs, steps committed at the kill).
    """
    workdir = str(tmp_path_factory.mktemp("two_process_run"))
    processes, first = _start_two_processes(workdir, cli_data_dir, cli_env, "first")
    try:
        _wait_for_two(
            processes,
            first,
            lambda: KILL_AFTER_COMMIT in train_cli.committed_steps(workdir),
            f"the checkpoint of step {KILL_AFTER_COMMIT}",
        )
    finally:
        for process in processes:
            train_cli.kill(process)
    committed = train_cli.committed_steps(workdir)

    processes, second = _start_two_processes(workdir, cli_data_dir, cli_env, "second")
    try:
        _wait_for_two(processes, second, lambda: all(p.poll() == 0 for p in processes), "the end")
    finally:
        for process in processes:
            train_cli.kill(process)
    return workdir, first, second, committed


def test_processes_join_one_run(two_process_run):
    _, first, _, _ = two_process_run
    for index, log in enumerate(first):
        text = train_cli.read_log(log)
        assert f"Joined the distributed run as process {index} of 2." in text
        assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in text


def test_processes_read_own_rows(two_process_run):
    _, first, _, _ = two_process_run
    # One generation and one understanding row each, out of 2 + 2 rows a batch.
    expected = {0: "rows [0, 2] of each global batch", 1: "rows [1, 3] of each global batch"}
    for index, log in enumerate(first):
        assert expected[index] in train_cli.read_log(log)


def test_checkpoint_holds_both_iterator_states(two_process_run):
    workdir, _, _, _ = two_process_run
    data_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(STEPS), "data")
    for index in range(2):
        with open(os.path.join(data_dir, f"process_{index}-of-2.json"), encoding="utf-8") as f:
            state = json.load(f)
        # Each process's iterator has produced one batch of its own rows per step.
        assert state["next_index"] == STEPS, state


def test_second_launch_restores_latest_checkpoint(two_process_run):
    _, _, second, committed = two_process_run
    assert KILL_AFTER_COMMIT in committed
    for log in second:
        assert train_cli.resumed_step(log) == max(committed)


def test_two_process_losses_match_one_process(two_process_run, reference_run):
    workdir, _, _, _ = two_process_run
    rows = train_cli.metric_rows(workdir)
    reference = train_cli.metric_rows(reference_run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for ours, theirs in zip(rows, reference):
        for key in ("loss", "loss_text", "loss_rep", "loss_fm", "grad_norm"):
            np.testing.assert_allclose(
                ours[key], theirs[key], rtol=LOSS_RTOL, err_msg=f"step {ours['step']} {key}"
            )


def test_two_process_state_matches_one_process(two_process_run, reference_run):
    workdir, _, _, _ = two_process_run
    step, leaves, _ = train_cli.final_checkpoint(workdir)
    ref_step, ref_leaves, _ = train_cli.final_checkpoint(reference_run)
    assert step == ref_step == STEPS
    assert sorted(leaves) == sorted(ref_leaves)
    for name in ("rng", "step", "skipped_steps"):
        # None of these depends on the data or on the summation order.
        np.testing.assert_array_equal(leaves[name], ref_leaves[name], err_msg=name)
    for part in STATE_PARTS:
        names = [name for name in ref_leaves if name.startswith(part)]
        assert names, part
        ours = np.concatenate([leaves[name].ravel() for name in names]).astype(np.float64)
        theirs = np.concatenate([ref_leaves[name].ravel() for name in names]).astype(np.float64)
        error = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert error <= STATE_RELATIVE_NORM, (part, error)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(coordinator_address="127.0.0.1:1234"),
        dict(num_processes=2, process_id=0),
        dict(coordinator_address="127.0.0.1:1234", num_processes=2),
    ],
)
def test_partial_cluster_arguments_rejected(arguments, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="pass all of --coordinator_address"):
        train.initialize_distributed(**arguments)


def test_coordinator_address_from_environment_counts(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="'coordinator_address': '127.0.0.1:1234'"):
        train.initialize_distributed(num_processes=2)
