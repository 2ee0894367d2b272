"""The tutorial CNN's fused conv -> relu -> pool blocks, each held equal to the reference
(tests/test_cnn_blocks.py).

- layout "CHWN": activations channel-major and batch-minor (C, H, W, N). The conv matmuls
  then have the long space x batch axis last, and every patch slice, pooling reduction and
  gradient scatter moves contiguous runs of N values. With patches and reshape pooling the
  whole block is one custom VJP (`pooled_conv_chwn`): window-major patches with a row of
  ones (the bias rides in the matmul, and its gradient comes out of the weight-gradient
  product), pooling as a reduction over a leading axis.
- with reshape pooling only the conv outputs that the (VALID) pool reads are computed (the
  tutorial's 9x9 conv2 output loses its last row and column, ~21% of its FLOPs), and for max
  pooling relu runs after the pool (relu and max commute exactly).
- conv "winograd": the same fused block by Winograd's minimal filtering F(4x4, 5x5) or
  F(2x2, 3x3) (`pooled_conv_winograd`) for the layers it applies to (`winograd_applies`:
  stride 1, whole tiles, enough input channels), patches for the rest. F(4x4, 5x5) does
  6.25x fewer multiplications than the direct 5x5 conv; the tutorial's conv2 is its case.

`conv_block` picks among them for a resolved `nn.lowering.Strategy`. With a low-precision
`compute_dtype` (bfloat16) every block's products take their inputs in it and accumulate in
float32, forward and backward: the patches are built in bfloat16, the Winograd transforms stay
float32 (their constants are not exact in bfloat16) and only the transformed tiles and filters
are rounded for the (2m)^2 products; pooling, relu and every gradient stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_jax.config import Config
from cnn_jax.nn import layers
from cnn_jax.nn.layers import conv_output_size
from cnn_jax.nn.lowering import Strategy, avg_pool_reshape, max_pool_reshape, nhwc_conv


# --- Channel-major (C, H, W, N) convolution, fused with relu and pooling ---------------------

def conv2d_patches_chwn(x: jax.Array, w: jax.Array, stride: int = 1,
                        padding: str = "VALID", compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """Convolution without bias on channel-major arrays: x (C, H, W, N), w (kh, kw, C, O)
    -> (O, H', W', N), as patches (C*kh*kw, H'*W'*N) and one matmul."""
    x = layers.compute_cast(x, compute_dtype)
    kh, kw, c, o = w.shape
    h, wd = x.shape[1:3]
    if padding == "SAME":
        x = layers.pad_same(x, kh, kw, stride)
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(wd, kw, stride, padding)
    n = x.shape[3]
    patches = jnp.stack([x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                         for i in range(kh) for j in range(kw)], axis=1)   # (C, kh*kw, oh, ow, N)
    y = layers.matmul(_weight_matrix(w).T, patches.reshape(c * kh * kw, oh * ow * n), compute_dtype)
    return y.reshape(o, oh, ow, n)


def _weight_matrix(w: jax.Array) -> jax.Array:
    """(kh, kw, C, O) -> (C*kh*kw, O), rows in the patches' (c, i, j) order."""
    kh, kw, c, o = w.shape
    return w.transpose(2, 0, 1, 3).reshape(c * kh * kw, o)


def _window_major_patches(x: jax.Array, kh: int, kw: int, stride: int, k: int, ph: int,
                          pw: int) -> jax.Array:
    """Patches of x (C, H, W, N) for the conv outputs a k x k VALID pool reads, and a last row
    of ones: (C*kh*kw + 1, k*k*ph*pw*N), row (c, i, j), column (a, b, py, px, n) = conv output
    (k*py + a, k*px + b) of image n. One concatenation of strided slices whose runs of N
    are contiguous; pooling then reduces over a leading axis and its gradient is a stack
    of k*k blocks. The ones row carries the bias: the forward product adds it and the
    weight-gradient product returns its gradient as a last row (no separate reduction)."""
    c, n = x.shape[0], x.shape[3]
    step = stride * k
    slices = [x[:, stride * a + i::step, stride * b + j::step][:, :ph, :pw]
              for i in range(kh) for j in range(kw) for a in range(k) for b in range(k)]
    if c == 1:   # the ones row as k*k more slices of the same stack: one copy, not two
        slices += [jnp.ones_like(slices[0])] * (k * k)
        return jnp.stack(slices, axis=1).reshape(kh * kw + 1, k * k * ph * pw * n)
    patches = jnp.stack(slices, axis=1).reshape(c * kh * kw, k * k * ph * pw * n)
    return jnp.concatenate([patches, jnp.ones((1, patches.shape[1]), patches.dtype)])


def _col2im(dp: jax.Array, x_shape: tuple[int, ...], kh: int, kw: int, stride: int, oh: int,
            ow: int) -> jax.Array:
    """Transpose of row-major patches: scatter-add dp (C*kh*kw, oh*ow*N) onto (C, H, W, N).

    Sums each kernel row's kw shifted slices first, then the kh rows, as reductions: XLA:CPU
    computes each once, instead of fusing (and recomputing) a kh*kw-term sum into every
    consumer."""
    c, h, w, n = x_shape
    dp = dp.reshape(c, kh, kw, oh, ow, n)
    zero = jnp.zeros((), dp.dtype)
    rows = []
    for i in range(kh):
        shifted = [lax.pad(dp[:, i, j], zero, [(0, 0, 0), (0, 0, 0),
                                               (j, w - j - stride * (ow - 1) - 1, stride - 1), (0, 0, 0)])
                   for j in range(kw)]
        row = jnp.sum(jnp.stack(shifted), axis=0)                     # (C, oh, W, N)
        rows.append(lax.pad(row, zero, [(0, 0, 0), (i, h - i - stride * (oh - 1) - 1, stride - 1),
                                        (0, 0, 0), (0, 0, 0)]))
    return jnp.sum(jnp.stack(rows), axis=0)


def _pooled_conv_forward(x, w, b, stride, padding, pool, k, keep_residuals, compute_dtype):
    kh, kw, c, o = w.shape
    input_hw = x.shape[1:3]
    x = layers.compute_cast(x, compute_dtype)     # the patches in the compute dtype
    if padding == "SAME":
        x = layers.pad_same(x, kh, kw, stride)
    h, wd, n = x.shape[1:]
    # Only the conv outputs the VALID pool reads: the first (out // k) * k rows and columns.
    ph = conv_output_size(h, kh, stride) // k
    pw = conv_output_size(wd, kw, stride) // k
    patches = _window_major_patches(x, kh, kw, stride, k, ph, pw)
    weights = jnp.concatenate([_weight_matrix(w), b[None]])      # the bias row meets the ones row
    y = layers.mm(layers.compute_cast(weights, compute_dtype).T, patches, compute_dtype).reshape(o, k * k, ph, pw, n)
    if pool == "max":
        z = jnp.max(y, axis=1)
        out = layers.relu(z)      # relu(max(.)) == max(relu(.)), with the same gradient
        if not keep_residuals:
            return out, None
        # Window position (row-major) of the first maximum: where the gradient goes, as
        # select_and_scatter does. A min reduction, so XLA computes it once, here.
        position = jnp.arange(k * k).reshape(1, k * k, 1, 1, 1)
        first = jnp.min(jnp.where(y == z[:, None], position, k * k), axis=1)
        return out, (patches, w, first, out, x.shape, input_hw)
    out = jnp.mean(layers.relu(y), axis=1)
    return out, ((patches, w, y > 0, x.shape, input_hw) if keep_residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def pooled_conv_chwn(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: str, pool: str,
                     window: int, compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """pool(relu(conv(x, w) + b)) for channel-major x (C, H, W, N), pool window == stride.

    One custom VJP for the whole block: the forward computes only the conv outputs the pool
    reads, as window-major patches and one matmul; the backward routes max pooling's
    gradient to the first maximum of each window (as `select_and_scatter`), takes the bias
    gradient at pooled resolution, and scatters the patches' gradient back (`_col2im`)."""
    return _pooled_conv_forward(x, w, b, stride, padding, pool, window, False, compute_dtype)[0]


def _pooled_conv_fwd(x, w, b, stride, padding, pool, window, compute_dtype):
    return _pooled_conv_forward(x, w, b, stride, padding, pool, window, True, compute_dtype)


def _pooled_conv_bwd(stride, padding, pool, k, compute_dtype, residuals, g):
    if pool == "max":
        patches, w, first, out, x_shape, input_hw = residuals
        gz = jnp.where(out > 0, g, jnp.zeros_like(g))
        zero = jnp.zeros((), g.dtype)
        dy = jnp.stack([jnp.where(first == q, gz, zero) for q in range(k * k)], axis=1)
    else:
        patches, w, positive, x_shape, input_hw = residuals
        gz = g / (k * k)
        zero = jnp.zeros((), g.dtype)
        # Built like max pooling's: k*k pooled-size selections of one materialised gz (a
        # broadcast select would make XLA recompute the incoming gradient k*k times).
        dy = jnp.stack([jnp.where(positive[:, q], gz, zero) for q in range(k * k)], axis=1)
    kh, kw, c, o = w.shape
    _, _, ph, pw, n = dy.shape
    dy = layers.compute_cast(dy.reshape(o, k * k * ph * pw * n), compute_dtype)
    dw = layers.dot(patches, dy, (((1,), (1,)), ((), ())), compute_dtype)   # last row: the bias gradient
    db = dw[-1]
    dw = dw[:-1].reshape(c, kh, kw, o).transpose(1, 2, 0, 3)
    # The input gradient in row-major column order (a transpose of the small dy, not of
    # the patches' gradient), scattered back by `_col2im`.
    dy_rows = dy.reshape(o, k, k, ph, pw, n).transpose(0, 3, 1, 4, 2, 5).reshape(o, -1)
    dx = _col2im(layers.mm(_weight_matrix(w), dy_rows, compute_dtype), x_shape, kh, kw, stride, ph * k, pw * k)
    if padding == "SAME":
        dx = layers.unpad_same(dx, input_hw, kh, kw, stride)
    return dx, dw, db


pooled_conv_chwn.defvjp(_pooled_conv_fwd, _pooled_conv_bwd)


# --- Winograd F(m x m, r x r) convolution, fused with relu and pooling ----------------------

def _winograd_points(count: int) -> list[float]:
    """Interpolation points: 0, 1, -1, 2, -2, 1/2, -1/2, ... (small, exact in binary)."""
    points = [0.0]
    for p in (1.0, 2.0, 0.5, 3.0, 1 / 3):
        points += [p, -p]
    return points[:count]


@functools.lru_cache(maxsize=None)
def winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toom-Cook matrices (A^T (m, a), G (a, r), B^T (a, a)), a = m + r - 1, with which the
    1-D valid correlation of an a-vector d with an r-vector g is A^T [(G g) * (B^T d)].

    A^T and G come from the points (plus the point at infinity); B^T is solved from the
    identity itself, in float64, and checked."""
    alpha = m + r - 1
    p = np.array(_winograd_points(alpha - 1))
    at = np.zeros((m, alpha))
    at[:, :-1] = p[None, :] ** np.arange(m)[:, None]
    at[-1, -1] = 1.0
    scale = np.array([np.prod([pj - pl for pl in np.delete(p, j)]) for j, pj in enumerate(p)])
    g = np.zeros((alpha, r))
    g[:-1] = p[:, None] ** np.arange(r)[None, :] / scale[:, None]
    g[-1, -1] = 1.0
    # sum_j AT[i, j] G[j, k] BT[j, l] = [l == i + k] for every i < m, k < r, l < alpha.
    coefficients = np.stack([at[i] * g[:, k] for i in range(m) for k in range(r)])
    targets = np.array([[float(l == i + k) for l in range(alpha)] for i in range(m) for k in range(r)])
    bt = np.linalg.lstsq(coefficients, targets, rcond=None)[0]
    rounded = np.round(bt * 4096) / 4096            # the entries are dyadic: make them exact
    bt = np.where(np.abs(bt - rounded) < 1e-9, rounded, bt)
    if not np.allclose(coefficients @ bt, targets, atol=1e-12):
        raise ValueError(f"no Winograd F({m}, {r}) transform with these points")
    return at, g, bt


WINOGRAD_MIN_CHANNELS = 8


def winograd_applies(kernel: int, stride: int, in_channels: int, conv_out: tuple[int, int],
                     window: int) -> bool:
    """Whether a conv layer runs as Winograd under `conv_impl=winograd` (else patches + matmul):
    stride 1, kernel 3 or 5 (F(2x2, 3x3) or F(4x4, 5x5): output tiles of kernel - 1), the
    pooled part of the conv output (`conv_out` rows and columns) made of whole tiles of whole
    pool windows, and at least `WINOGRAD_MIN_CHANNELS` input channels: the (2m)^2 products
    contract over the input channels, and with few of them they are too thin to repay the
    transforms (the tutorial's conv1, one channel, runs slower as Winograd; its conv2, 20 channels,
    faster; measured 2026-11-25, CHANGELOG.md)."""
    m = kernel - 1
    used = [size // window * window for size in conv_out]
    return (stride == 1 and kernel in (3, 5) and in_channels >= WINOGRAD_MIN_CHANNELS
            and m % window == 0 and all(u > 0 and u % m == 0 for u in used))


def _winograd_constants(r: int, k: int):
    """float32 kron(B^T, B^T) (a*a, a*a) with its columns in the tiles' (h, v, i, j) order
    (input row h*m + i, column v*m + j), kron(G, G) (a*a, r*r), and kron(A^T, A^T) with its
    rows ordered (a, b, P, Q) for output (P*k + a, Q*k + b): pool-window position first."""
    m = r - 1
    at, g, bt = winograd_matrices(m, r)
    kb = np.kron(bt, bt).reshape(-1, 2, m, 2, m).transpose(0, 1, 3, 2, 4).reshape(4 * m * m, -1)
    ka = np.kron(at, at).reshape(m // k, k, m // k, k, -1).transpose(1, 3, 0, 2, 4).reshape(m * m, -1)
    return (jnp.asarray(kb, jnp.float32), jnp.asarray(np.kron(g, g), jnp.float32),
            jnp.asarray(ka, jnp.float32))


def _winograd_tiles(x: jax.Array, m: int, th: int, tw: int) -> jax.Array:
    """Input tiles of x (C, H, W, N), channel last: (a*a, th*tw*N*C), row (h, v, i, j),
    column (t, u, n, c) = x[c, m*(t + h) + i, m*(u + v) + j, n]; a = 2m, so a tile is two
    m-blocks on each axis. Four transposed slices, one per (h, v), stacked on the leading
    axis. Channel last makes the transformed tiles (a*a, P, C): the layout in which the
    weight-gradient products run fastest on XLA:CPU (docs/lowering.md, "The Winograd block")."""
    c, n = x.shape[0], x.shape[3]
    blocks = x[:, :m * (th + 1), :m * (tw + 1)].reshape(c, th + 1, m, tw + 1, m, n)
    parts = [blocks[:, h:h + th, :, v:v + tw].transpose(2, 4, 1, 3, 5, 0) for h in (0, 1) for v in (0, 1)]
    return jnp.concatenate(parts).reshape(4 * m * m, th * tw * n * c)


def _winograd_untile(dd: jax.Array, x_shape: tuple[int, ...], m: int, th: int, tw: int) -> jax.Array:
    """Overlap-add tile gradients (a*a, C*th*tw*N), channel first, onto x (C, H, W, N): the
    transpose of `_winograd_tiles` (whose tiles are channel last)."""
    c, h, w, n = x_shape
    dd = dd.reshape(2, 2, m, m, c, th, tw, n).transpose(0, 1, 4, 5, 2, 6, 3, 7)  # h v C t i u j N
    zero = jnp.zeros((), dd.dtype)
    parts = [lax.pad(dd[hh, vv], zero, [(0, 0, 0), (hh, 1 - hh, 0), (0, 0, 0), (vv, 1 - vv, 0),
                                        (0, 0, 0), (0, 0, 0)])
             for hh in (0, 1) for vv in (0, 1)]
    blocks = (parts[0] + parts[1] + parts[2] + parts[3]).reshape(c, m * (th + 1), m * (tw + 1), n)
    return lax.pad(blocks, zero, [(0, 0, 0), (0, h - m * (th + 1), 0), (0, w - m * (tw + 1), 0),
                                  (0, 0, 0)])


def _winograd_forward(x, w, b, padding, pool, k, keep_residuals, compute_dtype):
    r, _, c, o = w.shape
    m = r - 1
    input_hw = x.shape[1:3]
    if padding == "SAME":
        x = layers.pad_same(x, r, r, 1)
    h, wd, n = x.shape[1:]
    th = conv_output_size(h, r) // k * k // m
    tw = conv_output_size(wd, r) // k * k // m
    kb, kg, ka = _winograd_constants(r, k)
    v = (kb @ _winograd_tiles(x, m, th, tw)).reshape(4 * m * m, th * tw * n, c)   # (a*a, P, C)
    u = (kg @ w.reshape(r * r, c * o)).reshape(4 * m * m, c, o)
    # The (2m)^2 products in the compute dtype: the transforms above stay float32.
    v, u = layers.compute_cast(v, compute_dtype), layers.compute_cast(u, compute_dtype)
    prod = layers.dot(u, v, (((1,), (2,)), ((0,), (0,))), compute_dtype)            # (a*a, O, P)
    y = (ka @ prod.reshape(4 * m * m, -1)).reshape(k * k, m // k, m // k, o, th, tw, n)
    y = y + b[:, None, None, None]
    if pool == "max":
        z = jnp.max(y, axis=0)
        out = layers.relu(z)
        first = None
        if keep_residuals:
            position = jnp.arange(k * k).reshape(k * k, 1, 1, 1, 1, 1, 1)
            first = jnp.min(jnp.where(y == z[None], position, k * k), axis=0)
        residuals = (v, u, first, out)
    else:
        out = jnp.mean(layers.relu(y), axis=0)
        residuals = (v, u, y > 0, None)
    # (P, Q, O, t, u, N) -> (O, t, P, u, Q, N): pooled row t*(m/k) + P
    pooled = out.transpose(2, 3, 0, 4, 1, 5).reshape(o, th * m // k, tw * m // k, n)
    return pooled, ((residuals, w, x.shape, input_hw) if keep_residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pooled_conv_winograd(x: jax.Array, w: jax.Array, b: jax.Array, padding: str, pool: str,
                         window: int, compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """pool(relu(conv(x, w) + b)) for channel-major x (C, H, W, N), stride 1, kernel 3 or 5,
    pool window == stride (see `winograd_applies`), by Winograd's minimal filtering
    F(m x m, r x r), m = r - 1: input tiles of (2m)^2 are transformed, multiplied with the
    transformed filters as (2m)^2 small matmuls, and transformed back into m x m outputs —
    F(4x4, 5x5) does 6.25x fewer multiplications than the direct conv. The backward pass is
    the transposed transforms; max pooling's gradient goes to the first maximum."""
    return _winograd_forward(x, w, b, padding, pool, window, False, compute_dtype)[0]


def _winograd_fwd(x, w, b, padding, pool, window, compute_dtype):
    return _winograd_forward(x, w, b, padding, pool, window, True, compute_dtype)


def _winograd_bwd(padding, pool, k, compute_dtype, residuals, g):
    (v, u, mask, out), w, x_shape, input_hw = residuals
    r, _, c, o = w.shape
    m = r - 1
    n = x_shape[3]
    th, tw = g.shape[1] // (m // k), g.shape[2] // (m // k)
    g = g.reshape(o, th, m // k, tw, m // k, n).transpose(2, 4, 0, 1, 3, 5)   # (P, Q, O, t, u, N)
    zero = jnp.zeros((), g.dtype)
    if pool == "max":
        gz = jnp.where(out > 0, g, zero)
        dy = jnp.stack([jnp.where(mask == q, gz, zero) for q in range(k * k)])
    else:
        gz = g / (k * k)
        dy = jnp.stack([jnp.where(mask[q], gz, zero) for q in range(k * k)])
    kb, kg, ka = _winograd_constants(r, k)
    dy = dy.reshape(k * k * (m // k) ** 2, -1)                                       # (m*m, O*P)
    # The bias gradient through a product (XLA:CPU runs this reduction faster as a dot).
    db = (jnp.ones((1, dy.shape[0]), dy.dtype) @ dy).reshape(o, -1).sum(axis=1)
    dprod = (ka.T @ dy).reshape(4 * m * m, o, -1)                                   # (a*a, O, P)
    dprod = layers.compute_cast(dprod, compute_dtype)
    du = layers.dot(dprod, v, (((2,), (1,)), ((0,), (0,))), compute_dtype)           # (a*a, O, C)
    dw = (kg.T @ du.reshape(4 * m * m, c * o)).reshape(r, r, o, c).transpose(0, 1, 3, 2)
    dv = layers.dot(u, dprod, (((2,), (1,)), ((0,), (0,))), compute_dtype)           # (a*a, C, P)
    dx = _winograd_untile(kb.T @ dv.reshape(4 * m * m, -1), x_shape, m, th, tw)
    if padding == "SAME":
        dx = layers.unpad_same(dx, input_hw, r, r, 1)
    return dx, dw, db


pooled_conv_winograd.defvjp(_winograd_fwd, _winograd_bwd)


# --- The dense layer after a channel-major block ----------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_from_chwn(x: jax.Array, w: jax.Array, b: jax.Array, compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """`layers.dense(layers.flatten(x_nhwc), w, b)` for channel-major x (C, H, W, N): the
    forward flattens in NHWC order (w's rows stay (h, w, c)). The backward forms the input
    gradient batch-minor, as w @ g^T (I, N), which XLA:CPU multiplies faster than
    g @ w^T, and moves it back to (C, H, W, N) with N staying the contiguous axis."""
    return _dense_from_chwn_fwd(x, w, b, compute_dtype)[0]


def _dense_from_chwn_fwd(x, w, b, compute_dtype):
    flat = jnp.transpose(layers.compute_cast(x, compute_dtype), (3, 1, 2, 0)).reshape(x.shape[3], -1)  # (N, H*W*C)
    return layers.mm(flat, w, compute_dtype) + b, (flat, w, x.shape)


def _dense_from_chwn_bwd(compute_dtype, residuals, g):
    flat, w, (c, h, wd, n) = residuals
    db = jnp.sum(g, axis=0)
    g = layers.compute_cast(g, compute_dtype)
    dw = layers.dot(flat, g, (((0,), (0,)), ((), ())), compute_dtype)
    dx = layers.dot(w, g, (((1,), (1,)), ((), ())), compute_dtype)     # (H*W*C, N)
    return dx.reshape(h, wd, c, n).transpose(2, 0, 1, 3), dw, db


dense_from_chwn.defvjp(_dense_from_chwn_fwd, _dense_from_chwn_bwd)


def _crop_to_pooled(x: jax.Array, kernel: int, config: Config) -> jax.Array:
    """Drop input rows/columns whose conv outputs the VALID pool never reads."""
    if config.conv_padding != "VALID":
        return x
    for axis in (1, 2):
        out = conv_output_size(x.shape[axis], kernel, config.conv_stride)
        pooled = conv_output_size(out, config.pool_window, config.pool_stride)
        used = (pooled - 1) * config.pool_stride + config.pool_window
        x = lax.slice_in_dim(x, 0, (used - 1) * config.conv_stride + kernel, axis=axis)
    return x


def conv_block(x: jax.Array, w: jax.Array, b: jax.Array, config: Config,
               strategy: Strategy) -> jax.Array:
    """pool(relu(conv(x, w) + b)) in `strategy.layout` (x NHWC or CHWN to match).

    Spatial axes are 1 and 2 in both layouts."""
    chwn = strategy.layout == "CHWN"
    reshape_pool = strategy.pool_impl == "reshape"
    if chwn and reshape_pool and strategy.conv_impl == "winograd":
        kernel = w.shape[0]
        conv_out = tuple(conv_output_size(size, kernel, config.conv_stride, config.conv_padding)
                         for size in x.shape[1:3])
        if w.shape[0] == w.shape[1] and winograd_applies(kernel, config.conv_stride, w.shape[2], conv_out,
                                                         config.pool_window):
            return pooled_conv_winograd(x, w, b, config.conv_padding, config.pool, config.pool_window,
                                        config.compute_dtype)
    if chwn and reshape_pool and strategy.conv_impl in ("patches", "winograd"):
        return pooled_conv_chwn(x, w, b, config.conv_stride, config.conv_padding, config.pool,
                                config.pool_window, config.compute_dtype)
    if reshape_pool:
        x = _crop_to_pooled(x, w.shape[0], config)
    if chwn and strategy.conv_impl == "patches":
        y = conv2d_patches_chwn(x, w, config.conv_stride, config.conv_padding,
                                config.compute_dtype) + b[:, None, None, None]
    elif chwn and config.compute_dtype == layers.FLOAT32:
        y = lax.conv_general_dilated(x, w, (config.conv_stride,) * 2, config.conv_padding,
                                     dimension_numbers=("CHWN", "HWIO", "CHWN")) + b[:, None, None, None]
    elif chwn:   # the reference in low precision: its backward pass is JAX's, in float32
        y = lax.conv_general_dilated(layers.compute_cast(x, config.compute_dtype),
                                     layers.compute_cast(w, config.compute_dtype), (config.conv_stride,) * 2,
                                     config.conv_padding, dimension_numbers=("CHWN", "HWIO", "CHWN"),
                                     preferred_element_type=jnp.float32) + b[:, None, None, None]
    else:
        y = nhwc_conv(strategy.conv_impl, config.compute_dtype)(x, w, b, config.conv_stride, config.conv_padding)
    if not reshape_pool:
        # The reference pooling: its windows span axes 1 and 2, the spatial axes of both layouts.
        return layers.POOLS[config.pool](layers.relu(y), config.pool_window, config.pool_stride)
    k = config.pool_window
    if config.pool == "max":
        return layers.relu(max_pool_reshape(y, k))   # relu(max(.)) == max(relu(.))
    return avg_pool_reshape(layers.relu(y), k)
