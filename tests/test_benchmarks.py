"""The benchmark scripts: FLOP counts against XLA, the uncached samplers, one tiny run.

Nothing here is timed; the tiny run only keeps the scripts working.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from benchmarks import common
from benchmarks import run_all
from benchmarks import sampler as sampler_bench
from benchmarks import trace
from benchmarks.train_step import backbone_inputs
from rf_jax import aot
from rf_jax import flops
from rf_jax import mask as mask_lib
from rf_jax import sampler as sampler_lib
from rf_jax.backbone import Backbone
from rf_jax.data import pipeline
from rf_jax.model import RFModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Widths where matrix multiplies dominate but compilation stays quick.
SMALL = dataclasses.replace(
    common.SIZES["bench"],
    width=128,
    depth=2,
    num_heads=2,
    num_kv_heads=1,
    mlp_dim=352,
    vocab_size=512,
    image_size=32,
    text_len=24,
    seq_len=64,
    batch=4,
    encoder_width=64,
    encoder_depth=1,
    encoder_heads=2,
    encoder_mlp_dim=128,
    und_text_len=16,
)
# XLA counts the element-wise work too (norms, softmax, activations, AdamW), which the
# analytic count leaves out: measured at 1.2% to 2.4% above it for the backbone at width
# 128 and 4.5% to 5.2% for the whole train step. A missing matmul term (an expert, the
# encoder, the heads) moves the ratio far more than these bounds allow.
BACKBONE_BOUNDS = (1.0, 1.04)
STEP_BOUNDS = (1.0, 1.08)


def _run_module(*args, timeout):
    """Run `python -m ARGS` from the repository root; return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _xla_over_analytic(compiled, analytic):
    return common.xla_flops(compiled) / analytic


def test_backbone_flops_match_xla_forward_and_gradient():
    config = common.model_config(common.experiment_config(SMALL)).backbone
    model = Backbone(config)
    batch, seq = 2, SMALL.seq_len
    x, positions, segments, modality = backbone_inputs(SMALL, batch, seq)
    params = jax.eval_shape(
        lambda key: nn.unbox(model.init(key, x, positions, segments, modality)), jax.random.key(0)
    )
    spans = ((0, seq, mask_lib.UNDERSTANDING_EXPERT),)

    def forward(params, x):
        return model.apply(params, x, positions, segments, modality, expert_spans=spans)[0]

    analytic = batch * flops.backbone_flops(config, seq)
    forward_ratio = _xla_over_analytic(jax.jit(forward).lower(params, x).compile(), analytic)
    gradient = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2)))
    gradient_ratio = _xla_over_analytic(gradient.lower(params, x).compile(), 3 * analytic)

    assert BACKBONE_BOUNDS[0] <= forward_ratio <= BACKBONE_BOUNDS[1], forward_ratio
    assert BACKBONE_BOUNDS[0] <= gradient_ratio <= BACKBONE_BOUNDS[1], gradient_ratio


@pytest.mark.parametrize("variant", ["pixel_rf", "pixel", "continuous", "repa"])
def test_train_step_flops_match_xla(variant):
    config = common.experiment_config(SMALL)
    config.model.variant = variant
    model_config = common.model_config(config)
    data = config.data
    rows = pipeline.mixture_sizes(
        data.batch_size, data.mixture.generation, data.mixture.understanding
    )
    analytic = flops.train_step_flops(model_config, *rows, data.und_text_len).total
    ratio = aot.report(aot.compile_train_step(config, data.vocab_size))["flops"] / analytic

    assert STEP_BOUNDS[0] <= ratio <= STEP_BOUNDS[1], ratio


def test_attention_flops_grow_with_keys():
    config = common.model_config(common.experiment_config(SMALL)).backbone
    # Doubling the keys adds exactly the q.k and weighted-sum terms: 4 * queries * keys * heads.
    extra = flops.backbone_layer_flops(config, 10, 40) - flops.backbone_layer_flops(config, 10, 20)
    assert extra == 4 * 10 * 20 * config.num_heads * config.head_dim


@pytest.fixture(scope="module")
def tiny_model():
    size = common.SIZES["tiny"]
    model_config, params = sampler_bench.random_model(size)
    prompts = sampler_bench._prompts(size, size.batch, model_config.text_len)
    return RFModel(model_config), params, prompts


def _cached_rep_tokens(model, params, prompts):
    cfg = model.config
    batch = prompts.shape[0]
    cache = sampler_lib.empty_cache(cfg, batch, cfg.text_len + cfg.rep_region)
    first, cache = model.apply(
        {"params": params}, prompts, cache, method=RFModel.prefill_generation
    )
    return sampler_lib._generate_rep_tokens(
        model, params, cache, first, jax.random.key(0), sampler_bench.GREEDY_REP, batch, False
    )


def test_uncached_rep_decoding_picks_the_cached_tokens(tiny_model):
    # Both decoders are greedy over the same causal prefix, so every token must agree.
    model, params, prompts = tiny_model
    cached, _ = jax.jit(lambda p, x: _cached_rep_tokens(model, p, x))(params, prompts)
    uncached = jax.jit(
        lambda p, x: sampler_bench.uncached_rep_tokens(model, p, x, jax.random.key(0))
    )(params, prompts)
    np.testing.assert_array_equal(uncached, cached)


def test_uncached_denoiser_matches_the_cached_one(tiny_model):
    model, params, prompts = tiny_model
    rep, cache = jax.jit(lambda p, x: _cached_rep_tokens(model, p, x))(params, prompts)
    cfg = model.config
    batch = prompts.shape[0]
    z = jax.random.normal(jax.random.key(1), (batch, cfg.num_pixels, cfg.pixel_dim))
    t = jnp.full((batch,), 0.3, jnp.float32)
    visible = jnp.ones((batch,), bool)
    cached = model.apply({"params": params}, z, t, cache, visible, method=RFModel.denoise)
    full = model.apply({"params": params}, prompts, rep, z, t, visible)[1]
    # The same sums in another order (cache, then new keys), float32: as in test_model.py.
    np.testing.assert_allclose(full, cached, atol=1e-4)


def test_notes_survive_a_rerun(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(
        f"# Old figures\n{run_all.NOTES_START}\nWhy the ODE step is slow.\n"
        f"{run_all.NOTES_END}\n"
    )
    assert run_all.read_notes(str(path)).strip() == "Why the ODE step is slow."
    assert "No analysis" in run_all.read_notes(str(tmp_path / "missing.md"))


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="Unknown benchmark size 'huge'; use one of"):
        common.get_size("huge")


def test_tiny_run_writes_document_plots_and_figures(tmp_path):
    result = _run_module(
        "benchmarks.run_all", "--size", "tiny", "--output_dir", tmp_path, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]

    document = (tmp_path / "benchmarks.md").read_text()
    for name, *_ in run_all.GOALS:
        assert f"| {name} |" in document
    figures = json.loads((tmp_path / "benchmarks.json").read_text())
    ratios = run_all.goal_ratios(figures)
    assert all(np.isfinite(value) and value > 0 for value in ratios.values()), ratios
    assert figures["train"]["rf_train_step"]["analytic_flops"] > 0
    for name in ("benchmark_batch.png", "benchmark_seq_len.png", "benchmark_memory_depth.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 100
        assert f"]({name})" in document


def test_micro_benchmarks_run_on_tiny_size():
    result = _run_module("benchmarks.micro", "--size", "tiny", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["decode"]["compiled_fusions"] > 0
    assert figures["attention"]["blocks_forward_ms"] > 0


def test_file_as_output_dir_is_rejected(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    result = _run_module(
        "benchmarks.run_all", "--size", "tiny", "--output_dir", target, timeout=120
    )
    assert result.returncode == 2
    assert "is a file; name a directory" in result.stderr


def test_op_table_sums_ops_per_call():
    kinds = {"exp.2": "attn/exp", "dot.3": "q_proj/dot_general"}
    events = [
        dict(ph="X", name="exp.2", ts=10, dur=30),
        dict(ph="X", name="exp.2", ts=50, dur=40),
        dict(ph="X", name="dot.3", ts=20, dur=60),
        dict(ph="X", name="$python_frame", ts=0, dur=500),
        dict(ph="i", name="dot.3", ts=5),
    ]
    rows = {row["op"]: row for row in trace.op_table(events, kinds, calls=2)}
    assert set(rows) == {"attn/exp", "q_proj/dot_general"}
    assert rows["attn/exp"]["ms_per_call"] == pytest.approx(70 / 2 / 1e3)
    assert rows["attn/exp"]["count_per_call"] == 1.0
    assert rows["q_proj/dot_general"]["ms_per_call"] == pytest.approx(60 / 2 / 1e3)


def test_op_kinds_drop_layer_numbers_and_loops():
    path = "jit(step)/decode_text/backbone/layers_3/layers_3._layer/attn"
    hlo = "\n".join(
        [
            f'  %fusion.7 = f32[8,512]{{1,0}} fusion(%a, %b), metadata={{op_name="{path}/q_proj/dot_general"}}',
            f'  %while.2 = (s32[], /*index=1*/f32[8]{{0}}) while(%t), metadata={{op_name="{path}/while"}}',
            "  %p.1 = f32[8]{0} parameter(0)",
        ]
    )  # fmt: skip
    assert trace.op_kinds(hlo) == {"fusion.7": "q_proj/dot_general"}


def test_decode_trace_names_each_layer_op(tmp_path):
    result = _run_module(
        "benchmarks.trace", "--size", "tiny", "--calls", 2, "--trace_dir", tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    counts = {row["op"]: row["count_per_call"] for row in figures["ops"]}
    depth = common.SIZES["tiny"].depth
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert counts[f"{name}/dot_general"] == depth, (name, counts)
    assert counts["lm_head/dot_general"] == 1
    assert 0 < figures["matmul_ms_per_call"] <= figures["op_ms_per_call"]
    assert figures["wall_ms_per_call"] > 0
    assert figures["size"] == "tiny"
    assert list(tmp_path.glob("decode/**/*.trace.json.gz"))


def test_ode_trace_counts_query_block_loop_ops(tmp_path):
    result = _run_module(
        "benchmarks.trace", "--size", "tiny", "--target", "ode", "--calls", 1,
        "--trace_dir", tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for part in ("cached_prefix", "pixels_alone"):
        ops = [row["op"] for row in figures[part]["ops"]]
        assert "q_proj/dot_general" in ops, (part, ops)
        # The softmax runs in the loop body, under `jax.checkpoint`.
        assert "checkpoint/exp" in ops, (part, ops)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calls", "0"], "--calls must be at least 1"),
        (["--trace_dir", "FILE"], "is a file"),
        (["--trace_dir", "FILE/inside"], "cannot be written (Not a directory)"),
    ],
)
def test_trace_rejects_bad_arguments(tmp_path, args, message):
    regular_file = tmp_path / "regular_file"
    regular_file.write_text("not a directory")
    args = [arg.replace("FILE", str(regular_file)) for arg in args]
    result = _run_module("benchmarks.trace", "--size", "tiny", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
