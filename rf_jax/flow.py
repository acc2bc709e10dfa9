"""Flow matching in pixel space with x-prediction and a velocity loss.

Time convention: t = 1 is the clean image and t = 0 is pure noise (BAGEL uses
the opposite direction). With clean patches x in [-1, 1] and noise
e ~ N(0, noise_scale^2 I):

    z_t = t * x + (1 - t) * e
    v   = (x - z_t) / max(1 - t, t_clip)        (target velocity)
    v^  = (x^ - z_t) / max(1 - t, t_clip)       (from the predicted clean x^)
    L   = mean ||v^ - v||^2

Training times are t = sigmoid(n), n ~ N(mu, sigma), which puts most of the
weight on noisy inputs for the default mu = -0.8.
"""

import jax
import jax.numpy as jnp


def sample_times(rng, batch, mu=-0.8, sigma=0.8):
    """Draw flow times t [batch] = sigmoid(N(mu, sigma))."""
    return jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, (batch,), jnp.float32))


def noisy_inputs(x, t, noise):
    """Return z_t = t * x + (1 - t) * noise for x, noise [batch, ...] and t [batch]."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return t * x + (1.0 - t) * noise


def velocity(x, z, t, t_clip):
    """Velocity (x - z) / max(1 - t, t_clip) that carries z at time t [batch] toward x."""
    t = t.reshape((-1,) + (1,) * (z.ndim - 1))
    return (x - z) / jnp.maximum(1.0 - t, t_clip)


def flow_matching_loss(x_hat, x, z, t, t_clip=0.05):
    """Mean squared error between predicted and target velocities (float32 scalar)."""
    x_hat = x_hat.astype(jnp.float32)
    v_hat = velocity(x_hat, z, t, t_clip)
    v = velocity(x, z, t, t_clip)
    return jnp.mean(jnp.square(v_hat - v))


def time_grid(num_steps):
    """Uniform integration times [num_steps + 1] from 0 (noise) to 1 (clean)."""
    return jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)


def integrate(denoise_fn, z0, num_steps):
    """Integrate dz/dt = (x^(z, t) - z) / (1 - t) from t = 0 to t = 1.

    Heun's method on every step but the last, which is an Euler step: it ends
    at t = 1, where the velocity is undefined, and lands exactly on x^. No
    evaluation happens at t = 1, so the sampler needs no clipping of 1 - t.

    Args:
        denoise_fn: (z [batch, ...], t [batch]) -> x^ [batch, ...], the clean estimate.
        z0: noise [batch, ...] at t = 0.
        num_steps: number of steps (static).

    Returns:
        The sample at t = 1, same shape as z0, float32.
    """
    times = time_grid(num_steps)
    batch = z0.shape[0]

    def drift(z, t):
        t_batch = jnp.full((batch,), t, jnp.float32)
        x_hat = denoise_fn(z, t_batch).astype(jnp.float32)
        return velocity(x_hat, z, t_batch, 0.0)

    def heun_step(i, z):
        t, t_next = times[i], times[i + 1]
        d = drift(z, t)
        z_euler = z + (t_next - t) * d
        return z + (t_next - t) * 0.5 * (d + drift(z_euler, t_next))

    z = jax.lax.fori_loop(0, num_steps - 1, heun_step, z0.astype(jnp.float32))
    return z + (times[-1] - times[-2]) * drift(z, times[-2])
