"""Attention mask of the unified sequence, built from segment ids and modality.

Every token carries a segment id (0 marks padding, equal ids mark one example)
and a modality. The rules, for a query q and a key k of the same segment:

- text and representation (rep) tokens attend causally;
- pixel patches attend to every pixel patch of their image and to every token
  before it, and no other token attends to pixel patches;
- image tokens of an understanding example (encoder outputs) attend to each
  other in both directions;
- when a row's rep condition is dropped (classifier-free guidance), its pixel
  patches do not attend to its rep tokens.

Order is the token's index in the row (or in the KV cache), not its RoPE
position, so packing several examples into one row needs nothing but distinct
segment ids.
"""

# Modality ids. Padding is any token whose segment id is 0.
TEXT = 0
IMAGE = 1  # Encoder tokens of an understanding example.
REP = 2
PIXEL = 3
NUM_MODALITIES = 4

# Modality -> FFN expert of the Mixture-of-Transformers backbone.
UNDERSTANDING_EXPERT = 0
REP_EXPERT = 1
PIXEL_EXPERT = 2
NUM_EXPERTS = 3
EXPERT_OF_MODALITY = (UNDERSTANDING_EXPERT, UNDERSTANDING_EXPERT, REP_EXPERT, PIXEL_EXPERT)


def attention_mask(
    q_segment, q_modality, q_index, k_segment, k_modality, k_index, rep_visible=None
):
    """Return the boolean mask [batch, q_len, k_len] of allowed (query, key) pairs.

    Args:
        q_segment, q_modality, q_index: int32 [batch, q_len] for the queries.
        k_segment, k_modality, k_index: int32 [batch, k_len] for the keys.
        rep_visible: optional bool [batch]; False hides rep keys from pixel
            queries of that row.
    """
    qs, qm, qi = q_segment[:, :, None], q_modality[:, :, None], q_index[:, :, None]
    ks, km, ki = k_segment[:, None, :], k_modality[:, None, :], k_index[:, None, :]

    same_example = (qs == ks) & (qs != 0)
    both_pixel = (qm == PIXEL) & (km == PIXEL)
    both_image = (qm == IMAGE) & (km == IMAGE)
    ordered = (ki <= qi) | both_pixel | both_image
    pixel_key_hidden = (km == PIXEL) & (qm != PIXEL)
    allowed = same_example & ordered & ~pixel_key_hidden

    if rep_visible is not None:
        rep_hidden = (qm == PIXEL) & (km == REP) & ~rep_visible[:, None, None]
        allowed = allowed & ~rep_hidden
    return allowed
