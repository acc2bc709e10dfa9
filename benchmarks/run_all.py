"""Run every benchmark in one process and write `docs/benchmarks.md` with its plots.

    python -m benchmarks.run_all                    # the bench size, into docs/
    python -m benchmarks.run_all --size tiny --output_dir /tmp/bench

One process runs everything, so the figures that are compared (rf_jax and
transformers, a cached and an uncached sampler, a step and the matmul peak)
are measured on the same machine in the same state. The text between the
`<!-- notes -->` and `<!-- /notes -->` markers of an existing document is
kept, so the analysis written there survives a rerun.
"""

import argparse
import datetime
import json
import os
import sys
import time

from benchmarks import common
from benchmarks import sampler
from benchmarks import scaling
from benchmarks import train_step

NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"

# (name, target, how to read the ratio, higher is better)
GOALS = (
    ("Full RF train-step MFU (of the measured matmul peak)", 0.5, "mfu", True),
    ("Backbone train step, speed-up over transformers", 1.5, "train_speedup", True),
    ("Greedy decode per token, speed-up over transformers generate", 3.0, "decode_speedup", True),
    ("Pixel ODE evaluation with the cached prefix / pixels alone", 1.1, "ode_ratio", False),
)


def goal_met(value, target, higher):
    """Return whether `value` reaches `target` (from above when `higher` is false)."""
    return value >= target if higher else value <= target


def run(size):
    start = time.perf_counter()
    peak = common.matmul_peak(size)
    figures = dict(
        size=size.name,
        machine=common.machine(),
        date=datetime.date.today().isoformat(),
        command=" ".join(["python -m benchmarks.run_all"] + sys.argv[1:]),
        matmul_peak_flops=peak,
        train=train_step.run(size, peak),
        sampler=sampler.run(size),
        scaling=scaling.run(size, peak),
    )
    figures["matmul_peak_flops_at_end"] = common.matmul_peak(size)
    figures["seconds"] = time.perf_counter() - start
    return figures


def goal_ratios(figures):
    train, samples = figures["train"], figures["sampler"]
    return dict(
        mfu=train["rf_train_step"]["mfu"],
        train_speedup=train["speedup_over_transformers"],
        decode_speedup=samples["decode_speedup_over_transformers"],
        ode_ratio=samples["ode_cached_over_pixels_alone"],
    )


def _ms(seconds):
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _count(flops):
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g}"


def _gib(count):
    return f"{count / 1024**3:.3f}"


def render(figures, size, plots, notes):
    """Render `figures` as the markdown document."""
    machine = figures["machine"]
    train, samples, scale = figures["train"], figures["sampler"], figures["scaling"]
    rf, backbone, torch_step = (
        train["rf_train_step"],
        train["backbone_train_step"],
        train["transformers_train_step"],
    )
    whole = train["backbone_train_step_without_query_blocks"]
    ratios = goal_ratios(figures)
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {figures['date']} with `{figures['command']}` "
        f"({figures['seconds'] / 60:.0f} min), size `{size.name}`.",
        "",
    ]
    if size.name != "bench":
        lines += [
            f"**The `{size.name}` size only checks that the scripts run: its figures and "
            "goal verdicts mean nothing.**",
            "",
        ]
    lines += [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, JAX device "
        f"{machine['jax_device']}, jax {machine['jax']}, Python {machine['python']}; "
        f"torch {torch_step['torch']} ({torch_step['torch_threads']} threads), "
        f"transformers {torch_step['transformers']}.",
        f"- Model: backbone width {size.width}, depth {size.depth}, {size.num_heads} query and "
        f"{size.num_kv_heads} key-value heads, MLP {size.mlp_dim}, vocabulary "
        f"{size.vocab_size}; encoder width {size.encoder_width}, depth {size.encoder_depth}; "
        f"{size.image_size} px images; float32; random weights; one device; attention in "
        f"blocks of {size.query_block} queries (`model.attention_query_block`) unless "
        "marked otherwise.",
        f"- Rows: a generation row has {size.seq_len} tokens ({size.text_len} text, "
        f"{samples['rep_tokens'] + 1} BOR and rep, {size.seq_len - size.text_len - samples['rep_tokens'] - 1} "
        f"pixel patches); batch {size.batch}.",
        f"- Dense float32 matmul peak ({size.matmul_size}x{size.matmul_size}, best of "
        f"{max(3, size.repeats)}): {figures['matmul_peak_flops'] / 1e9:.1f} GFLOP/s at the start, "
        f"{figures['matmul_peak_flops_at_end'] / 1e9:.1f} GFLOP/s at the end.",
        f"- Times are medians of {size.repeats} calls after a warm-up call, compilation "
        "excluded; the uncached samplers run once.",
        "",
        "## Goals",
        "",
        "| Goal | Target | Measured | Met |",
        "| --- | --- | --- | --- |",
    ]
    for name, target, key, higher in GOALS:
        value = ratios[key]
        measured = f"{value:.1%}" if key == "mfu" else f"{value:.2f}x"
        bound = f">= {target:.0%}" if key == "mfu" else f"{'>=' if higher else '<='} {target}x"
        met = "yes" if goal_met(value, target, higher) else "no"
        lines.append(f"| {name} | {bound} | {measured} | {met} |")
    lines += [
        "",
        "## Train step",
        "",
        "| Step | Time | Examples/s | Tokens/s | Model FLOPs | XLA FLOPs | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| Full RF step ({rf['generation_rows']} generation + {rf['understanding_rows']} "
        f"understanding rows) | {_ms(rf['seconds'])} | {rf['examples_per_second']:.3g} | "
        f"{rf['tokens_per_second']:.4g} | {_count(rf['analytic_flops'])} | "
        f"{_count(rf['xla_flops'])} | {rf['mfu']:.1%} |",
        f"| Backbone step, rf_jax | {_ms(backbone['seconds'])} | "
        f"{size.batch / backbone['seconds']:.3g} | {backbone['tokens_per_second']:.4g} | "
        f"{_count(backbone['analytic_flops'])} | {_count(backbone['xla_flops'])} | "
        f"{backbone['mfu']:.1%} |",
        f"| Backbone step, rf_jax, whole-row attention | {_ms(whole['seconds'])} | "
        f"{size.batch / whole['seconds']:.3g} | {whole['tokens_per_second']:.4g} | "
        f"{_count(whole['analytic_flops'])} | {_count(whole['xla_flops'])} | "
        f"{whole['mfu']:.1%} |",
        f"| Backbone step, transformers | {_ms(torch_step['seconds'])} | "
        f"{size.batch / torch_step['seconds']:.3g} | {torch_step['tokens_per_second']:.4g} | "
        f"{_count(backbone['analytic_flops'])} | | "
        f"{backbone['analytic_flops'] / torch_step['seconds'] / figures['matmul_peak_flops']:.1%} |",
        "",
        "Model FLOPs are the analytic matrix-multiply count of `rf_jax.flops` (3 passes for "
        "trained modules, 1 for the EMA encoder); XLA FLOPs are the compiled step's "
        "`cost_analysis()`, which also counts element-wise work and the optimiser. The "
        "backbone step is forward, backward and AdamW on text rows through one expert; "
        "transformers runs `Qwen2Model` of the same shape with `torch.optim.AdamW`.",
        "",
        "## Sampler",
        "",
        "| Figure | With KV cache | Without | Ratio |",
        "| --- | --- | --- | --- |",
        f"| Rep-token decode, per token (batch {samples['batch']}) | "
        f"{_ms(samples['rep_decode_per_token_cached'])} | "
        f"{_ms(samples['rep_decode_per_token_uncached'])} | "
        f"{samples['rep_decode_per_token_uncached'] / samples['rep_decode_per_token_cached']:.1f}x |",
        f"| Pixel ODE, per velocity evaluation | {_ms(samples['ode_evaluation_cached'])} | "
        f"{_ms(samples['ode_evaluation_uncached'])} | "
        f"{samples['ode_evaluation_uncached'] / samples['ode_evaluation_cached']:.2f}x |",
        f"| End to end, per image ({samples['ode_steps']} ODE steps) | "
        f"{_ms(samples['per_image_cached'])} | {_ms(samples['per_image_uncached'])} | "
        f"{samples['per_image_uncached'] / samples['per_image_cached']:.1f}x |",
        "",
        f"A forward pass over the {size.seq_len - size.text_len - samples['rep_tokens'] - 1} "
        f"pixel patches alone takes {_ms(samples['ode_evaluation_pixels_alone'])}; the cached "
        f"evaluation takes {samples['ode_cached_over_pixels_alone']:.2f}x that. An ODE step "
        "of Heun's method makes two velocity evaluations. The time per image is the time of "
        f"the whole batch of {samples['batch']} divided by {samples['batch']}.",
        "",
        "| Greedy text decoding, per token | Time |",
        "| --- | --- |",
        f"| rf_jax (`make_text_to_text`, jitted) | {_ms(samples['greedy_decode_per_token'])} |",
        f"| transformers `generate` | {_ms(samples['transformers_decode_per_token'])} |",
        "",
        f"Batch {size.batch}, prompts of {samples['prompt_len']} tokens, "
        f"{samples['new_tokens']} new tokens; the time of one new token (the prefill) is "
        "subtracted before dividing.",
        "",
        "## Memory",
        "",
        "XLA's estimate for the compiled full RF train step on this device, in GiB.",
        "",
        "| Remat policy | Arguments | Temporaries |",
        "| --- | --- | --- |",
    ]
    for name, memory in scale["memory_by_policy"].items():
        lines.append(f"| {name} | {_gib(memory['argument'])} | {_gib(memory['temp'])} |")
    lines += ["", "## Scaling", ""]
    for path in plots:
        lines.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
        lines.append("")
    lines += [
        "| Batch | " + " | ".join(str(b) for b in scale["step_seconds_by_batch"]) + " |",
        "| --- " * (len(scale["step_seconds_by_batch"]) + 1) + "|",
        "| Step | " + " | ".join(_ms(s) for s in scale["step_seconds_by_batch"].values()) + " |",
        "",
        "| Tokens per row | " + " | ".join(str(s) for s in scale["step_seconds_by_seq_len"]) + " |",
        "| --- " * (len(scale["step_seconds_by_seq_len"]) + 1) + "|",
        "| Step | " + " | ".join(_ms(s) for s in scale["step_seconds_by_seq_len"].values()) + " |",
        "",
        "| Layers | " + " | ".join(str(d) for d in scale["temp_memory_by_depth"]["none"]) + " |",
        "| --- " * (len(scale["temp_memory_by_depth"]["none"]) + 1) + "|",
    ]
    for remat, by_depth in scale["temp_memory_by_depth"].items():
        lines.append(
            f"| remat {remat} (GiB) | " + " | ".join(_gib(v) for v in by_depth.values()) + " |"
        )
    lines += ["", NOTES_START, notes.strip("\n"), NOTES_END, ""]
    return "\n".join(lines)


def read_notes(path):
    """Return the text between the notes markers of an existing document, or a placeholder."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as document:
            text = document.read()
        if NOTES_START in text and NOTES_END in text:
            return text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0]
    return "\n## Notes\n\nNo analysis written yet.\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", choices=sorted(common.SIZES))
    parser.add_argument("--output_dir", default="docs", help="Where the document and plots go.")
    args = parser.parse_args()
    size = common.get_size(args.size)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} is a file; name a directory.")
    os.makedirs(args.output_dir, exist_ok=True)
    figures = run(size)
    plots = scaling.plot(figures["scaling"], size, args.output_dir)
    path = os.path.join(args.output_dir, "benchmarks.md")
    document = render(figures, size, plots, read_notes(path))
    with open(path, "w", encoding="utf-8") as output:
        output.write(document)
    with open(os.path.join(args.output_dir, "benchmarks.json"), "w", encoding="utf-8") as output:
        json.dump(figures, output, indent=2)
    for (name, target, key, higher), value in zip(GOALS, goal_ratios(figures).values()):
        met = goal_met(value, target, higher)
        print(f"{name}: {value:.3f} (target {target}, {'met' if met else 'missed'})")
    print(f"Wrote {path}.")


if __name__ == "__main__":
    main()
