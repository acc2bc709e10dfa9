"""Micro-benchmarks behind the notes of `docs/benchmarks.md`.

    python -m benchmarks.micro [--size bench|tiny]

Prints, as JSON, for one backbone layer's shapes at batch `size.batch` and
rows of `size.seq_len` tokens:

- attention forward and forward + backward, whole rows and in query blocks,
  and PyTorch's `scaled_dot_product_attention` on the same shapes;
- one element-wise pass over the attention logits, and the read bandwidth
  of a sum over 512 MB (64 MB for `tiny`);
- for greedy decoding: a chain of only the weight products of one decode
  step (7 per layer and the output head), and one `decode_text` call with
  the cache donated and fed back, as in the decoding loop.

`python -m benchmarks.trace` breaks the decode step down op by op.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import sampler as sampler_bench
from rf_jax.layers import dot_product_attention


def _milliseconds(function, *args, repeats=5):
    common.block(function(*args))
    return 1e3 * common.median_seconds(lambda: common.block(function(*args)), repeats)


def attention(size):
    """Attention timings (ms) of one layer, in rf_jax and in PyTorch."""
    import torch
    import torch.nn.functional as F

    batch, length = size.batch, size.seq_len
    heads, kv_heads, head_dim = size.num_heads, size.num_kv_heads, size.width // size.num_heads
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    figures = {}
    for name, block in (("whole", 0), ("blocks", size.query_block)):

        def attend(q, k, v, block=block):
            return dot_product_attention(q, k, v, mask, head_dim**-0.5, block)

        backward = jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))
        figures[f"{name}_forward_ms"] = _milliseconds(jax.jit(attend), q, k, v)
        figures[f"{name}_forward_backward_ms"] = _milliseconds(jax.jit(backward), q, k, v)

    tq = torch.randn(batch, heads, length, head_dim, requires_grad=True)
    tk = torch.randn(batch, kv_heads, length, head_dim, requires_grad=True)
    tv = torch.randn(batch, kv_heads, length, head_dim, requires_grad=True)

    def torch_attention():
        return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def torch_backward():
        torch_attention().square().sum().backward()

    with torch.no_grad():
        figures["torch_forward_ms"] = _milliseconds(torch_attention)
    figures["torch_forward_backward_ms"] = _milliseconds(torch_backward)

    logits = jnp.ones((batch, heads, length, length), jnp.float32)
    figures["logits_mb"] = logits.nbytes / 1e6
    figures["logits_pass_ms"] = _milliseconds(jax.jit(lambda x: x * 2.0), logits)
    return figures


def read_bandwidth(size):
    """Bytes per second of a jitted sum over a large float32 array."""
    count = (128 if size.name == "bench" else 16) * 1024 * 1024
    values = jnp.ones((count,), jnp.float32)
    total = jax.jit(jnp.sum)
    common.block(total(values))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        common.block(total(values))
        times.append(time.perf_counter() - start)
    return values.nbytes / min(times)


DECODE_CALLS = 20  # Timed decode steps.


def decode(size):
    """Decode-step timings (ms): the weight products alone, and one `decode_text` call."""
    model_config, params = sampler_bench.random_model(size)
    width, mlp, vocab = size.width, size.mlp_dim, size.vocab_size
    kv = size.num_kv_heads * (width // size.num_heads)
    key = jax.random.key(0)
    shapes = dict(q=(width, width), k=(width, kv), v=(width, kv), o=(width, width))
    shapes.update(gate=(width, mlp), up=(width, mlp), down=(mlp, width))
    layers = [
        {name: jax.random.normal(key, shape) for name, shape in shapes.items()}
        for _ in range(size.depth)
    ]
    head = jax.random.normal(key, (width, vocab))
    x = jax.random.normal(key, (size.batch, width))

    def products(layers, head, x):
        for w in layers:
            context = x @ w["q"] + jnp.sum(x @ w["k"]) + jnp.sum(x @ w["v"])
            x = x + context @ w["o"]
            x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        return x @ head

    weight_bytes = 4 * (sum(np.prod(s) for s in shapes.values()) * size.depth + width * vocab)
    step, state = sampler_bench.decode_step(model_config, params, size, DECODE_CALLS + 1)
    compiled = step.lower(params, *state).compile()

    def call(state):
        return common.block(compiled(params, *state))

    decode_seconds, _ = common.median_chained_seconds(call, call(state), DECODE_CALLS)
    return dict(
        weight_mb=weight_bytes / 1e6,
        weight_products_ms=_milliseconds(jax.jit(products), layers, head, x, repeats=20),
        decode_text_ms=1e3 * decode_seconds,
        compiled_fusions=compiled.as_text().count(" fusion("),
    )


def run(size):
    return dict(
        attention=attention(size),
        read_bandwidth_gb_per_second=read_bandwidth(size) / 1e9,
        decode=decode(size),
    )


if __name__ == "__main__":
    common.main(run, __doc__)
