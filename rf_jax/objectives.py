"""Training objectives: text and rep cross-entropy, flow matching, CFG dropout.

Total loss: L = w_text * L_text + w_rep * L_rep + w_fm * L_fm (+ w_repa * L_repa).
- L_text: next-token cross-entropy on target text (answers and captions of
  understanding rows, marked by the loss mask), averaged over target tokens.
- L_rep: next-token cross-entropy on the rep tokens, teacher-forced with the
  EMA encoder's tokens. The continuous variant instead regresses the next EMA
  feature (mean squared error per feature dimension).
- L_fm: the velocity loss of `rf_jax.flow` (t = 1 is clean).
- L_repa (REPA variant only): negative cosine similarity between the projected
  pixel hidden states and the EMA encoder's patch features.
"""

import jax
import jax.numpy as jnp
import optax

from rf_jax import flow
from rf_jax.data.tokenizer import BOS_ID, PAD_ID
from rf_jax.encoder import patchify
from rf_jax.model import RFModel
from rf_jax.sampler import empty_prompt


def cfg_dropout(rng, text_ids, text_rate, rep_rate, pad_id=PAD_ID, bos_id=BOS_ID):
    """Drop the text and rep conditions of generation rows, independently.

    A dropped text condition becomes the empty prompt `[PAD ... BOS]`; a
    dropped rep condition hides the rep tokens from that row's pixel patches.

    Returns:
        (text_ids [batch, text_len], rep_visible bool [batch], text_dropped bool [batch]).
    """
    batch, text_len = text_ids.shape
    text_key, rep_key = jax.random.split(rng)
    text_dropped = jax.random.bernoulli(text_key, text_rate, (batch,))
    rep_visible = ~jax.random.bernoulli(rep_key, rep_rate, (batch,))
    empty = empty_prompt(batch, text_len, pad_id, bos_id)
    text_ids = jnp.where(text_dropped[:, None], empty, text_ids)
    return text_ids, rep_visible, text_dropped


def images_to_patches(images, patch_size):
    """uint8 images [batch, H, W, 3] -> patches in [-1, 1], [batch, patches, p*p*3]."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return patchify(x, patch_size)


def masked_cross_entropy(logits, targets, weights):
    """Weighted mean token cross-entropy and accuracy; weights [batch, len]."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(loss * weights) / total, jnp.sum(correct * weights) / total


def rep_loss(model: RFModel, rep_prediction, targets):
    """Rep-region loss and metrics: cross-entropy on codes, or feature regression."""
    if model.config.continuous_rep:
        features = targets["features"]
        loss = jnp.mean(jnp.square(rep_prediction.astype(jnp.float32) - features))
        return loss, {"loss_rep": loss}
    tokens = targets["tokens"]
    loss, accuracy = masked_cross_entropy(
        rep_prediction, tokens, jnp.ones(tokens.shape, jnp.float32)
    )
    return loss, {"loss_rep": loss, "rep_accuracy": accuracy}


def negative_cosine(prediction, target):
    """Mean of -cos(prediction, target) over [batch, n, dim] rows."""
    prediction = prediction.astype(jnp.float32)
    norms = jnp.linalg.norm(prediction, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return -jnp.mean(jnp.sum(prediction * target, axis=-1) / jnp.maximum(norms, 1e-6))


def generation_loss(model: RFModel, params, batch, targets, rng, loss_cfg):
    """Rep and flow-matching losses (and REPA's alignment) on the generation rows.

    Args:
        batch: dict with `gen_text` int32 [batch, text_len] and `gen_image` uint8.
        targets: from `Trainer.rep_targets`: `tokens` int32 [batch, num_rep] and
            `features` [batch, num_rep, enc_width] of the EMA encoder.
        loss_cfg: `config.loss`.

    Returns:
        (weighted loss, metrics dict).
    """
    cfg = model.config
    drop_key, time_key, noise_key = jax.random.split(rng, 3)
    text_ids, rep_visible, _ = cfg_dropout(
        drop_key,
        batch["gen_text"],
        loss_cfg.text_dropout,
        loss_cfg.rep_dropout,
        cfg.pad_id,
        cfg.bos_id,
    )
    x = images_to_patches(batch["gen_image"], cfg.pixel_patch)
    t = flow.sample_times(time_key, x.shape[0], loss_cfg.t_mu, loss_cfg.t_sigma)
    noise = loss_cfg.noise_scale * jax.random.normal(noise_key, x.shape, jnp.float32)
    z = flow.noisy_inputs(x, t, noise)

    rep_inputs = targets["features"] if cfg.continuous_rep else targets["tokens"]
    (rep_prediction, x_hat), sown = model.apply(
        {"params": params}, text_ids, rep_inputs, z, t, rep_visible, mutable=["intermediates"]
    )
    fm = flow.flow_matching_loss(x_hat, x, z, t, loss_cfg.t_clip)
    metrics = {"loss_fm": fm, "x_mse": jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x))}
    total = loss_cfg.fm_weight * fm
    if rep_prediction is not None:
        loss, rep_metrics = rep_loss(model, rep_prediction, targets)
        metrics.update(rep_metrics)
        total = total + loss_cfg.rep_weight * loss
    if cfg.variant == "repa":
        (projection,) = sown["intermediates"]["repa_projection"]
        repa = negative_cosine(projection, targets["features"])
        metrics["loss_repa"] = repa
        total = total + loss_cfg.repa_weight * repa
    return total, metrics


def understanding_loss(model: RFModel, params, batch, loss_cfg):
    """Text cross-entropy on the answers of understanding rows."""
    text = batch["und_text"]
    logits = model.apply({"params": params}, batch["und_image"], text, method=RFModel.understand)
    loss, accuracy = masked_cross_entropy(
        logits[:, :-1], text[:, 1:], batch["und_loss_mask"][:, 1:]
    )
    return loss_cfg.text_weight * loss, {"loss_text": loss, "text_accuracy": accuracy}


def total_loss(model, params, batch, targets, rng, loss_cfg):
    """Sum the generation and understanding losses present in the batch."""
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    if batch["gen_text"].shape[0]:
        gen, gen_metrics = generation_loss(model, params, batch, targets, rng, loss_cfg)
        loss, metrics = loss + gen, {**metrics, **gen_metrics}
    if batch["und_text"].shape[0]:
        und, und_metrics = understanding_loss(model, params, batch, loss_cfg)
        loss, metrics = loss + und, {**metrics, **und_metrics}
    metrics["loss"] = loss
    return loss, metrics
