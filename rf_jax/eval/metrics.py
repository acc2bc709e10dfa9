"""Metrics for generated text and images: exact match, token F1, accuracy, Frechet distance.

Plain numpy and scipy, so the metrics run without JAX. The Frechet distance
compares two sets of feature vectors, for example the penultimate-layer
features of `rf_jax.eval.classifier` for real and generated images.
"""

import collections
import re
import string
from typing import Sequence
import warnings

from absl import logging
import numpy as np
import scipy.linalg

_WHITESPACE = re.compile(r"\s+")
# sqrtm of the covariance product may return an imaginary part from rounding.
# Above this fraction of the largest real entry, the result is not trusted.
_MAX_RELATIVE_IMAGINARY = 1e-3


def normalize_text(text: str) -> str:
    """Lowercase `text`, strip punctuation around each word and join the words by one space.

    Punctuation inside a word is kept ("t-shirt" stays "t-shirt"), and a word
    made only of punctuation is dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"Expected a string, got {type(text).__name__}: {text!r}.")
    words = (word.strip(string.punctuation) for word in _WHITESPACE.split(text.lower()))
    return " ".join(word for word in words if word)


def _check_text_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, values in (("predictions", predictions), ("references", references)):
        if isinstance(values, str):
            raise TypeError(f"{name} is one string ({values!r}). Pass a list of strings.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references. "
            "Pass one prediction per reference."
        )
    if not predictions:
        raise ValueError("predictions and references are empty. Pass at least one pair.")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return the fraction of predictions equal to their reference after `normalize_text`.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    _check_text_pairs(predictions, references)
    matches = [
        normalize_text(prediction) == normalize_text(reference)
        for prediction, reference in zip(predictions, references)
    ]
    return float(np.mean(matches))


def token_f1(prediction: str, reference: str) -> float:
    """Return the bag-of-words F1 of the normalized tokens of `prediction` and `reference`.

    Each token counts as often as it occurs in both texts. Two empty texts give
    1.0, and one empty text gives 0.0.
    """
    predicted_tokens = normalize_text(prediction).split()
    reference_tokens = normalize_text(reference).split()
    if not predicted_tokens or not reference_tokens:
        return float(predicted_tokens == reference_tokens)
    common = collections.Counter(predicted_tokens) & collections.Counter(reference_tokens)
    num_common = sum(common.values())
    if num_common == 0:
        return 0.0
    precision = num_common / len(predicted_tokens)
    recall = num_common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return the mean `token_f1` over prediction and reference pairs.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    _check_text_pairs(predictions, references)
    scores = [token_f1(p, r) for p, r in zip(predictions, references)]
    return float(np.mean(scores))


def classification_accuracy(predicted_labels, labels) -> float:
    """Return the fraction of `predicted_labels` [n] equal to `labels` [n].

    Raises:
        ValueError: if the arrays are not 1-D, differ in length or are empty.
    """
    predicted_labels = np.asarray(predicted_labels)
    labels = np.asarray(labels)
    if predicted_labels.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"Expected 1-D label arrays, got shapes {list(predicted_labels.shape)} and "
            f"{list(labels.shape)}."
        )
    if len(predicted_labels) != len(labels):
        raise ValueError(
            f"Got {len(predicted_labels)} predicted labels but {len(labels)} labels. "
            "Pass one prediction per label."
        )
    if not len(labels):
        raise ValueError("The label arrays are empty. Pass at least one label.")
    return float(np.mean(predicted_labels == labels))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean [dim] and the unbiased covariance [dim, dim] of `features` [n, dim].

    Raises:
        ValueError: if `features` is not 2-D, has fewer than 2 rows or is not finite.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"Expected features [n, dim], got shape {list(features.shape)}.")
    if features.shape[0] < 2:
        raise ValueError(
            f"Got {features.shape[0]} feature vectors, but a covariance needs at least 2."
        )
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values.")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def _check_statistics(mu, sigma, name):
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"Statistics {name} have mean shape {list(mu.shape)} and covariance shape "
            f"{list(sigma.shape)}, expected [dim] and [dim, dim]."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"Statistics {name} contain NaN or infinite values.")
    return mu, sigma


def _trace_sqrt_product(sigma_a, sigma_b):
    """Return Tr((sigma_a sigma_b)^(1/2)), or None if sqrtm gives no trustworthy result."""
    with warnings.catch_warnings():
        # Singular products are handled by the caller, which adds eps and retries.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        # The product of two covariances has real non-negative eigenvalues, so an
        # imaginary part comes only from rounding near zero eigenvalues.
        scale = max(np.abs(root.real).max(), np.finfo(np.float64).tiny)
        if np.abs(root.imag).max() > _MAX_RELATIVE_IMAGINARY * scale:
            return None
        root = root.real
    return float(np.trace(root))


def frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """Return the Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b).

    d = ||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)).

    The square root is `scipy.linalg.sqrtm`. An imaginary part of at most 1e-3
    times the largest real entry is rounding noise and is dropped. If the square
    root is not finite or has a larger imaginary part, the product is close to
    singular. Then `eps` is added to the diagonal of both covariances, a warning
    is logged, and the distance between these regularized Gaussians is returned.
    Rounding can make the result slightly negative when the distributions match.

    Raises:
        ValueError: if the shapes disagree, the statistics are not finite, or the
            square root fails even with `eps` added.
    """
    mu_a, sigma_a = _check_statistics(mu_a, sigma_a, "a")
    mu_b, sigma_b = _check_statistics(mu_b, sigma_b, "b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(
            f"Feature dimensions differ: {mu_a.shape[0]} and {mu_b.shape[0]}. "
            "Compute both statistics with the same feature extractor."
        )

    trace_root = _trace_sqrt_product(sigma_a, sigma_b)
    if trace_root is None:
        logging.warning(
            "sqrtm of the covariance product is not finite or not real. Adding eps=%g "
            "to the diagonal of both covariances.",
            eps,
        )
        sigma_a = sigma_a + eps * np.eye(mu_a.shape[0])
        sigma_b = sigma_b + eps * np.eye(mu_b.shape[0])
        trace_root = _trace_sqrt_product(sigma_a, sigma_b)
    if trace_root is None:
        raise ValueError(
            f"The matrix square root of the covariance product failed even with eps={eps} "
            "added to the diagonal. Pass a larger eps or use more samples than dimensions."
        )

    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    return mean_term + float(np.trace(sigma_a) + np.trace(sigma_b)) - 2.0 * trace_root


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Return the Frechet distance between Gaussians fitted to features_a [n_a, dim] and features_b [n_b, dim].

    See `frechet_distance_from_statistics` for how the matrix square root is
    kept real and finite.

    Raises:
        ValueError: if either set has fewer than 2 rows or the dimensions differ.
    """
    features_a = np.asarray(features_a)
    features_b = np.asarray(features_b)
    if features_a.ndim == 2 and features_b.ndim == 2 and features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"Feature dimensions differ: {list(features_a.shape)} and {list(features_b.shape)}. "
            "Extract both sets with the same feature extractor."
        )
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b, eps)
