"""Peak memory per remat policy, and how step time and memory scale.

    python -m benchmarks.scaling [--size bench|tiny] [--plots DIR]

Memory figures are XLA's ahead-of-time estimates of the compiled RF train
step on this device (`memory_analysis`, as `python -m rf_jax.aot` prints
them): the arguments (the train state and the batch) and the temporaries,
whose size is what a remat policy changes. Nothing runs for them.

Step times are the backbone train step of `benchmarks.train_step` over a
sweep of batch sizes (rows of `size.seq_len` tokens) and of row lengths
(batch `size.batch`).
"""

import argparse
import json
import os

from benchmarks import common
from benchmarks import train_step
from rf_jax import aot
from rf_jax import layer_stack


def train_step_memory(size, remat, scan_layers, depth=None):
    """Bytes of the compiled RF train step: {"argument", "temp", "xla_flops"}."""
    config = common.experiment_config(size, remat=remat, scan_layers=scan_layers, depth=depth)
    report = aot.report(aot.compile_train_step(config, config.data.vocab_size))
    return dict(
        argument=report["argument_size_in_bytes"],
        temp=report["temp_size_in_bytes"],
        xla_flops=report["flops"],
    )


def run(size, peak=None):
    """Memory table, memory against depth, step time against batch and row length."""
    peak = common.matmul_peak(size) if peak is None else peak
    policies = {}
    for scan in (False, True):
        for remat in layer_stack.REMAT_POLICIES:
            policies[f"{remat}{', scan' if scan else ''}"] = train_step_memory(size, remat, scan)
    depth = {
        remat: {d: train_step_memory(size, remat, True, depth=d)["temp"] for d in size.depth_sweep}
        for remat in ("none", "full")
    }
    batch = {
        b: train_step.jax_backbone_step(size, peak, batch=b)["seconds"] for b in size.batch_sweep
    }
    seq = {
        s: train_step.jax_backbone_step(size, peak, seq_len=s)["seconds"] for s in size.seq_sweep
    }
    return dict(
        memory_by_policy=policies,
        temp_memory_by_depth=depth,
        step_seconds_by_batch=batch,
        step_seconds_by_seq_len=seq,
    )


def plot(figures, size, directory):
    """Write the three scaling plots as PNG files into `directory`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    os.makedirs(directory, exist_ok=True)
    paths = []

    def save(name, title, xlabel, ylabel, series):
        figure, axes = pyplot.subplots(figsize=(5, 3.5), dpi=100)
        for label, points in series.items():
            xs = sorted(points)
            axes.plot(xs, [points[x] for x in xs], marker="o", label=label)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = os.path.join(directory, name)
        figure.savefig(path)
        pyplot.close(figure)
        paths.append(path)

    save(
        "benchmark_batch.png",
        f"Backbone step, {size.seq_len}-token rows",
        "batch size",
        "seconds per step",
        {"rf_jax": figures["step_seconds_by_batch"]},
    )
    save(
        "benchmark_seq_len.png",
        f"Backbone step, batch {size.batch}",
        "tokens per row",
        "seconds per step",
        {"rf_jax": figures["step_seconds_by_seq_len"]},
    )
    gib = 1024**3
    save(
        "benchmark_memory_depth.png",
        "RF train step temporaries, scanned layers",
        "backbone layers",
        "GiB (XLA estimate)",
        {
            f"remat {remat}": {d: value / gib for d, value in by_depth.items()}
            for remat, by_depth in figures["temp_memory_by_depth"].items()
        },
    )
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", choices=sorted(common.SIZES))
    parser.add_argument("--plots", default="", help="Write the PNG plots into this directory.")
    args = parser.parse_args()
    size = common.get_size(args.size)
    figures = run(size)
    if args.plots:
        figures["plots"] = plot(figures, size, args.plots)
    print(json.dumps(dict(machine=common.machine(), **figures), indent=2))


if __name__ == "__main__":
    main()
