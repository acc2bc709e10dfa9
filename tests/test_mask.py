"""Attention mask rules, checked as a table and through the backbone's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax import mask as mask_lib
from rf_jax.backbone import Backbone, BackboneConfig

T, I, R, P = mask_lib.TEXT, mask_lib.IMAGE, mask_lib.REP, mask_lib.PIXEL

# A packed row: example 1 = text text rep rep pixel pixel, example 2 = text rep pixel pixel,
# then one padding token.
PACKED_MODALITY = [T, T, R, R, P, P, T, R, P, P, T]
PACKED_SEGMENT = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]

PACKED_CASES = [
    # (query, key, allowed, rule)
    (1, 0, True, "text attends to earlier text"),
    (0, 1, False, "text does not attend to later text"),
    (2, 1, True, "rep attends to the text before it"),
    (2, 3, False, "rep does not attend to later rep"),
    (3, 2, True, "rep attends to earlier rep"),
    (4, 5, True, "pixel attends to a later pixel of its image"),
    (5, 4, True, "pixel attends to an earlier pixel of its image"),
    (4, 0, True, "pixel attends to the prompt"),
    (4, 3, True, "pixel attends to the rep tokens"),
    (3, 4, False, "rep does not attend to pixels"),
    (1, 4, False, "text does not attend to pixels"),
    (6, 5, False, "second example does not see the first"),
    (8, 4, False, "pixels of two examples are separate"),
    (4, 8, False, "first example does not see the second"),
    (8, 9, True, "second example's pixels attend to each other"),
    (8, 6, True, "second example's pixels attend to its prompt"),
    (10, 10, False, "padding attends to nothing"),
    (10, 0, False, "padding attends to nothing of example 1"),
    (0, 10, False, "nothing attends to padding"),
]


def packed_mask(rep_visible=None):
    seg = jnp.asarray([PACKED_SEGMENT], jnp.int32)
    mod = jnp.asarray([PACKED_MODALITY], jnp.int32)
    index = jnp.arange(len(PACKED_SEGMENT), dtype=jnp.int32)[None]
    return np.asarray(mask_lib.attention_mask(seg, mod, index, seg, mod, index, rep_visible))[0]


@pytest.mark.parametrize("query,key,allowed,rule", PACKED_CASES)
def test_packed_row_rules(query, key, allowed, rule):
    assert packed_mask()[query, key] == allowed, rule


def test_dropped_rep_hidden_from_pixels():
    mask = packed_mask(rep_visible=jnp.asarray([False]))
    assert not mask[4, 2]
    assert not mask[5, 3]
    assert mask[4, 0], "pixels still see the prompt"
    assert mask[4, 5], "pixels still see each other"
    assert mask[3, 2], "rep tokens still see each other"


def test_understanding_image_bidirectional():
    seg = jnp.ones((1, 4), jnp.int32)
    mod = jnp.asarray([[I, I, T, T]], jnp.int32)
    index = jnp.arange(4, dtype=jnp.int32)[None]
    mask = np.asarray(mask_lib.attention_mask(seg, mod, index, seg, mod, index))[0]
    assert mask[0, 1], "image tokens attend to later image tokens"
    assert mask[1, 0]
    assert mask[2, 1], "text attends to the image"
    assert not mask[1, 2], "image tokens do not attend to the text after them"
    assert not mask[2, 3], "text stays causal"


def _backbone_outputs(x):
    config = BackboneConfig(width=16, depth=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
    model = Backbone(config)
    seg = jnp.asarray([PACKED_SEGMENT], jnp.int32)
    mod = jnp.asarray([PACKED_MODALITY], jnp.int32)
    positions = jnp.arange(len(PACKED_SEGMENT), dtype=jnp.int32)[None]
    params = model.init(jax.random.key(0), x, positions, seg, mod)
    hidden, _ = model.apply(params, x, positions, seg, mod)
    return np.asarray(hidden[0])


def _random_inputs(seed):
    return jax.random.normal(jax.random.key(seed), (1, len(PACKED_SEGMENT), 16))


def test_pixels_ignore_later_example():
    x = _random_inputs(0)
    changed = x.at[:, 6:10].set(_random_inputs(1)[:, 6:10])
    before, after = _backbone_outputs(x), _backbone_outputs(changed)
    # Exact: the masked keys get zero softmax weight (exp underflows to 0 in float32).
    np.testing.assert_array_equal(before[:6], after[:6])
    assert np.abs(before[6:10] - after[6:10]).max() > 1e-3, "the second example must change"


def test_prefix_ignores_pixels():
    x = _random_inputs(0)
    changed = x.at[:, 4:6].set(_random_inputs(2)[:, 4:6])
    before, after = _backbone_outputs(x), _backbone_outputs(changed)
    np.testing.assert_array_equal(before[:4], after[:4])
    assert np.abs(before[4:6] - after[4:6]).max() > 1e-3, "the pixels themselves must change"
