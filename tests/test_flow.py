"""Flow matching: velocities, the loss, and the ODE sampler on a Gaussian data set."""

import jax
import jax.numpy as jnp
import numpy as np

from rf_jax import flow


def test_velocity_formula():
    x = jnp.asarray([[1.0, -1.0]])
    z = jnp.asarray([[0.2, 0.4]])
    t = jnp.asarray([0.5])
    expected = (np.asarray(x) - np.asarray(z)) / 0.5
    np.testing.assert_allclose(flow.velocity(x, z, t, 0.05), expected, rtol=1e-6)


def test_velocity_clipped_near_clean():
    x = jnp.asarray([[1.0]])
    z = jnp.asarray([[0.99]])
    t = jnp.asarray([0.999])
    # 1 - t = 0.001 is below the clip, so the divisor is 0.05.
    np.testing.assert_allclose(flow.velocity(x, z, t, 0.05), [[0.01 / 0.05]], rtol=1e-5)


def test_noisy_inputs_endpoints():
    x = jnp.ones((2, 3))
    noise = -jnp.ones((2, 3))
    np.testing.assert_array_equal(
        flow.noisy_inputs(x, jnp.asarray([1.0, 0.0]), noise), [[1, 1, 1], [-1, -1, -1]]
    )


def test_loss_zero_for_exact_prediction():
    x = jax.random.normal(jax.random.key(0), (4, 5, 6))
    noise = jax.random.normal(jax.random.key(1), x.shape)
    t = jnp.linspace(0.1, 0.9, 4)
    z = flow.noisy_inputs(x, t, noise)
    assert float(flow.flow_matching_loss(x, x, z, t)) == 0.0


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    x, x_hat, noise = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    t = np.asarray([0.2, 0.97, 0.5], np.float32)
    z = t[:, None] * x + (1 - t[:, None]) * noise
    divisor = np.maximum(1 - t, 0.05)[:, None]
    expected = np.mean(((x_hat - z) / divisor - (x - z) / divisor) ** 2)
    got = flow.flow_matching_loss(
        jnp.asarray(x_hat), jnp.asarray(x), jnp.asarray(z), jnp.asarray(t)
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_sample_times_median():
    t = flow.sample_times(jax.random.key(0), 20000, mu=-0.8, sigma=0.8)
    # The median of sigmoid(N(mu, s)) is sigmoid(mu); 20,000 draws put it within about 0.01.
    assert abs(float(jnp.median(t)) - float(jax.nn.sigmoid(-0.8))) < 0.01
    assert float(t.min()) > 0.0
    assert float(t.max()) < 1.0


def test_sampler_reproduces_gaussian():
    # Data x ~ N(m, s^2) per dimension, noise e ~ N(0, n^2). With z = t x + (1 - t) e,
    # the posterior mean is E[x | z] = m + t s^2 (z - t m) / (t^2 s^2 + (1 - t)^2 n^2),
    # the exact denoiser, so the ODE must carry N(0, n^2) to N(m, s^2).
    m = jnp.asarray([0.5, -0.3, 0.0])
    s = jnp.asarray([0.2, 0.6, 1.0])
    noise_scale = 1.0

    def denoise(z, t):
        t = t[:, None]
        var_z = t**2 * s**2 + (1 - t) ** 2 * noise_scale**2
        return m + t * s**2 * (z - t * m) / var_z

    z0 = noise_scale * jax.random.normal(jax.random.key(0), (20000, 3))
    samples = np.asarray(flow.integrate(denoise, z0, num_steps=50))
    # Sampling error of the mean is s / sqrt(20000) < 0.008; of the std about 0.5%;
    # Heun with 50 steps adds well under 1%.
    np.testing.assert_allclose(samples.mean(axis=0), m, atol=0.02)
    np.testing.assert_allclose(samples.std(axis=0), s, rtol=0.03)


def test_sampler_single_euler_step_lands_on_prediction():
    target = jnp.full((2, 3), 0.25)
    out = flow.integrate(lambda z, t: target, jnp.zeros((2, 3)), num_steps=1)
    np.testing.assert_allclose(out, target, rtol=1e-6)
