"""Train state, optimiser, sharded initialisation and the jitted train step.

One train step, all inside one `jax.jit` with donated state:

1. The EMA encoder reads the generation images; each patch feature becomes
   the token of its nearest prototype (the rep-token targets). No gradient
   flows into the EMA encoder or the codebook.
2. Loss and gradients of the model parameters (`rf_jax.objectives`).
3. AdamW update, then the EMA update of the encoder and the Sinkhorn-Knopp
   codebook update, both pure state transitions.
"""

import contextlib
import re

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rf_jax import codebook as codebook_lib
from rf_jax import objectives
from rf_jax import partitioning
from rf_jax.ema import ema_update
from rf_jax.encoder import Encoder
from rf_jax.model import ModelConfig, RFModel


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit for bit (the data iterator is saved beside it)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema_encoder: dict
    codebook: codebook_lib.CodebookState
    rng: jax.Array
    skipped_steps: jax.Array  # Updates skipped for a non-finite loss or gradient.


def learning_rate_schedule(optim_cfg, total_steps):
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it."""
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.learning_rate * optim_cfg.min_lr_ratio,
    )


def frozen_labels(params, patterns):
    """Label each parameter "frozen" if its path ("backbone/layers_0/...") matches a pattern."""
    compiled = [re.compile(pattern) for pattern in patterns]

    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return "frozen" if any(p.search(name) for p in compiled) else "trained"

    # Unboxed, so a logically partitioned parameter gets one label for its whole box.
    return jax.tree_util.tree_map_with_path(label, nn.unbox(params))


def check_frozen_patterns(params, patterns):
    """Raise ValueError naming a pattern of `optim.frozen` that matches no parameter."""
    names = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    examples = [names[0]] + [name for name in names if "/layers" in name][:1]
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            raise ValueError(
                f"optim.frozen pattern {pattern!r} matches no parameter; parameter paths "
                f"look like {' or '.join(map(repr, examples))}."
            )


def make_optimizer(optim_cfg, total_steps):
    """AdamW with global-norm clipping; weight decay on matrices only.

    Parameters matching a regular expression of `optim_cfg.frozen` get no
    update and no optimiser state (a stage that aligns new modules to frozen ones).
    """
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    patterns = tuple(optim_cfg.get("frozen", ()))
    if not patterns:
        return adamw
    return optax.multi_transform(
        {"trained": adamw, "frozen": optax.set_to_zero()},
        lambda params: frozen_labels(params, patterns),
    )


def dummy_inputs(cfg: ModelConfig, und_text_len):
    """Smallest inputs that touch every parameter of the model."""
    batch = 1
    return dict(
        text_ids=jnp.zeros((batch, cfg.text_len), jnp.int32).at[:, -1].set(1),
        rep=(
            jnp.zeros((batch, cfg.num_rep, cfg.encoder.width), jnp.float32)
            if cfg.continuous_rep
            else jnp.zeros((batch, cfg.num_rep), jnp.int32)
        ),
        z=jnp.zeros((batch, cfg.num_pixels, cfg.pixel_dim), jnp.float32),
        t=jnp.zeros((batch,), jnp.float32),
        rep_visible=jnp.ones((batch,), bool),
        und_images=jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.uint8),
        und_text=jnp.zeros((batch, und_text_len), jnp.int32).at[:, 0].set(1),
    )


class Trainer:
    """Holds the static parts of training (model, optimiser, mesh) and builds jitted functions."""

    def __init__(self, config, model_config: ModelConfig, mesh, total_steps):
        if config.train.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"train.nonfinite={config.train.nonfinite!r} is not one of {NONFINITE_POLICIES}."
            )
        self.config = config
        self.model_config = model_config
        self.model = RFModel(model_config)
        self.encoder = Encoder(model_config.encoder)
        self.mesh = mesh
        self.tx = make_optimizer(config.optim, total_steps)
        self.schedule = learning_rate_schedule(config.optim, total_steps)
        self.rules = partitioning.LOGICAL_RULES

    def _make_state(self, rng):
        """Build a boxed (logically annotated) train state."""
        init_key, codebook_key, state_key = jax.random.split(rng, 3)
        inputs = dummy_inputs(self.model_config, self.config.data.und_text_len)
        params = self.model.init(init_key, **inputs, method=RFModel.initialize)["params"]
        codebook = codebook_lib.init_codebook(
            codebook_key, self.model_config.codebook_size, self.model_config.encoder.width
        )
        codebook = codebook.replace(
            prototypes=nn.LogicallyPartitioned(codebook.prototypes, ("codebook", "enc_embed")),
            usage=nn.LogicallyPartitioned(codebook.usage, ("codebook",)),
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_encoder=params["encoder"],
            codebook=codebook,
            rng=state_key,
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    def abstract_state(self):
        """Shapes and dtypes of the train state, with its shardings: (abstract, shardings)."""
        boxed = jax.eval_shape(self._make_state, jax.random.key(0))
        check_frozen_patterns(nn.unbox(boxed.params), self.config.optim.get("frozen", ()))
        shardings = partitioning.logical_shardings(boxed, self.mesh, self.rules)
        abstract = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            nn.unbox(boxed),
            shardings,
        )
        return abstract, shardings

    def init_state(self, seed):
        """Create the train state directly in its sharded layout."""
        _, shardings = self.abstract_state()
        init = jax.jit(lambda rng: nn.unbox(self._make_state(rng)), out_shardings=shardings)
        with self.sharding_context():
            return init(jax.random.key(seed))

    def rep_targets(self, ema_encoder, codebook, gen_images):
        """Compute the EMA encoder's targets for the generation loss, without gradient.

        Returns:
            (features [n, enc_width] for the codebook update, n = 0 when the
            variant has no codebook; targets dict with `tokens` int32
            [batch, num_rep] and `features` float32 [batch, rep_grid**2, enc_width],
            each empty where the variant does not use it).
        """
        mcfg = self.model_config
        batch = gen_images.shape[0]
        width = mcfg.encoder.width
        features = jnp.zeros((batch, 0, width), jnp.float32)
        tokens = jnp.zeros((batch, 0), jnp.int32)
        if mcfg.uses_ema_features and batch:
            features = self.encoder.apply({"params": ema_encoder}, gen_images)
            features = jax.lax.stop_gradient(features.astype(jnp.float32))
        if mcfg.uses_codebook and batch:
            tokens = codebook_lib.assign_tokens(features, codebook.prototypes)
            codebook_features = features.reshape(-1, width)
        else:
            codebook_features = jnp.zeros((0, width), jnp.float32)
        return codebook_features, {"tokens": tokens, "features": features}

    def loss(self, params, batch, targets, rng):
        """Total loss and metrics of one batch (`targets` from `rep_targets`)."""
        return objectives.total_loss(self.model, params, batch, targets, rng, self.config.loss)

    def _train_step(self, state: TrainState, batch):
        cfg = self.config
        rng = jax.random.fold_in(state.rng, state.step)
        features, targets = self.rep_targets(state.ema_encoder, state.codebook, batch["gen_image"])
        loss_fn = lambda params: self.loss(params, batch, targets, rng)  # noqa: E731
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_encoder, params["encoder"], cfg.model.ema_decay)

        codebook = state.codebook
        if features.shape[0]:
            cb = cfg.model.codebook
            codebook, codebook_metrics = codebook_lib.update_codebook(
                codebook,
                features,
                momentum=cb.momentum,
                eps=cb.sinkhorn_eps,
                num_iters=cb.sinkhorn_iters,
                usage_decay=cb.usage_decay,
            )
            metrics.update(codebook_metrics)
        grad_norm = optax.tree_utils.tree_norm(grads)
        metrics.update(grad_norm=grad_norm, learning_rate=self.schedule(state.step))
        updated = dict(params=params, opt_state=opt_state, ema_encoder=ema, codebook=codebook)
        skipped = state.skipped_steps
        if cfg.train.nonfinite == "skip":
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            kept = dict(
                params=state.params,
                opt_state=state.opt_state,
                ema_encoder=state.ema_encoder,
                codebook=state.codebook,
            )
            updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
            skipped = skipped + (~finite).astype(jnp.int32)
        metrics["skipped_steps"] = skipped
        return state.replace(step=state.step + 1, skipped_steps=skipped, **updated), metrics

    @contextlib.contextmanager
    def sharding_context(self):
        """Activate the mesh and the logical-axis rules, for tracing and running."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def jitted_train_step(self, state_shardings):
        """Return the `jax.jit` train step, for lowering ahead of time inside `sharding_context`."""
        return jax.jit(
            self._train_step,
            in_shardings=(state_shardings, partitioning.batch_sharding(self.mesh)),
            out_shardings=(state_shardings, partitioning.replicated(self.mesh)),
            donate_argnums=0,
        )

    def jit_train_step(self, state_shardings):
        """Return the jitted step (state donated): (state, batch) -> (state, metrics)."""
        step = self.jitted_train_step(state_shardings)

        def run(state, batch):
            with self.sharding_context():
                return step(state, batch)

        return run


NONFINITE_POLICIES = ("error", "skip")


def check_finite(metrics, step):
    """Raise FloatingPointError naming the step if a loss or the gradient norm is not finite.

    Used with `train.nonfinite="error"`; with "skip" the step itself keeps the old state.
    """
    bad = {
        k: float(v)
        for k, v in metrics.items()
        if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)
    }
    if bad:
        raise FloatingPointError(
            f"Non-finite values at step {step}: {bad}. Lower optim.learning_rate or "
            "optim.grad_clip, or restart from the last checkpoint."
        )
