"""Train-step throughput, FLOPs and MFU, and the backbone train step against transformers.

    python -m benchmarks.train_step [--size bench|tiny]

Figures, all from one process so that they share the machine's state:

- the matmul peak of the device in float32, measured first;
- the full RF train step (generation and understanding rows, EMA targets,
  codebook update, AdamW): examples/s, tokens/s, analytic model FLOPs beside
  XLA's count, and MFU against the measured peak;
- a backbone train step (forward, backward and AdamW on text rows through the
  understanding expert) in JAX, and the same Qwen2 shape in transformers
  (PyTorch, scaled dot-product attention) with torch.optim.AdamW.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from rf_jax import flops as flops_lib
from rf_jax import mask as mask_lib
from rf_jax import partitioning
from rf_jax import trainer as trainer_lib
from rf_jax.backbone import Backbone
from rf_jax.data import pipeline


def synthetic_batch(config, mesh, seed=0):
    """Make a batch of random text and images with the shapes of `config`, on the batch sharding."""
    data = config.data
    gen_rows, und_rows = pipeline.mixture_sizes(
        data.batch_size, data.mixture.generation, data.mixture.understanding
    )
    size = config.model.image_size
    rng = np.random.default_rng(seed)
    vocab = data.vocab_size
    und_mask = np.zeros((und_rows, data.und_text_len), np.float32)
    und_mask[:, data.und_text_len // 2 :] = 1.0  # The loss covers the second half of each row.
    batch = dict(
        gen_text=rng.integers(3, vocab, (gen_rows, data.text_len), dtype=np.int32),
        gen_image=rng.integers(0, 256, (gen_rows, size, size, 3), dtype=np.uint8),
        und_image=rng.integers(0, 256, (und_rows, size, size, 3), dtype=np.uint8),
        und_text=rng.integers(3, vocab, (und_rows, data.und_text_len), dtype=np.int32),
        und_loss_mask=und_mask,
    )
    batch["gen_text"][:, 0] = batch["und_text"][:, 0] = 1  # BOS
    return jax.device_put(batch, partitioning.batch_sharding(mesh)), (gen_rows, und_rows)


def rf_train_step(size, peak, remat="none", batch=None, depth=None):
    """Time the full RF train step; return its figures."""
    config = common.experiment_config(size, remat=remat, batch=batch, depth=depth)
    model_config = common.model_config(config)
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, config.train.steps)
    _, shardings = trainer.abstract_state()
    state = trainer.init_state(0)
    inputs, (gen_rows, und_rows) = synthetic_batch(config, mesh)
    with trainer.sharding_context():
        compiled, compile_s = common.compile_seconds(
            trainer.jitted_train_step(shardings), state, inputs
        )

    def step():
        nonlocal state
        state, metrics = compiled(state, inputs)
        common.block(metrics)

    step()  # Warm-up: first-call allocations.
    seconds = common.median_seconds(step, size.repeats)
    analytic = flops_lib.train_step_flops(
        model_config, gen_rows, und_rows, config.data.und_text_len
    ).total
    rows = gen_rows + und_rows
    tokens = gen_rows * model_config.generation_len + und_rows * (
        model_config.num_image_tokens + config.data.und_text_len
    )
    return dict(
        seconds=seconds,
        compile_seconds=compile_s,
        examples_per_second=rows / seconds,
        tokens_per_second=tokens / seconds,
        tokens=tokens,
        generation_rows=gen_rows,
        understanding_rows=und_rows,
        analytic_flops=analytic,
        xla_flops=common.xla_flops(compiled),
        mfu=analytic / seconds / peak,
    )


def backbone_inputs(size, batch, seq_len):
    x = jax.random.normal(jax.random.key(0), (batch, seq_len, size.width), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    segments = jnp.ones((batch, seq_len), jnp.int32)
    modality = jnp.full((batch, seq_len), mask_lib.TEXT, jnp.int32)
    return x, positions, segments, modality


def jax_backbone_step(size, peak, batch=None, seq_len=None, query_block=None):
    """Time forward, backward and AdamW of the backbone on text rows; return its figures."""
    batch = size.batch if batch is None else batch
    seq_len = size.seq_len if seq_len is None else seq_len
    config = common.experiment_config(size, query_block=query_block)
    backbone_config = common.model_config(config).backbone
    model = Backbone(backbone_config)
    spans = ((0, seq_len, mask_lib.UNDERSTANDING_EXPERT),)
    x, positions, segments, modality = backbone_inputs(size, batch, seq_len)
    init = jax.jit(lambda key: nn.unbox(model.init(key, x, positions, segments, modality)))
    params = init(jax.random.key(1))["params"]
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(params):
        hidden, _ = model.apply(
            {"params": params}, x, positions, segments, modality, expert_spans=spans
        )
        return jnp.mean(jnp.square(hidden))

    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled, compile_s = common.compile_seconds(
        jax.jit(train_step, donate_argnums=(0, 1)), params, opt_state
    )

    def step():
        nonlocal params, opt_state
        params, opt_state, loss = compiled(params, opt_state)
        common.block(loss)

    step()
    seconds = common.median_seconds(step, size.repeats)
    analytic = 3 * batch * flops_lib.backbone_flops(backbone_config, seq_len)
    return dict(
        seconds=seconds,
        compile_seconds=compile_s,
        tokens_per_second=batch * seq_len / seconds,
        analytic_flops=analytic,
        xla_flops=common.xla_flops(compiled),
        mfu=analytic / seconds / peak,
    )


def qwen2_config(size, tied=False):
    """Build the transformers Qwen2 config of a benchmark size's backbone."""
    import transformers

    return transformers.Qwen2Config(
        vocab_size=size.vocab_size,
        hidden_size=size.width,
        intermediate_size=size.mlp_dim,
        num_hidden_layers=size.depth,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )


def torch_backbone_step(size):
    """Time forward, backward and AdamW of the transformers Qwen2 model; return its figures."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2Model(qwen2_config(size)).float()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(size.batch, size.seq_len, size.width)

    def step():
        optimizer.zero_grad(set_to_none=True)
        hidden = model(inputs_embeds=x, use_cache=False).last_hidden_state
        loss = hidden.square().mean()
        loss.backward()
        optimizer.step()

    step()
    seconds = common.median_seconds(step, size.repeats)
    return dict(
        seconds=seconds,
        tokens_per_second=size.batch * size.seq_len / seconds,
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
    )


def run(size, peak=None):
    """Measure all train-step figures of `size`; `peak` (FLOP/s) is measured when not given."""
    peak = common.matmul_peak(size) if peak is None else peak
    rf = rf_train_step(size, peak)
    backbone = jax_backbone_step(size, peak)
    whole_rows = jax_backbone_step(size, peak, query_block=0)
    torch_backbone = torch_backbone_step(size)
    return dict(
        matmul_peak_flops=peak,
        rf_train_step=rf,
        backbone_train_step=backbone,
        backbone_train_step_without_query_blocks=whole_rows,
        transformers_train_step=torch_backbone,
        speedup_over_transformers=torch_backbone["seconds"] / backbone["seconds"],
    )


if __name__ == "__main__":
    common.main(run, __doc__)
