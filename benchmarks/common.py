"""Shared pieces of the benchmarks: the configs, timing, the matmul peak, the machine.

Two sizes exist. `bench` is the config the goals in `docs/benchmarks.md` are
stated for: backbone width 512, 8 layers, rows of 512 tokens, batch 8,
float32. `tiny` runs every code path in seconds, so the tests can keep the
scripts working; its figures mean nothing.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from rf_jax import configs


@dataclasses.dataclass(frozen=True)
class Size:
    """Shapes and repeat counts of one benchmark size."""

    name: str
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    vocab_size: int
    image_size: int
    text_len: int  # Chosen so that a generation row has `seq_len` tokens.
    seq_len: int
    batch: int
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    encoder_mlp_dim: int
    und_text_len: int
    query_block: int  # model.attention_query_block: the best setting for CPUs.
    matmul_size: int  # Side of the square matmul that measures the peak.
    repeats: int  # Timed calls per figure; the median is reported.
    prompt_len: int  # Greedy decoding: prompt tokens, then `new_tokens` generated.
    new_tokens: int
    ode_steps: int  # ODE steps of the end-to-end sampling figure.
    batch_sweep: tuple  # Scaling plots.
    seq_sweep: tuple
    depth_sweep: tuple


SIZES = {
    "bench": Size(
        name="bench",
        width=512,
        depth=8,
        num_heads=8,
        num_kv_heads=2,
        mlp_dim=1408,
        vocab_size=8192,
        image_size=64,
        text_len=191,  # 191 text + 65 BOR and rep + 256 pixel patches = 512.
        seq_len=512,
        batch=8,
        encoder_width=384,
        encoder_depth=4,
        encoder_heads=6,
        encoder_mlp_dim=1024,
        und_text_len=64,
        query_block=64,
        matmul_size=2048,
        repeats=3,
        prompt_len=64,
        new_tokens=64,
        ode_steps=10,
        batch_sweep=(1, 2, 4, 8, 16),
        seq_sweep=(128, 256, 512, 1024),
        depth_sweep=(2, 4, 8, 16),
    ),
    "tiny": Size(
        name="tiny",
        width=32,
        depth=2,
        num_heads=2,
        num_kv_heads=1,
        mlp_dim=64,
        vocab_size=128,
        image_size=16,
        text_len=7,  # 7 text + 5 BOR and rep + 16 pixel patches = 28.
        seq_len=28,
        batch=4,
        encoder_width=16,
        encoder_depth=1,
        encoder_heads=2,
        encoder_mlp_dim=32,
        und_text_len=8,
        query_block=4,
        matmul_size=128,
        repeats=2,
        prompt_len=4,
        # The per-token time is a difference of two calls, so over a few tokens timer
        # noise can make it negative. 32 tokens keep it well above the noise.
        new_tokens=32,
        ode_steps=2,
        batch_sweep=(1, 2),
        seq_sweep=(8, 16),
        depth_sweep=(1, 2),
    ),
}


def get_size(name):
    if name not in SIZES:
        raise ValueError(f"Unknown benchmark size {name!r}; use one of {sorted(SIZES)}.")
    return SIZES[name]


def experiment_config(
    size: Size, remat="none", scan_layers=False, depth=None, batch=None, query_block=None
):
    """Build the experiment config of a benchmark size (pixel + RF, float32, one device)."""
    config = configs.default_config()
    model = config.model
    model.attention_query_block = size.query_block if query_block is None else query_block
    model.image_size = size.image_size
    model.text_len = size.text_len
    model.pixel_patch = 4
    model.remat = remat
    model.scan_layers = scan_layers
    model.tie_embeddings = False
    model.backbone.update(
        width=size.width,
        depth=size.depth if depth is None else depth,
        num_heads=size.num_heads,
        num_kv_heads=size.num_kv_heads,
        head_dim=size.width // size.num_heads,
        mlp_dim=size.mlp_dim,
    )
    model.encoder.update(
        patch_size=8,
        width=size.encoder_width,
        depth=size.encoder_depth,
        num_heads=size.encoder_heads,
        mlp_dim=size.encoder_mlp_dim,
    )
    config.data.vocab_size = size.vocab_size
    config.data.und_text_len = size.und_text_len
    config.data.batch_size = size.batch if batch is None else batch
    config.train.steps = 1000
    return config


def model_config(config):
    return configs.model_config(config, config.data.vocab_size)


def block(tree):
    """Wait for every array of `tree`, so that a timing covers the work."""
    return jax.block_until_ready(tree)


def median_seconds(call, repeats):
    """Median wall time of `call()` over `repeats` calls; `call` must block on its result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_chained_seconds(call, state, repeats):
    """Return (median wall seconds, last state) of `repeats` calls of `state = call(state)`.

    Each call takes the state the previous one returned, as a decode step
    takes the previous step's cache. `call` must block on its result.
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = call(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times), state


def compile_seconds(jitted, *args):
    """Lower and compile `jitted` for `args`; return (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def xla_flops(compiled):
    """XLA's FLOP count of a compiled function (0.0 when the backend gives none)."""
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0))


def matmul_peak(size: Size, dtype=jnp.float32):
    """Measure the dense matmul rate (FLOP/s) of device 0 on square `dtype` matrices.

    The best of several calls is taken: it is the rate the device reaches when
    nothing else slows it down, which is what MFU divides by.
    """
    n = size.matmul_size
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    block(matmul(a, b))
    times = []
    for _ in range(max(3, size.repeats)):
        start = time.perf_counter()
        block(matmul(a, b))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def machine():
    """Describe the machine and the software versions in a short dict."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_device": f"{device.platform} ({device.device_kind})",
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def main(run, doc):
    """Command line of a single benchmark script: print `run(size)` as JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", default="bench", choices=sorted(SIZES))
    args = parser.parse_args()
    print(json.dumps(dict(machine=machine(), size=args.size, **run(get_size(args.size))), indent=2))
