"""Exact resume of `rf_jax.train` after SIGKILL, including a kill during a checkpoint save.

One run of the tiny config has 15 steps, with checkpoints at steps 1, 3, 6,
9, 12 and 15. It is killed with SIGKILL at three points drawn from a seeded
RNG and restarted after each. Then it is compared with an uninterrupted run
of the same command. The kill points are one of each kind:

- "after step": as soon as the log shows that step. Asynchronous saves
  often still run at that moment.
- "during save": the process is stopped with SIGSTOP as soon as the save of
  that step has created its temporary directory, checked to be still
  uncommitted, and then killed. If the save committed before the stop
  landed, the next save is tried.
- "after commit": as soon as the checkpoint directory of that step is renamed
  into place.
"""

import os
import signal

import numpy as np
import pytest

import train_cli

KILL_SEED = 0
STEPS = 15
# Steps whose checkpoints the tiny config saves, which are the first, every 3rd and the last.
SAVE_STEPS = (1, 3, 6, 9, 12, 15)


def _draw_kill_points(rng):
    """Draw (kind, step) kill points, one of each kind, in increasing step order."""
    after_step = int(rng.choice([2, 4, 5, 7, 8]))
    during_save = int(rng.choice([s for s in (3, 6, 9) if s > after_step]))
    after_commit = int(rng.choice([s for s in (6, 9, 12) if s > during_save]))
    return [
        ("after step", after_step),
        ("during save", during_save),
        ("after commit", after_commit),
    ]


def _kill_after_step(process, workdir, log_path, step, leftovers):
    watcher = train_cli.LogWatcher(log_path)
    train_cli.wait_until(
        process, lambda: step in watcher.poll(), f"step {step} in the log", log_path, poll_s=0.005
    )
    train_cli.kill(process)
    return step


def _kill_during_save(process, workdir, log_path, step, leftovers):
    """Kill while the save of `step` (or of a later step) is uncommitted, and return its step.

    `leftovers` are the uncommitted directories of earlier launches. One of
    them has the same name as the new save of its step, so it counts only
    after the restart has deleted it.
    """
    for save_step in [s for s in SAVE_STEPS if s >= step]:
        tmp_name = f"{save_step}.orbax-checkpoint-tmp"
        if tmp_name in leftovers:
            train_cli.wait_until(
                process,
                lambda: tmp_name not in train_cli.uncommitted_dirs(workdir),
                f"the restart to delete the uncommitted {tmp_name}",
                log_path,
            )
        train_cli.wait_until(
            process,
            lambda: tmp_name in train_cli.uncommitted_dirs(workdir),
            f"the save of step {save_step} to start",
            log_path,
        )
        os.kill(process.pid, signal.SIGSTOP)
        stopped_mid_save = tmp_name in train_cli.uncommitted_dirs(workdir)
        if stopped_mid_save and save_step not in train_cli.committed_steps(workdir):
            train_cli.kill(process)
            return save_step
        os.kill(process.pid, signal.SIGCONT)
    train_cli.kill(process)
    raise AssertionError(f"No save from step {step} on was stopped before its commit.")


def _kill_after_commit(process, workdir, log_path, step, leftovers):
    train_cli.wait_until(
        process,
        lambda: step in train_cli.committed_steps(workdir),
        f"the checkpoint of step {step} to commit",
        log_path,
    )
    train_cli.kill(process)
    return step


KILLERS = {
    "after step": _kill_after_step,
    "during save": _kill_during_save,
    "after commit": _kill_after_commit,
}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, cli_data_dir, cli_env):
    """Run the tiny config with three SIGKILLs and restarts.

    Returns (workdir, kill records, log of the final launch).
    """
    workdir = str(tmp_path_factory.mktemp("killed_run"))
    plan = _draw_kill_points(np.random.default_rng(KILL_SEED))
    print(f"Kill points (seed {KILL_SEED}): {plan}")
    records = []
    for launch, (kind, step) in enumerate(plan):
        if records and step <= records[-1]["step"]:
            # A kill during save landed on a later save than drawn: move on past it.
            later = [s for s in SAVE_STEPS if s > records[-1]["step"]]
            assert later, f"No save step is left after {records}."
            step = later[0]
        log_path = os.path.join(workdir, f"launch_{launch}.log")
        leftovers = set(train_cli.uncommitted_dirs(workdir))
        process = train_cli.start(workdir, cli_data_dir, log_path, cli_env)
        try:
            killed_at = KILLERS[kind](process, workdir, log_path, step, leftovers)
        finally:
            train_cli.kill(process)
        records.append(
            dict(
                kind=kind,
                step=killed_at,
                log=log_path,
                committed=train_cli.committed_steps(workdir),
                uncommitted=train_cli.uncommitted_dirs(workdir),
                logged=train_cli.LogWatcher(log_path).poll(),
            )
        )
        print(
            f"Launch {launch}: killed {kind} {killed_at} after logging step "
            f"{max(records[-1]['logged'], default=0)}; committed {records[-1]['committed']}, "
            f"uncommitted {records[-1]['uncommitted']}."
        )
    final_log = os.path.join(workdir, f"launch_{len(plan)}.log")
    train_cli.run(workdir, cli_data_dir, final_log, cli_env)
    return workdir, records, final_log


def test_killed_run_has_three_kinds_of_kill(killed_run):
    _, records, _ = killed_run
    assert [r["kind"] for r in records] == ["after step", "during save", "after commit"]


def test_restart_uses_last_committed_checkpoint(killed_run):
    _, records, final_log = killed_run
    next_logs = [r["log"] for r in records[1:]] + [final_log]
    for record, next_log in zip(records, next_logs):
        expected = max(record["committed"], default=0)
        assert train_cli.resumed_step(next_log) == expected, record


def test_kill_during_save_leaves_uncommitted_save(killed_run):
    _, records, _ = killed_run
    record = records[1]
    assert f"{record['step']}.orbax-checkpoint-tmp" in record["uncommitted"], record
    assert record["step"] not in record["committed"], record


def test_restart_deletes_uncommitted_save(killed_run):
    workdir, records, _ = killed_run
    restart_log = records[2]["log"]
    assert "Deleting" in train_cli.read_log(restart_log)
    assert "uncommitted checkpoint directories" in train_cli.read_log(restart_log)
    assert train_cli.uncommitted_dirs(workdir) == []


def test_kill_after_commit_resumes_from_that_step(killed_run):
    _, records, final_log = killed_run
    assert records[2]["step"] in records[2]["committed"]
    assert train_cli.resumed_step(final_log) == records[2]["step"]


def test_resumed_metrics_bit_identical(killed_run, reference_run):
    workdir, _, _ = killed_run
    resumed = train_cli.metric_rows(workdir)
    reference = train_cli.metric_rows(reference_run)
    # After the restarts every step is in the file once, in order.
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    assert [row["step"] for row in reference] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed, reference):
        # Exact equality: the same computation on the same inputs gives the same bits.
        assert ours == theirs, f"step {ours['step']}"


def test_resumed_state_bit_identical(killed_run, reference_run):
    workdir, _, _ = killed_run
    step, leaves, data = train_cli.final_checkpoint(workdir)
    ref_step, ref_leaves, ref_data = train_cli.final_checkpoint(reference_run)
    assert step == ref_step == STEPS
    assert sorted(leaves) == sorted(ref_leaves)
    for prefix in ("params/", "ema_encoder/", "codebook/prototypes", "codebook/usage", "rng"):
        assert any(name.startswith(prefix) for name in leaves), prefix
    for name, value in ref_leaves.items():
        assert value.dtype == leaves[name].dtype, name
        assert np.array_equal(value, leaves[name]), name
    assert data == ref_data
