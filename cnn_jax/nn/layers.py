"""Layers as pure functions on NHWC arrays (weights HWIO), written by hand.

Convolution goes through `lax.conv_general_dilated` and pooling through
`lax.reduce_window`; softmax and cross-entropy are written out so that their
numerics are visible. `conv2d_patches` is an equivalent lowering of `conv2d`
(patches + one matmul) that XLA:CPU runs faster; tests hold it equal to the
reference in value and gradient.

Mixed precision (`--compute_dtype=bfloat16`): every convolution and matmul takes a
`compute_dtype`; with bfloat16 its inputs are rounded to bfloat16 and its products accumulate
and come out in float32 (`matmul`, `conv2d`), in the backward pass too, so params, their
gradients and everything between the products stay float32. float32 runs the plain products,
unchanged.
"""

from __future__ import annotations

import functools

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

PADDINGS = ("VALID", "SAME")
FLOAT32 = "float32"


def low_precision(compute_dtype: str) -> jnp.dtype | None:
    """The dtype products take their inputs in for `--compute_dtype` (None: float32, the plain path)."""
    return None if compute_dtype == FLOAT32 else jnp.dtype(compute_dtype)


def compute_cast(x: jax.Array, compute_dtype: str) -> jax.Array:
    """`x` rounded to the compute dtype (unchanged for float32): a product's input."""
    dtype = low_precision(compute_dtype)
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def dtype_marker(x: jax.Array) -> jax.Array:
    """An empty array of x's dtype: a custom VJP's residual that says which dtype x's gradient takes."""
    return jnp.zeros((0,), x.dtype)


def dot(a: jax.Array, b: jax.Array, dimension_numbers, compute_dtype: str) -> jax.Array:
    """`lax.dot_general` with inputs in the compute dtype and float32 accumulation and result
    (not differentiated through: for the custom VJPs that write their backward pass out)."""
    if low_precision(compute_dtype) is None:
        return lax.dot_general(a, b, dimension_numbers)
    return lax.dot_general(compute_cast(a, compute_dtype), compute_cast(b, compute_dtype), dimension_numbers,
                           preferred_element_type=jnp.float32)


def mm(a: jax.Array, b: jax.Array, compute_dtype: str) -> jax.Array:
    """a (M, K) @ b (K, N) by `dot` (no custom gradient); float32: plain `a @ b`."""
    if low_precision(compute_dtype) is None:
        return a @ b
    return dot(a, b, (((1,), (0,)), ((), ())), compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(a: jax.Array, b: jax.Array, compute_dtype: str) -> jax.Array:
    return mm(a, b, compute_dtype)


def _mixed_matmul_fwd(a, b, compute_dtype):
    a16, b16 = compute_cast(a, compute_dtype), compute_cast(b, compute_dtype)
    return mm(a16, b16, compute_dtype), (a16, b16, dtype_marker(a), dtype_marker(b))


def _mixed_matmul_bwd(compute_dtype, residuals, g):
    # Both gradients are low-precision products with float32 accumulation, like the forward pass;
    # b's (the weights') comes back in float32, never rounded.
    a16, b16, a_dtype, b_dtype = residuals
    g16 = compute_cast(g, compute_dtype)
    da = dot(g16, b16, (((1,), (1,)), ((), ())), compute_dtype).astype(a_dtype.dtype)
    db = dot(a16, g16, (((0,), (0,)), ((), ())), compute_dtype).astype(b_dtype.dtype)
    return da, db


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, compute_dtype: str = FLOAT32) -> jax.Array:
    """a (..., K) @ b (K, N) -> float32 (..., N); with a low-precision compute dtype its inputs
    and both gradient products take that dtype, accumulating in float32."""
    if low_precision(compute_dtype) is None:
        return a @ b
    return _mixed_matmul(a.reshape(-1, a.shape[-1]), b, compute_dtype).reshape(*a.shape[:-1], b.shape[-1])


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: str = "VALID") -> int:
    """Spatial output size of a convolution or pooling window along one axis."""
    if padding == "SAME":
        return -(-size // stride)
    return (size - kernel) // stride + 1 if size >= kernel else 0


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) padding that XLA uses for 'SAME' along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """Zero-pad spatial axes 1 and 2 (NHWC or CHWN) as XLA's 'SAME' does for a kh x kw kernel."""
    pads = [(0, 0)] * x.ndim
    pads[1] = same_padding(x.shape[1], kh, stride)
    pads[2] = same_padding(x.shape[2], kw, stride)
    return jnp.pad(x, pads)


def unpad_same(x: jax.Array, hw: tuple[int, int], kh: int, kw: int, stride: int) -> jax.Array:
    """The transpose of `pad_same` for an input of spatial size `hw`: crop axes 1 and 2 back."""
    top = same_padding(hw[0], kh, stride)[0]
    left = same_padding(hw[1], kw, stride)[0]
    return x[:, top:top + hw[0], left:left + hw[1]]


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int = 1,
           padding: str = "VALID", compute_dtype: str = FLOAT32) -> jax.Array:
    """2-D convolution: x (N, H, W, C), w (kh, kw, C, O), b (O,) -> (N, H', W', O)."""
    if low_precision(compute_dtype) is None:
        y = lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        y = _mixed_conv(x, w, stride, padding, compute_dtype)
    return y + b


def _low_conv(x: jax.Array, w: jax.Array, stride: int, padding: str, out_dtype) -> jax.Array:
    return lax.conv_general_dilated(x, w, window_strides=(stride, stride), padding=padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_conv(x: jax.Array, w: jax.Array, stride: int, padding: str, compute_dtype: str) -> jax.Array:
    """The lax convolution with inputs in the compute dtype, accumulating into a float32 result."""
    return _low_conv(compute_cast(x, compute_dtype), compute_cast(w, compute_dtype), stride, padding, jnp.float32)


def _mixed_conv_fwd(x, w, stride, padding, compute_dtype):
    x16, w16 = compute_cast(x, compute_dtype), compute_cast(w, compute_dtype)
    return _low_conv(x16, w16, stride, padding, jnp.float32), (x16, w16, dtype_marker(x), dtype_marker(w))


def _mixed_conv_bwd(stride, padding, compute_dtype, residuals, g):
    # The transposed convolutions of the low-precision conv itself (cuDNN's bfloat16 kernels on a GPU,
    # accumulating in float32), not of its float32-result form, which JAX would run in float32.
    x16, w16, x_dtype, w_dtype = residuals
    _, vjp = jax.vjp(lambda a, b: _low_conv(a, b, stride, padding, None), x16, w16)
    dx, dw = vjp(compute_cast(g, compute_dtype))
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_mixed_conv.defvjp(_mixed_conv_fwd, _mixed_conv_bwd)


def conv2d_patches(x: jax.Array, w: jax.Array, b: jax.Array, stride: int = 1,
                   padding: str = "VALID", compute_dtype: str = FLOAT32) -> jax.Array:
    """`conv2d` lowered as im2col patches and a single matmul (same result); the patches are built
    in the compute dtype (half the bytes for bfloat16)."""
    x = compute_cast(x, compute_dtype)
    kh, kw, c, o = w.shape
    n, h, wd, _ = x.shape
    if padding == "SAME":
        x = pad_same(x, kh, kw, stride)
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(wd, kw, stride, padding)
    # Patch feature order (i, j, c) matches w.reshape(kh * kw * c, o).
    patches = jnp.concatenate(
        [x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    y = matmul(patches.reshape(n * oh * ow, kh * kw * c), w.reshape(kh * kw * c, o), compute_dtype)
    return y.reshape(n, oh, ow, o) + b


def max_pool(x: jax.Array, window: int = 2, stride: int = 2, padding: str = "VALID") -> jax.Array:
    """Max pooling over window x window patches, NHWC."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), padding)


def avg_pool(x: jax.Array, window: int = 2, stride: int = 2, padding: str = "VALID") -> jax.Array:
    """Average pooling; with 'SAME' padding it averages only the real (unpadded) inputs."""
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, padding)
    if padding == "VALID":
        return total / (window * window)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    return total / lax.reduce_window(ones, 0.0, lax.add, dims, strides, padding)


POOLS = {"max": max_pool, "avg": avg_pool}


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) with derivative 0 at 0 (as the usual convention)."""
    return jnp.where(x > 0, x, jnp.zeros_like(x))


def flatten(x: jax.Array) -> jax.Array:
    """(N, ...) -> (N, prod(...))."""
    return x.reshape(x.shape[0], -1)


def dense(x: jax.Array, w: jax.Array, b: jax.Array, compute_dtype: str = FLOAT32) -> jax.Array:
    """x (N, I) @ w (I, O) + b (O,), the product in the compute dtype (float32 result)."""
    return matmul(x, w, compute_dtype) + b


def log_softmax(logits: jax.Array) -> jax.Array:
    """log(softmax(logits)) along the last axis, stable for large logits."""
    shifted = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def softmax(logits: jax.Array) -> jax.Array:
    """Softmax along the last axis, stable for large logits."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(shifted)
    return exp / jnp.sum(exp, axis=-1, keepdims=True)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy -log softmax(logits)[label]; labels are int class ids.

    With label `smoothing` e the target puts 1 - e on the label and e spread evenly over all K
    classes: (1 - e) * (-log p[label]) + e * mean_k(-log p[k]) (Szegedy et al. 2016, "Rethinking
    the Inception Architecture"; timm's LabelSmoothingCrossEntropy). 0: the plain cross-entropy."""
    log_probs = log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if not smoothing:
        return nll
    return (1.0 - smoothing) * nll + smoothing * -jnp.mean(log_probs, axis=-1)


BN_EPSILON = 1e-5


def channel_sum(x: jax.Array) -> jax.Array:
    """The sum over every axis but the last, as one matrix product with a row of ones: XLA:CPU
    runs a long reduction as a slow tree of reduce-windows."""
    flat = x.reshape(-1, x.shape[-1])
    return jnp.dot(jnp.ones((1, flat.shape[0]), x.dtype), flat, precision=lax.Precision.HIGHEST)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_with_batch_stats(x: jax.Array, scale: jax.Array, bias: jax.Array,
                                epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scale * (x - mean) / sqrt(var + epsilon) + bias, mean, var) with the batch's per-channel
    mean and biased variance; its gradient is written out so that every reduction is a product."""
    return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
    count = x.size // x.shape[-1]
    mean = channel_sum(x) / count
    centered = x - mean
    var = channel_sum(jnp.square(centered)) / count
    inv = lax.rsqrt(var + epsilon)
    return (centered * (scale * inv) + bias, mean, var), (centered, scale, inv)


def _normalize_bwd(epsilon, residuals, cotangents):
    centered, scale, inv = residuals
    dy, dmean, dvar = cotangents
    count = centered.size // centered.shape[-1]
    dbias = channel_sum(dy)
    dscale = channel_sum(dy * centered) * inv
    # d/dx of y through x, the mean and the variance; then the mean's and variance's own cotangents.
    dx = (scale * inv / count) * (count * dy - dbias - centered * (inv * dscale))
    dx = dx + dmean / count + centered * (2.0 * dvar / count)
    return dx, dscale, dbias


_normalize_with_batch_stats.defvjp(_normalize_fwd, _normalize_bwd)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, *,
               train: bool, momentum: float = 0.9,
               epsilon: float = BN_EPSILON) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation of NHWC `x` per channel: (y, new running mean, new running variance).

    Training normalises with the batch's statistics over N, H, W (the biased variance) and moves
    the running averages toward them: new = momentum * running + (1 - momentum) * batch (no
    gradient flows into them). Evaluation normalises with the running averages and returns them
    unchanged. Under jit with a batch sharded over devices, the means are over the global batch."""
    if train:
        y, batch_mean, batch_var = _normalize_with_batch_stats(x, scale, bias, epsilon)
        new_mean = momentum * mean + (1.0 - momentum) * lax.stop_gradient(batch_mean)
        new_var = momentum * var + (1.0 - momentum) * lax.stop_gradient(batch_var)
        return y, new_mean, new_var
    y = (x - mean) * (scale * lax.rsqrt(var + epsilon)) + bias
    return y, mean, var


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, *, train: bool) -> jax.Array:
    """Inverted dropout: in training each value is zeroed with probability `rate` and the rest are
    scaled by 1 / (1 - rate), so evaluation (and rate 0) is the identity. The same key gives the
    same mask."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None, *, train: bool) -> jax.Array:
    """Stochastic depth of a residual branch x (N, ...): in training each example's whole branch is
    zeroed with probability `rate` and kept ones are scaled by 1 / (1 - rate), so its expectation is
    the evaluation's x (Huang et al. 2016, "Deep Networks with Stochastic Depth"; timm's drop_path
    with scale_by_keep). Evaluation and rate 0 are the identity."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def project(x: jax.Array, w: jax.Array, stride: int = 1, compute_dtype: str = FLOAT32) -> jax.Array:
    """A 1x1 convolution without bias, x (N, H, W, C) @ w (C, O) at `stride`: a residual shortcut's
    projection (the same as `conv2d` with a 1x1 kernel and VALID padding)."""
    return matmul(x[:, ::stride, ::stride, :], w, compute_dtype)


def residual_add(branch: jax.Array, shortcut: jax.Array, projection: jax.Array | None = None,
                 stride: int = 1, compute_dtype: str = FLOAT32) -> jax.Array:
    """branch + shortcut; where the shapes differ, the shortcut goes through `project` with the
    (C, O) `projection` weights at `stride` first."""
    if projection is not None:
        shortcut = project(shortcut, projection, stride, compute_dtype)
    if shortcut.shape != branch.shape:
        raise ValueError(f"residual shapes differ: branch {branch.shape}, shortcut {shortcut.shape}; "
                         "give a projection (and stride) for the shortcut")
    return branch + shortcut


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C): the mean over the spatial axes."""
    return jnp.mean(x, axis=(1, 2))


def shape_tracer(debug: bool) -> Callable[[str, jax.Array], None]:
    """trace(name, x): with `debug`, print the layer's per-example output shape (`--debug`'s
    trace, one `name  HxWxC` line per layer, as `model.format_layer_shapes` writes it); else nothing."""

    def trace(name: str, x: jax.Array) -> None:
        if debug:
            print(f"{name:8s} {'x'.join(map(str, x.shape[1:]))}")

    return trace
