"""Train a Representation Forcing model.

    python -m rf_jax.train --config experiments/quickstart.py --workdir workdirs/quickstart

Any config field can be overridden, e.g. `--config.train.steps=200`. A run
resumes from the latest checkpoint in its workdir. Outputs under the workdir:
`checkpoints/`, TensorBoard event files, `metrics.jsonl` (one line per log
point, see `rf_jax.metrics_log`), `samples/step_XXXXXX.png` grids from the
fixed prompts, the final `samples.png`, `captions.txt` for held-out images,
`config.json` and `tokenizer.model` (or, when the run starts from a
pretrained LLM, its `tokenizer.json` and `special_tokens.json`).

On several hosts, start the same command on every host with `--distributed`.
On a TPU pod JAX finds the other processes by itself. Elsewhere also pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rf_jax import checkpointing
from rf_jax.logs import quiet_library_logs
from rf_jax import configs
from rf_jax import metrics_log as metrics_log_lib
from rf_jax import partitioning
from rf_jax import pretrained
from rf_jax import trainer as trainer_lib
from rf_jax.data import build as data_build
from rf_jax.data import pipeline
from rf_jax.inference import Generator, write_captions

# Train-state fields that a stage takes over from the previous one.
STAGE_CARRIED = ("params", "ema_encoder", "codebook")


def prepare_data(config, workdir):
    """Build the data set if needed; copy its tokenizer into the workdir and return it.

    With `config.init.llm_path` set, the tokenizer is the pretrained LLM's instead.
    """
    data_config = config.data
    manifest = data_build.build_dataset(
        data_config.name,
        data_config.dir,
        data_config.image_size,
        data_config.vocab_size,
        allow_download=data_config.allow_download,
    )
    llm_path = config.get("init", {}).get("llm_path")
    if llm_path:
        tokenizer = pretrained.load_tokenizer(llm_path)
        tokenizer.save(workdir)
        return tokenizer
    tokenizer_path = os.path.join(pipeline.dataset_dir(data_config), manifest.tokenizer_file)
    (epath.Path(workdir) / "tokenizer.model").write_bytes(epath.Path(tokenizer_path).read_bytes())
    return pipeline.load_tokenizer(data_config)


def save_run_config(config, workdir):
    """Write the resolved config next to the checkpoints, for sampling and captioning."""
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def flat_hparams(config):
    """Flatten the config into {"section.field": scalar} for TensorBoard's hparams view."""
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                visit(f"{name}.", value)
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value

    visit("", config.to_dict())
    return flat


def log_metrics(writer, step, history, seconds, batch_size):
    """Average the metrics fetched since the last log and write them with the step time."""
    scalars = {key: float(np.mean([m[key] for m in history])) for key in history[0]}
    scalars.update(step_time_s=seconds, examples_per_s=batch_size / seconds)
    writer.write_scalars(step, scalars)
    return scalars


def start_from_previous_stage(trainer, abstract_state, config):
    """Fresh train state carrying the previous stage's parameters, EMA encoder and codebook.

    The optimiser state, step, PRNG state and data iterator start anew. Image size
    changes need no conversion: the 2-D position tables and the encoder's 2-D RoPE
    are computed for the configured grid, and no parameter shape depends on it.
    """
    parts = {name: getattr(abstract_state, name) for name in STAGE_CARRIED}
    found, restored = checkpointing.restore_parts(config.train.init_from, parts)
    logging.info(
        "Starting from step %d of the previous stage in %s: %s carried over; fresh optimiser, "
        "step counter and data iterator.",
        found,
        config.train.init_from,
        ", ".join(STAGE_CARRIED),
    )
    return trainer.init_state(config.train.seed).replace(**restored)


def host_local(tree):
    """Gather `tree` into arrays that one process can compute with alone.

    With one process that is `tree` itself. With several, every process must
    call this, because it all-gathers each array into a full numpy copy on
    every host, so that process 0 can sample without the other processes.
    """
    # NOTE: every host then keeps all parameters in its memory. A model larger than one
    # host's memory would need a sampler that runs on the sharded parameters instead.
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def train_and_evaluate(config, workdir):
    """Run the whole job: data, model, resume, train loop, samples and captions."""
    # Check the config and the mesh before anything is built or written.
    configs.model_config(config, config.data.vocab_size)
    mesh = partitioning.create_mesh(config.mesh)
    # The workdir may be local or on a bucket (gs://...), as with launch/tpu_pod.sh.
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if not config.data.dir:
        with config.unlocked():
            config.data.dir = data_build.default_data_dir()
    logging.info(
        "Devices: %s (process %d of %d).", jax.devices(), jax.process_index(), jax.process_count()
    )

    # Data and tokenizer.
    tokenizer = prepare_data(config, workdir)
    data_iterator = pipeline.make_train_iterator(
        config.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
    )

    # Model and sharded train state.
    model_config = configs.model_config_for_tokenizer(config, tokenizer)
    total_steps = config.train.steps
    trainer = trainer_lib.Trainer(config, model_config, mesh, total_steps)
    abstract_state, state_shardings = trainer.abstract_state()
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info("Model: %.2fM parameters, mesh %s.", param_count / 1e6, dict(mesh.shape))

    # Start-up: this run's checkpoint, else the previous stage's, else fresh initialisation.
    manager = checkpointing.create_manager(
        workdir,
        config.train.keep_checkpoints,
        config.train.checkpoint_every,
        remove_uncommitted=True,
    )
    step, state = checkpointing.restore(manager, abstract_state, data_iterator)
    if state is not None:
        logging.info("Resuming from the checkpoint of step %d in %s.", step, workdir)
    elif config.train.init_from:
        state, step = start_from_previous_stage(trainer, abstract_state, config), 0
    else:
        logging.info(
            "No checkpoint in %s and no train.init_from: starting from fresh initialisation.",
            workdir,
        )
        state, step = trainer.init_state(config.train.seed), 0
        # Pretrained language model and encoder weights, when config.init names them.
        state = pretrained.load_for_training(config, model_config, state)
    # Written only now, so a run refused at start-up leaves the workdir's config as it was.
    save_run_config(config, workdir)
    metrics_log = metrics_log_lib.MetricsLog(workdir, enabled=jax.process_index() == 0)
    metrics_log.truncate(step)

    # Train step, writers and periodic actions.
    train_step = trainer.jit_train_step(state_shardings)
    generator = Generator(config, model_config, tokenizer)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams(flat_hparams(config))
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.train.log_every
    )
    history = []
    window_start = time.perf_counter()

    logging.info("Training from step %d to %d.", step, total_steps)
    try:
        while step < total_steps:
            batch = partitioning.global_batch(next(data_iterator), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            history.append(metrics)
            progress(step)
            # Check the pending metrics before a checkpoint, so no non-finite state is saved.
            if (
                step % config.train.log_every == 0
                or manager.should_save(step)
                or step == total_steps
            ):
                seconds = (time.perf_counter() - window_start) / len(history)
                history = jax.device_get(history)
                if config.train.nonfinite == "error":
                    for index, fetched in enumerate(history):
                        trainer_lib.check_finite(fetched, step - len(history) + index + 1)
                scalars = log_metrics(writer, step, history, seconds, config.data.batch_size)
                metrics_log.append(step, scalars)
                logging.info("Step %d: loss %.4f (%.3f s/step).", step, scalars["loss"], seconds)
                history = []
                window_start = time.perf_counter()
            if (
                config.train.sample_every
                and step % config.train.sample_every == 0
                and step < total_steps
            ):
                params = host_local(state.params)
                if jax.process_index() == 0:
                    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
                    generator.write_grid(params, path, writer, step)
            checkpointing.save(manager, step, state, data_iterator, force=step == total_steps)
    finally:
        # Let an in-flight save finish, also when the loop raised, so it is not left half written.
        manager.wait_until_finished()
        writer.flush()

    # Final sample grid and captions of held-out images.
    params = host_local(state.params)
    if jax.process_index() == 0:
        generator.write_grid(params, os.path.join(workdir, "samples.png"), writer, step)
        write_captions(
            config, model_config, tokenizer, params, os.path.join(workdir, "captions.txt")
        )
    writer.flush()
    manager.close()
    return state


def _define_flags():
    """Define the command-line flags (only when run as a program, so imports never clash)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() first: set it on every host of a multi-host run.",
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "With --distributed: HOST:PORT of process 0, where it serves the coordination "
        "service. Leave unset on a TPU pod, where JAX finds it.",
    )
    flags.DEFINE_integer(
        "num_processes", None, "With --distributed: the number of processes of the run."
    )
    flags.DEFINE_integer(
        "process_id", None, "With --distributed: this process's index, 0 to num_processes - 1."
    )


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Join a multi-process run through `jax.distributed.initialize()`.

    Leave all three arguments None where JAX detects them (TPU pods, Slurm,
    Open MPI), or pass all three. The coordinator address may also come from
    the JAX_COORDINATOR_ADDRESS environment variable, which JAX reads. CPU
    processes exchange collectives over Gloo.

    Raises:
        ValueError: some of the three arguments are set and others are not.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    arguments = dict(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    if any(v is not None for v in arguments.values()) and any(
        v is None for v in arguments.values()
    ):
        raise ValueError(
            f"Got {arguments}: pass all of --coordinator_address, --num_processes and "
            "--process_id, or none of them where JAX detects them (TPU pods, Slurm)."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    logging.info(
        "Joined the distributed run as process %d of %d.", jax.process_index(), jax.process_count()
    )


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if values.config is None or values.workdir is None:
        raise app.UsageError("Both --config and --workdir are required.")
    cluster = dict(
        coordinator_address=values.coordinator_address,
        num_processes=values.num_processes,
        process_id=values.process_id,
    )
    if values.distributed:
        try:
            initialize_distributed(**cluster)
        except ValueError as error:
            raise app.UsageError(str(error)) from error
    elif any(v is not None for v in cluster.values()):
        raise app.UsageError(
            "--coordinator_address, --num_processes and --process_id need --distributed."
        )
    train_and_evaluate(values.config, values.workdir)


def parse_flags(argv):
    """Parse flags; an override of a field the config lacks exits with a plain message."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"{error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as error:
        overrides = [arg for arg in argv if arg.startswith("--config.")]
        field = str(error).strip("\"'")
        sys.exit(
            f"Invalid config override among {overrides}: the config has no field '{field}'. "
            "Check the name against the experiment file passed to --config."
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
