"""Profiles of a decode step or a pixel ODE evaluation: `jax.profiler` traces and op tables.

    python -m benchmarks.trace [--size bench|tiny] [--target decode|ode]
                               [--trace_dir DIR] [--calls N]

`--target decode` (the default) traces N greedy `decode_text` calls, the
cache donated and fed back, as in the decoding loop. `--target ode` traces
N pixel velocity evaluations with the cached prefix, and N over the pixel
patches alone. Each trace goes under DIR (`perfetto_trace.json.gz` for
Perfetto, and an XPlane file for TensorBoard's profile plugin).

Prints, as JSON, the wall time per call (measured without the profiler)
and the time per call of each kind of compiled op, the `TOP_OPS` slowest
kinds listed. Ops are named by the model code that made them (for example
`q_proj/dot_general`), with the layer number left out, so the 8 layers'
copies of an op add up in one line. Thread times are summed, so on a
multi-core CPU the op total exceeds the wall time of a call.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import sampler as sampler_bench
from rf_jax.model import RFModel

TOP_OPS = 30  # Rows of each printed table.
# `%name = type opcode(operands), ..., metadata={op_name="..."}`. A tuple type
# contains spaces, so it is matched up to its closing parenthesis.
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(.*?op_name="([^"]+)"'
)
_ENCLOSING = ("while", "conditional", "call")


def op_kinds(hlo_text):
    """Map each instruction name of compiled HLO text to the code path that made it.

    The path keeps its last two parts, with `layers_<i>` made `layers`, so
    that `.../layers_3/attn/q_proj/dot_general` becomes `q_proj/dot_general`.
    Loops, conditionals and calls are left out: their trace events enclose
    those of the ops they run, which would count that time twice.
    """
    kinds = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and match.group(2) not in _ENCLOSING:
            parts = re.sub(r"layers_\d+", "layers", match.group(3)).split("/")
            kinds[match.group(1)] = "/".join(parts[-2:])
    return kinds


def op_table(events, kinds, calls):
    """Sum the trace events of the ops in `kinds`; return rows sorted by time per call.

    Events of anything else (Python frames, the runtime's own work) are left out.
    """
    total_us, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in kinds:
            kind = kinds[event["name"]]
            total_us[kind] += event.get("dur", 0)
            count[kind] += 1
    return [
        dict(op=kind, ms_per_call=us / calls / 1e3, count_per_call=count[kind] / calls)
        for kind, us in total_us.most_common()
    ]


def _read_events(trace_dir):
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(
            f"No Perfetto trace found under {trace_dir} after profiling. "
            "Check that jax.profiler works on this backend."
        )
    with gzip.open(max(paths, key=os.path.getmtime)) as file:
        trace = json.load(file)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(function, params, state, trace_dir, calls, feeds_back=False):
    """Time and trace `calls` calls of the jitted `function(params, *state)`.

    With `feeds_back`, `function` returns the state of the next call (a
    decode step's tokens and cache). Otherwise every call gets `state`.
    Returns the wall time per call, timed without the profiler, and the op table.
    """
    compiled = function.lower(params, *state).compile()
    kinds = op_kinds(compiled.as_text())

    def call(state):
        result = common.block(compiled(params, *state))
        return result if feeds_back else state

    state = call(state)  # A first call, left out of the timing and the trace.
    seconds, state = common.median_chained_seconds(call, state, calls)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            state = call(state)
    rows = op_table(_read_events(trace_dir), kinds, calls)
    return dict(
        wall_ms_per_call=1e3 * seconds,
        op_ms_per_call=sum(row["ms_per_call"] for row in rows),
        matmul_ms_per_call=sum(
            row["ms_per_call"] for row in rows if row["op"].endswith("dot_general")
        ),
        ops=rows[:TOP_OPS],
    )


def decode(size, trace_dir, calls):
    """Profile `decode_text` at batch `size.batch` after a prompt of `size.prompt_len`."""
    model_config, params = sampler_bench.random_model(size)
    step, state = sampler_bench.decode_step(model_config, params, size, 2 * calls + 1)
    return profile(step, params, state, os.path.join(trace_dir, "decode"), calls, feeds_back=True)


def ode_evaluation(size, trace_dir, calls):
    """Profile a pixel velocity evaluation with the cached prefix, and one over pixels alone."""
    model_config, params = sampler_bench.random_model(size)
    model = RFModel(model_config)
    batch = size.batch
    prompts = sampler_bench._prompts(size, batch, model_config.text_len)
    _, cache = jax.jit(lambda p, x: sampler_bench.generation_prefix(model, p, x))(params, prompts)
    z = jax.random.normal(
        jax.random.key(0), (batch, model_config.num_pixels, model_config.pixel_dim)
    )
    t = jnp.full((batch,), 0.5, jnp.float32)
    visible = jnp.ones((batch,), bool)

    def cached(params, z, t, cache):
        return model.apply({"params": params}, z, t, cache, visible, method=RFModel.denoise)

    def alone(params, z, t):
        return model.apply({"params": params}, z, t, method=sampler_bench._pixels_alone)

    return dict(
        cached_prefix=profile(
            jax.jit(cached), params, (z, t, cache), os.path.join(trace_dir, "ode_cached"), calls
        ),
        pixels_alone=profile(
            jax.jit(alone), params, (z, t), os.path.join(trace_dir, "ode_alone"), calls
        ),
    )


TARGETS = {"decode": decode, "ode": ode_evaluation}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", choices=sorted(common.SIZES))
    parser.add_argument("--trace_dir", default=None, help="default: a new temporary folder")
    parser.add_argument(
        "--target",
        default="decode",
        choices=sorted(TARGETS),
        help="decode: greedy decode steps; ode: pixel velocity evaluations",
    )
    parser.add_argument("--calls", type=int, default=5, help="calls to time and trace (>= 1)")
    args = parser.parse_args()

    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}.")
    if args.trace_dir and os.path.exists(args.trace_dir) and not os.path.isdir(args.trace_dir):
        parser.error(f"--trace_dir {args.trace_dir} is a file; give a folder.")
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="rf_jax_trace_")
    try:  # Fail now rather than after the profile.
        os.makedirs(trace_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=trace_dir).close()
    except OSError as error:
        parser.error(
            f"--trace_dir {trace_dir} cannot be written ({error.strerror}); "
            "give a folder you can write to."
        )

    result = TARGETS[args.target](common.get_size(args.size), trace_dir, args.calls)
    output = dict(
        machine=common.machine(),
        size=args.size,
        target=args.target,
        trace_dir=trace_dir,
        calls=args.calls,
    )
    print(json.dumps(dict(output, **result), indent=2))


if __name__ == "__main__":
    main()
