"""Tests for rf_jax.eval.metrics."""

import numpy as np
import pytest
import scipy.linalg

from rf_jax.eval import metrics


def _reference_frechet(mu_a, sigma_a, mu_b, sigma_b):
    """Frechet distance through symmetric eigendecompositions in float64, without sqrtm.

    Tr((S_a S_b)^(1/2)) equals the sum of the square roots of the eigenvalues of
    the symmetric matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum.
    """
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product_values = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    trace_root = np.sqrt(np.clip(product_values, 0, None)).sum()
    mean_term = np.sum((mu_a - mu_b) ** 2)
    return mean_term + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root


def _correlated_features(seed, n, dim, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_normalize_text_cases():
    assert metrics.normalize_text("  The  Cat. ") == "the cat"
    assert metrics.normalize_text("T-Shirt!") == "t-shirt"
    assert metrics.normalize_text("Hello,\tworld\n") == "hello world"
    # A word made only of punctuation is dropped.
    assert metrics.normalize_text("yes ... no") == "yes no"
    assert metrics.normalize_text("?!") == ""


def test_normalize_text_rejects_non_string():
    with pytest.raises(TypeError, match="Expected a string"):
        metrics.normalize_text(3)


def test_exact_match_known_fraction():
    predictions = ["A dress", "coat", "bag."]
    references = ["a dress", "a coat", "Bag"]
    # Pairs 1 and 3 match after normalization, pair 2 misses the article: 2 / 3.
    assert metrics.exact_match(predictions, references) == pytest.approx(2 / 3, abs=1e-12)


def test_token_f1_partial_overlap():
    # Common tokens {red, coat}: precision 2/3, recall 2/4, F1 = 2 * (1/3) / (7/6) = 4/7.
    assert metrics.token_f1("a red coat", "the red coat here") == pytest.approx(4 / 7, abs=1e-12)


def test_token_f1_counts_repeated_tokens():
    # "red" is common once: precision 1/3, recall 1, F1 = 2 * (1/3) / (4/3) = 1/2.
    assert metrics.token_f1("red red red", "red") == pytest.approx(0.5, abs=1e-12)


def test_token_f1_empty_and_disjoint():
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("", "coat") == 0.0
    assert metrics.token_f1("coat", "") == 0.0
    # "..." normalizes to the empty string.
    assert metrics.token_f1("coat", "...") == 0.0
    assert metrics.token_f1("a coat", "the bag") == 0.0
    assert metrics.token_f1("Red Coat!", "red coat") == 1.0


def test_mean_token_f1_averages_pairs():
    predictions = ["a red coat", "red red red", "", "bag"]
    references = ["the red coat here", "red", "", "shoe"]
    # Per pair: 4/7, 1/2, 1 and 0, so the mean is (4/7 + 3/2) / 4 = 29/56.
    assert metrics.mean_token_f1(predictions, references) == pytest.approx(29 / 56, abs=1e-12)


@pytest.mark.parametrize("metric", [metrics.exact_match, metrics.mean_token_f1])
def test_text_metrics_reject_bad_lists(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(TypeError, match="one string"):
        metric("coat", "coat")


def test_classification_accuracy_known_fraction():
    assert metrics.classification_accuracy([1, 2, 3, 4], np.array([1, 0, 3, 0])) == 0.5


def test_classification_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3 predicted labels but 2 labels"):
        metrics.classification_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        metrics.classification_accuracy([[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="empty"):
        metrics.classification_accuracy([], [])


def test_feature_statistics_match_numpy():
    features = _correlated_features(0, 50, 4)
    mu, sigma = metrics.feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    # Unbiased covariance, divided by n - 1, written out instead of np.cov.
    centered = features - features.mean(axis=0)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10)


def test_frechet_identical_sets_zero():
    features = _correlated_features(1, 500, 8)
    trace = np.trace(np.cov(features, rowvar=False))
    # Only rounding remains. float64 sqrtm of an 8 x 8 product is good to about 1e-12 relative.
    assert abs(metrics.frechet_distance(features, features)) < 1e-9 * trace


def test_frechet_translation_gives_squared_shift():
    features = _correlated_features(2, 500, 8)
    shift = np.linspace(-1.0, 2.0, 8)
    trace = np.trace(np.cov(features, rowvar=False))
    distance = metrics.frechet_distance(features, features + shift)
    # The covariances are equal, so the trace term cancels up to float64 rounding.
    assert distance == pytest.approx(np.sum(shift**2), abs=1e-9 * trace)


def test_frechet_matches_eigen_reference():
    features_a = _correlated_features(3, 400, 6)
    features_b = _correlated_features(4, 300, 6, shift=0.3)
    mu_a, sigma_a = features_a.mean(0), np.cov(features_a, rowvar=False)
    mu_b, sigma_b = features_b.mean(0), np.cov(features_b, rowvar=False)
    expected = _reference_frechet(mu_a, sigma_a, mu_b, sigma_b)
    # Both routes are float64 on well-conditioned 6 x 6 matrices.
    assert metrics.frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances_match_reference():
    # 5 samples in 20 dimensions give covariances of rank 4, so the product is singular.
    features_a = _correlated_features(5, 5, 20)
    features_b = _correlated_features(6, 5, 20)
    mu_a, sigma_a = features_a.mean(0), np.cov(features_a, rowvar=False)
    mu_b, sigma_b = features_b.mean(0), np.cov(features_b, rowvar=False)
    expected = _reference_frechet(mu_a, sigma_a, mu_b, sigma_b)
    # sqrtm of a singular matrix loses about half the float64 digits near zero eigenvalues.
    assert metrics.frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-6)


def test_frechet_gaussian_population_closed_form():
    n = 100_000
    mu_a, mu_b = np.zeros(3), np.array([1.0, -0.5, 0.25])
    var_a, var_b = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    rng = np.random.default_rng(7)
    features_a = mu_a + rng.normal(size=(n, 3)) * np.sqrt(var_a)
    features_b = mu_b + rng.normal(size=(n, 3)) * np.sqrt(var_b)
    # Diagonal covariances commute: d = |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    population = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)

    # Tolerance from the sampling error: the mean difference has variance
    # (var_a + var_b) / n per dimension, and a sample standard deviation has
    # relative standard error 1 / sqrt(2 n). Linearising d in both gives its
    # first-order standard error. Off-diagonal sample covariances of size
    # 1 / sqrt(n) and the bias of |mean difference|^2 add O(dim * trace / n).
    mean_error = 2 * np.sqrt(np.sum((mu_a - mu_b) ** 2 * (var_a + var_b)) / n)
    std_a, std_b = np.sqrt(var_a), np.sqrt(var_b)
    spread_error = 2 * np.abs(std_a - std_b) * np.sqrt((var_a + var_b) / (2 * n))
    first_order = np.sqrt(mean_error**2 + np.sum(spread_error**2))
    second_order = 3 * np.sum(var_a + var_b) / n
    tolerance = 5 * first_order + 10 * second_order

    distance = metrics.frechet_distance(features_a, features_b)
    assert abs(distance - population) < tolerance
    # The bound is tight enough to catch a missing factor 2 on the cross term.
    assert tolerance < 0.05 * population


def test_frechet_adds_eps_when_sqrtm_is_not_finite(monkeypatch):
    features_a = _correlated_features(8, 200, 4)
    features_b = _correlated_features(9, 200, 4, shift=1.0)
    mu_a, sigma_a = metrics.feature_statistics(features_a)
    mu_b, sigma_b = metrics.feature_statistics(features_b)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        if len(calls) == 1:
            return np.full_like(matrix, np.nan)
        return real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_failing_once)
    eps = 0.5
    distance = metrics.frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b, eps=eps)

    assert len(calls) == 2
    offset = eps * np.eye(4)
    expected = _reference_frechet(mu_a, sigma_a + offset, mu_b, sigma_b + offset)
    # float64 on well-conditioned 4 x 4 matrices, as in the reference test above.
    assert distance == pytest.approx(expected, rel=1e-9)


def test_frechet_rejects_complex_sqrtm(monkeypatch):
    mu = np.zeros(2)
    sigma = np.eye(2)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda matrix: matrix * (1 + 1j))
    with pytest.raises(ValueError, match="failed even with eps"):
        metrics.frechet_distance_from_statistics(mu, sigma, mu, sigma)


def test_frechet_rejects_bad_input():
    features = _correlated_features(10, 20, 4)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(features[:1], features)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(features, features[:, :3])
    with pytest.raises(ValueError, match=r"features \[n, dim\]"):
        metrics.frechet_distance(features[0], features)
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.full((3, 4), np.nan), features)
    with pytest.raises(ValueError, match="expected \\[dim\\] and \\[dim, dim\\]"):
        metrics.frechet_distance_from_statistics(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
