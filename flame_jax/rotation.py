"""Zero-safe rotation helpers (axis-angle, rotation matrices)."""

import jax.numpy as jnp

# Below this squared angle the Taylor forms are exact to float32/float64 precision.
_SMALL_ANGLE_SQ = 1e-12


def skew(vectors):
    """(..., 3) -> (..., 3, 3) cross-product matrices [v]_x."""
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    zero = jnp.zeros_like(x)
    return jnp.stack([
        jnp.stack([zero, -z, y], -1),
        jnp.stack([z, zero, -x], -1),
        jnp.stack([-y, x, zero], -1),
    ], -2)


def rodrigues(axis_angle):
    """Axis-angle (..., 3) radians -> rotation matrices (..., 3, 3).

    R = I + sin(t)/t K + (1 - cos t)/t^2 K^2 with K = [axis_angle]_x. No epsilon is added to the
    angle (smplx adds 1e-8, which biases small rotations); the double `where` keeps the value and
    the gradient exact and finite at t = 0. (1 - cos t) is evaluated as 2 sin^2(t/2) to avoid
    cancellation in float32.
    """
    theta_sq = jnp.sum(axis_angle * axis_angle, axis=-1)
    small = theta_sq < _SMALL_ANGLE_SQ
    safe_theta_sq = jnp.where(small, 1.0, theta_sq)
    theta = jnp.sqrt(safe_theta_sq)
    half_sinc = jnp.sin(0.5 * theta) / (0.5 * theta)
    sin_over_theta = jnp.where(small, 1.0 - theta_sq / 6.0, jnp.sin(theta) / theta)
    one_minus_cos_over_theta_sq = jnp.where(small, 0.5 - theta_sq / 24.0, 0.5 * half_sinc**2)
    k = skew(axis_angle)
    eye = jnp.eye(3, dtype=axis_angle.dtype)
    return (eye + sin_over_theta[..., None, None] * k
            + one_minus_cos_over_theta_sq[..., None, None] * (k @ k))


def yaw_angle(rotation):
    """Rotation about +y (radians) of the Euler decomposition used by FLAME's contour landmarks.

    (..., 3, 3) -> (...,): atan2(-R[2, 0], sqrt(R[0, 0]^2 + R[1, 0]^2)).
    """
    cos_part = jnp.sqrt(rotation[..., 0, 0] ** 2 + rotation[..., 1, 0] ** 2)
    return jnp.arctan2(-rotation[..., 2, 0], cos_part)
