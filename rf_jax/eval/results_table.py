"""Markdown tables of the miniature ablations, beside the Representation Forcing paper's numbers."""

import datetime
import os
import re

import numpy as np

from rf_jax.eval.geneval import TASKS

# Pixel-space GenEval scores at 256 px from Table 3 of the Representation Forcing paper.
PAPER_TABLE3 = {
    "pixel": 0.25,
    "pixel_rf": 0.76,
    "repa": 0.43,
    "continuous": 0.26,
}
# Understanding scores of its pixel-space models, from Table 2 of the same paper.
PAPER_TABLE2_COLUMNS = ("MMMU", "HalluBench", "MME*", "BLINK", "RealWorldQA", "AI2D")
PAPER_TABLE2 = {
    "pixel": (49.9, 63.7, 76.6, 49.4, 63.1, 85.8),
    "pixel_rf": (54.2, 64.8, 80.2, 53.0, 65.8, 90.3),
}
NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
_LABELS = {
    "pixel": "Pixel w/o RF",
    "pixel_rf": "Pixel + RF",
    "repa": "REPA (alignment)",
    "continuous": "Continuous regression",
}


def _runs(results, dataset, variant, codebook_size=256):
    return [
        r
        for r in results.values()
        if r["run"]["dataset"] == dataset
        and r["run"]["variant"] == variant
        and r["run"]["codebook_size"] == codebook_size
    ]


def _spread(values, digits=3):
    """'mean ± std (n)' with the sample standard deviation, or the value alone for one run."""
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f} (n={len(values)})"


def _geneval(runs):
    return [r["eval"]["geneval"]["overall"] for r in runs]


def _table3(results):
    lines = [
        "| Ablation | Ours: GenEval-format overall | Per seed | Paper (256 px) |",
        "|---|---|---|---|",
    ]
    for group, variants in (
        ("(a) Effect of RF", ("pixel", "pixel_rf")),
        ("(b) Prediction vs. alignment", ("repa", "pixel_rf")),
        ("(c) Token formulation", ("continuous", "pixel_rf")),
    ):
        lines.append(f"| **{group}** | | | |")
        for variant in variants:
            scores = _geneval(_runs(results, "shapes", variant))
            seeds = ", ".join(f"{s:.3f}" for s in scores)
            lines.append(
                f"| {_LABELS[variant]} | {_spread(scores)} | {seeds} | {PAPER_TABLE3[variant]:.2f} |"
            )
    lines.append("| **(d) Codebook size** | | | |")
    for size, paper in ((256, "0.76 (default K)"), (64, "0.77 (other K)")):
        runs = _runs(results, "shapes", "pixel_rf", size)
        if size == 256:
            runs = [r for r in runs if r["run"]["seed"] == 0]
        lines.append(f"| K = {size} (seed 0) | {_spread(_geneval(runs))} | | {paper} |")
    lines.append("| VAE w/o RF, VAE + RF | not reproduced: rf_jax has no VAE path | | 0.52, 0.77 |")
    return "\n".join(lines)


def _task_table(results):
    header = "| Run | " + " | ".join(TASKS) + " | overall | codes used | train s | eval s |"
    lines = [header, "|" + "---|" * (len(TASKS) + 5)]
    for name, r in sorted(results.items()):
        if "geneval" not in r["eval"]:
            continue
        tasks = r["eval"]["geneval"]["tasks"]
        cells = [f"{tasks[t]['accuracy']:.3f}" if t in tasks else "-" for t in TASKS]
        codebook = r["run"].get("codebook")
        codes = f"{codebook['codes_used']} ({codebook['perplexity']:.0f})" if codebook else "-"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['eval']['geneval']['overall']:.3f} | "
            f"{codes} | {r['run']['train_seconds']:.0f} | {r['run']['eval_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _table2(results):
    lines = [
        "| Model | Shapes QA (EM) | colour | count | position | Fashion-MNIST "
        "classification (EM) | Paper: " + ", ".join(PAPER_TABLE2_COLUMNS) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in ("pixel", "pixel_rf"):
        qa = [r["eval"]["questions"] for r in _runs(results, "shapes", variant)]
        fashion = [r["eval"]["questions"] for r in _runs(results, "fashion_mnist", variant)]
        kinds = [
            _spread([q.get(f"exact_match_{k}", np.nan) for q in qa])
            for k in ("color", "count", "position")
        ]
        paper = ", ".join(f"{v:.1f}" for v in PAPER_TABLE2[variant])
        lines.append(
            f"| {_LABELS[variant]} | {_spread([q['exact_match'] for q in qa])} | "
            + " | ".join(kinds)
            + f" | {_spread([q['exact_match'] for q in fashion])} | {paper} |"
        )
    return "\n".join(lines)


def _fashion_generation(results):
    lines = [
        "| Model | Class accuracy of generated images | Frechet distance to real test images |",
        "|---|---|---|",
    ]
    classifier = None
    for variant in ("pixel", "pixel_rf"):
        runs = [r["eval"]["generation"] for r in _runs(results, "fashion_mnist", variant)]
        if runs:
            classifier = runs[0]["classifier_test_accuracy"]
        lines.append(
            f"| {_LABELS[variant]} | {_spread([g['class_accuracy'] for g in runs])} | "
            f"{_spread([g['frechet_distance'] for g in runs], 2)} |"
        )
    if classifier is not None:
        lines.append("")
        lines.append(f"The classifier's accuracy on the real test split is {classifier:.4f}.")
    return "\n".join(lines)


def _kept_notes(path):
    if not os.path.exists(path):
        return f"{NOTES_START}\n{NOTES_END}"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(re.escape(NOTES_START) + ".*?" + re.escape(NOTES_END), text, re.S)
    return match.group(0) if match else f"{NOTES_START}\n{NOTES_END}"


def render(results, steps, seeds, machine, notes):
    """Return the whole results document as a string."""
    total = sum(r["run"]["train_seconds"] + r["run"]["eval_seconds"] for r in results.values())
    date = datetime.date.today().isoformat()
    scored = [r["eval"]["geneval"] for r in results.values() if "geneval" in r["eval"]]
    images = scored[0]["images"] // scored[0]["prompts"] if scored else 0
    return f"""# Miniature reproduction of the Representation Forcing ablations

Produced by one command (runs that finished before are reused):

    python -m rf_jax.eval.ablations --root workdirs/ablations --out docs/results.md \\
        --steps {steps} --seeds {seeds}

- Date: {date}. Machine: {machine}.
- Budget per run: {steps} steps of 32 examples (24 generation and 8 understanding
  rows), 32x32 px, a 3-layer backbone of width 128, a 2-layer encoder of width 128,
  64 pixel tokens and 16 rep tokens. Sampling: 25 Heun steps, text guidance 4.
- {len(results)} runs, {total / 60:.0f} min of training and evaluation in all.
- Generation is scored in GenEval's format on the {scored[0]["prompts"] if scored else 0}
  held-out prompts of the shapes benchmark, {images} images a prompt, by the shape
  detector (`rf_jax.eval.detector`). The numbers are ours at toy scale and are not
  comparable to the paper's absolute values; only the direction of each comparison is.

## Table 3 in miniature: generation

{_table3(results)}

Per task (codes used: distinct codebook entries assigned to 256 test images by
the final EMA encoder, with the perplexity of their distribution in brackets):

{_task_table(results)}

## Table 2 in miniature: understanding

Exact match of greedy answers: shapes questions on 300 test scenes, and
"what is this?" on 300 Fashion-MNIST test images. The paper's columns are its
understanding benchmarks, shown for the direction of the effect only.

{_table2(results)}

Fashion-MNIST generation, 20 images for each of the 10 class prompts, scored by
an independent classifier (`rf_jax.eval.classifier`):

{_fashion_generation(results)}

## Analysis

{notes}
"""


def write(path, results, steps, seeds, machine):
    """Write the document to `path`, keeping the notes block of an existing file."""
    text = render(results, steps, seeds, machine, _kept_notes(path))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
