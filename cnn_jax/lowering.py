"""Faster lowerings of the model's conv -> relu -> pool block, each held equal to the reference.

The reference block is `layers.py` as written: `relu(conv2d(x, w) + b)` through
`lax.conv_general_dilated`, then `lax.reduce_window` pooling, on NHWC arrays. XLA:CPU runs
the convolution's backward pass and max pooling's backward pass (`select_and_scatter`)
slowly, so on CPU the model runs this instead (tests/test_lowering.py holds every piece
equal to the reference in value and gradient):

- conv "patches": im2col patches and one matmul (`conv2d_patches`, `conv2d_patches_cm`).
- pool "reshape" (window == stride): crop, reshape to windows, max / mean. Max pooling's
  gradient goes to the *first* maximum of each window in row-major order, as
  `select_and_scatter` does, through a custom VJP (`max_pool_reshape`).
- the block, with reshape pooling: only the conv outputs that the (VALID) pool reads are
  computed (the seed's 9x9 conv2 output loses its last row and column, ~21% of its FLOPs),
  and for max pooling relu runs after the pool (relu and max commute exactly).
- layout "CNHW": activations channel-major (C, N, H, W), so every conv matmul has the long
  batch x space axis last, which XLA:CPU's matmuls run faster than the NHWC forms.

`resolve(config)` turns the config's `auto` choices into the concrete strategy for the
backend, and `describe` names it for the start-up log line.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import layers
from cnn_jax.config import Config
from cnn_jax.layers import conv_output_size


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The concrete lowerings a config runs with (no `auto` left)."""

    conv_impl: str   # lax | patches
    pool_impl: str   # reduce_window | reshape
    layout: str      # NHWC | CNHW
    loop: str        # step | scan
    ynnpack: str     # on | off (XLA:CPU only)

    def describe(self) -> str:
        return (f"conv={self.conv_impl} pool={self.pool_impl} layout={self.layout} "
                f"loop={self.loop} ynnpack={self.ynnpack}")


def resolve(config: Config, backend: str | None = None) -> Strategy:
    """Replace every `auto` of the config by the choice measured fastest on `backend`.

    CPU: patches conv, reshape pooling, channel-major layout, one jitted call per batch.
    Elsewhere (GPU/TPU): the reference lax convolution, reshape pooling, NHWC, scanned epochs.
    """
    backend = backend or jax.default_backend()
    cpu = backend == "cpu"
    conv = config.conv_impl if config.conv_impl != "auto" else ("patches" if cpu else "lax")
    pool = config.pool_impl
    if pool == "auto":
        pool = "reshape" if config.pool_window == config.pool_stride else "reduce_window"
    layout = config.layout if config.layout != "auto" else (
        "CNHW" if cpu and conv == "patches" and pool == "reshape" else "NHWC")
    loop = config.loop if config.loop != "auto" else ("step" if cpu else "scan")
    ynnpack = config.ynnpack if config.ynnpack != "auto" else ("off" if cpu else "on")
    return Strategy(conv, pool, layout, loop, ynnpack)


_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.lru_cache(maxsize=None)
def _ynn_option_known() -> bool:
    """Whether this jaxlib's XLA:CPU accepts the option that turns YNNPACK fusions off."""
    try:
        jax.jit(lambda v: v + 1, compiler_options={_YNN_OPTION: ""}).lower(1.0).compile()
        return True
    except Exception:  # an older or newer XLA without the option
        return False


def compiler_options(config: Config) -> dict[str, str]:
    """XLA compiler options for the config's jitted steps (pass to `jax.jit(compiler_options=)`).

    With ynnpack off (auto on CPU) XLA:CPU runs dots on its own Eigen kernels and emits its
    own reductions and elementwise loops instead of YNNPACK fusions, which measured slower
    for this network's shapes (see WORKSPACE.md, Performance)."""
    if jax.default_backend() != "cpu" or resolve(config).ynnpack == "on" or not _ynn_option_known():
        return {}
    return {_YNN_OPTION: ""}


# --- Pooling by reshape (window == stride, VALID) ------------------------------------------

def _windows(x: jax.Array, k: int, axes: tuple[int, int]) -> jax.Array:
    """Crop the two spatial `axes` to multiples of k and split each into (out, k)."""
    ha, wa = axes
    oh, ow = x.shape[ha] // k, x.shape[wa] // k
    x = lax.slice_in_dim(lax.slice_in_dim(x, 0, oh * k, axis=ha), 0, ow * k, axis=wa)
    shape = list(x.shape)
    shape[wa:wa + 1] = [ow, k]
    shape[ha:ha + 1] = [oh, k]
    return x.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_reshape(x: jax.Array, window: int, axes: tuple[int, int] = (1, 2)) -> jax.Array:
    """Max pooling with window == stride (VALID) over spatial `axes`; ties send the
    gradient to the first maximum in row-major window order, like `select_and_scatter`."""
    ha, wa = axes
    return jnp.max(_windows(x, window, axes), axis=(ha + 1, wa + 2))


def _max_pool_fwd(x, window, axes):
    y = max_pool_reshape(x, window, axes)
    return y, (x, y)


def _max_pool_bwd(window, axes, residuals, g):
    x, y = residuals
    ha, wa = axes
    xw = _windows(x, window, axes)                       # ..., oh, k, ..., ow, k, ...
    y_b = jnp.expand_dims(jnp.expand_dims(y, ha + 1), wa + 2)
    g_b = jnp.expand_dims(jnp.expand_dims(g, ha + 1), wa + 2)
    hit = xw == y_b
    # Keep only the first hit of each window, scanning its rows then columns.
    taken = jnp.zeros(y_b.shape, bool)
    rows = []
    for i in range(window):
        cols = []
        for j in range(window):
            h_ij = lax.index_in_dim(lax.index_in_dim(hit, j, wa + 2), i, ha + 1)
            first = h_ij & ~taken
            taken = taken | first
            cols.append(jnp.where(first, g_b, jnp.zeros_like(g_b)))
        rows.append(jnp.concatenate(cols, axis=wa + 2))
    cropped = list(x.shape)
    cropped[ha], cropped[wa] = y.shape[ha] * window, y.shape[wa] * window
    gx = jnp.concatenate(rows, axis=ha + 1).reshape(cropped)
    pads = [(0, 0, 0)] * x.ndim
    pads[ha] = (0, x.shape[ha] - gx.shape[ha], 0)
    pads[wa] = (0, x.shape[wa] - gx.shape[wa], 0)
    return (lax.pad(gx, jnp.zeros((), gx.dtype), pads),)


max_pool_reshape.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool_reshape(x: jax.Array, window: int, axes: tuple[int, int] = (1, 2)) -> jax.Array:
    """Average pooling with window == stride (VALID) over spatial `axes`."""
    ha, wa = axes
    return jnp.mean(_windows(x, window, axes), axis=(ha + 1, wa + 2))


# --- Channel-major (C, N, H, W) convolution ------------------------------------------------

def conv2d_patches_cm(x: jax.Array, w: jax.Array, stride: int = 1,
                      padding: str = "VALID") -> jax.Array:
    """Convolution without bias on channel-major arrays: x (C, N, H, W), w (kh, kw, C, O)
    -> (O, N, H', W'), as patches (kh*kw*C, N*H'*W') and one matmul with w^T."""
    kh, kw, c, o = w.shape
    _, n, h, wd = x.shape
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), (0, 0), layers._same_padding(h, kh, stride),
                        layers._same_padding(wd, kw, stride)))
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(wd, kw, stride, padding)
    # Row order (i, j, c) matches w.reshape(kh * kw * c, o).
    patches = jnp.stack(
        [x[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
         for i in range(kh) for j in range(kw)], axis=0).reshape(kh * kw * c, n * oh * ow)
    y = w.reshape(kh * kw * c, o).T @ patches
    return y.reshape(o, n, oh, ow)


def _window_major_patches(x: jax.Array, kh: int, kw: int, stride: int, k: int, ph: int,
                          pw: int) -> jax.Array:
    """Patches of channel-major x for the conv outputs a k x k VALID pool reads, columns in
    window-major order: (kh*kw*C, k*k*N*ph*pw), column (a, b, n, py, px) being conv output
    (k*py + a, k*px + b) of image n. Pooling then reduces over a leading axis (vectorised)
    and the pool's gradient is a plain stack of k*k blocks."""
    c, n = x.shape[:2]
    step = stride * k
    rows = []
    for i in range(kh):
        for j in range(kw):
            rows.append(jnp.stack(
                [x[:, :, stride * a + i::step, stride * b + j::step][:, :, :ph, :pw]
                 for a in range(k) for b in range(k)], axis=1))          # (C, k*k, N, ph, pw)
    return jnp.stack(rows).reshape(kh * kw * c, k * k * n * ph * pw)


def _col2im_cm(dp: jax.Array, x_shape: tuple[int, ...], kh: int, kw: int, stride: int, oh: int,
               ow: int) -> jax.Array:
    """Transpose of row-major patches: scatter-add dp (kh*kw*C, N*oh*ow) onto (C, N, H, W).

    Sums each kernel row's kw shifted slices first, then the kh rows, as reductions: XLA:CPU
    computes each once, instead of fusing (and recomputing) a kh*kw-term sum into every
    consumer."""
    c, n, h, w = x_shape
    dp = dp.reshape(kh, kw, c, n, oh, ow)
    zero = jnp.zeros((), dp.dtype)
    rows = []
    for i in range(kh):
        shifted = [lax.pad(dp[i, j], zero, [(0, 0, 0), (0, 0, 0), (0, 0, 0),
                                            (j, w - j - stride * (ow - 1) - 1, stride - 1)])
                   for j in range(kw)]
        row = jnp.sum(jnp.stack(shifted), axis=0)
        rows.append(lax.pad(row, zero, [(0, 0, 0), (0, 0, 0),
                                        (i, h - i - stride * (oh - 1) - 1, stride - 1), (0, 0, 0)]))
    return jnp.sum(jnp.stack(rows), axis=0)


def _pooled_conv_forward(x, w, b, stride, padding, pool, k, keep_residuals):
    kh, kw, c, o = w.shape
    h0, w0 = x.shape[2:]
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), (0, 0), layers._same_padding(h0, kh, stride),
                        layers._same_padding(w0, kw, stride)))
    n, h, wd = x.shape[1:]
    # Only the conv outputs the VALID pool reads: the first (out // k) * k rows and columns.
    ph = conv_output_size(h, kh, stride) // k
    pw = conv_output_size(wd, kw, stride) // k
    patches = _window_major_patches(x, kh, kw, stride, k, ph, pw)
    y = (w.reshape(kh * kw * c, o).T @ patches + b[:, None]).reshape(o, k * k, n, ph, pw)
    if pool == "max":
        z = jnp.max(y, axis=1)
        out = layers.relu(z)      # relu(max(.)) == max(relu(.)), with the same gradient
        if not keep_residuals:
            return out, None
        # Window position (row-major) of the first maximum: where the gradient goes, as
        # select_and_scatter does. A min reduction, so XLA computes it once, here.
        position = jnp.arange(k * k).reshape(1, k * k, 1, 1, 1)
        first = jnp.min(jnp.where(y == z[:, None], position, k * k), axis=1)
        return out, (patches, w, first, out, x.shape)
    out = jnp.mean(layers.relu(y), axis=1)
    return out, ((patches, w, y > 0, x.shape) if keep_residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pooled_conv_cm(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: str, pool: str,
                   window: int) -> jax.Array:
    """pool(relu(conv(x, w) + b)) for channel-major x (C, N, H, W), pool window == stride.

    One custom VJP for the whole block: the forward computes only the conv outputs the pool
    reads, as patches and one matmul; the backward routes max pooling's gradient to the
    first maximum of each window (as `select_and_scatter`), takes the bias gradient at
    pooled resolution, and scatters the patches' gradient back with `_col2im_cm`."""
    return _pooled_conv_forward(x, w, b, stride, padding, pool, window, False)[0]


def _pooled_conv_fwd(x, w, b, stride, padding, pool, window):
    out, residuals = _pooled_conv_forward(x, w, b, stride, padding, pool, window, True)
    return out, residuals + ((x.shape[2], x.shape[3]),)


def _pooled_conv_bwd(stride, padding, pool, k, residuals, g):
    *residuals, (h0, w0) = residuals
    if pool == "max":
        patches, w, first, out, x_shape = residuals
        gz = jnp.where(out > 0, g, jnp.zeros_like(g))
        db = jnp.sum(gz, axis=(1, 2, 3))
        zero = jnp.zeros((), g.dtype)
        dy = jnp.stack([jnp.where(first == q, gz, zero) for q in range(k * k)], axis=1)
    else:
        patches, w, positive, x_shape = residuals
        dy = jnp.where(positive, g[:, None] / (k * k), jnp.zeros((), g.dtype))
        db = jnp.sum(dy, axis=(1, 2, 3, 4))
    kh, kw, c, o = w.shape
    _, _, n, ph, pw = dy.shape
    dy = dy.reshape(o, k * k * n * ph * pw)
    dw = lax.dot_general(patches, dy, (((1,), (1,)), ((), ()))).reshape(kh, kw, c, o)
    # The input gradient in row-major column order (a transpose of the small dy, not of
    # the patches' gradient), scattered back by `_col2im_cm`.
    dy_rows = dy.reshape(o, k, k, n, ph, pw).transpose(0, 3, 4, 1, 5, 2).reshape(o, -1)
    dx = _col2im_cm(w.reshape(kh * kw * c, o) @ dy_rows, x_shape, kh, kw, stride, ph * k, pw * k)
    if padding == "SAME":
        top = layers._same_padding(h0, kh, stride)[0]
        left = layers._same_padding(w0, kw, stride)[0]
        dx = dx[:, :, top:top + h0, left:left + w0]
    return dx, dw, db


pooled_conv_cm.defvjp(_pooled_conv_fwd, _pooled_conv_bwd)


def _reduce_window_pool(x: jax.Array, config: Config, axes: tuple[int, int]) -> jax.Array:
    """The reference pooling (`layers.max_pool` / `avg_pool`, VALID) over any two spatial axes."""
    dims = [1] * x.ndim
    strides = [1] * x.ndim
    for a in axes:
        dims[a], strides[a] = config.pool_window, config.pool_stride
    if config.pool == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, "VALID")
    return lax.reduce_window(x, 0.0, lax.add, dims, strides, "VALID") / (config.pool_window ** 2)


# --- The conv -> relu -> pool block ----------------------------------------------------------

def _crop_to_pooled(x: jax.Array, kernel: int, config: Config, axes: tuple[int, int]) -> jax.Array:
    """Drop input rows/columns whose conv outputs the VALID pool never reads."""
    if config.conv_padding != "VALID":
        return x
    for axis in axes:
        out = conv_output_size(x.shape[axis], kernel, config.conv_stride)
        pooled = conv_output_size(out, config.pool_window, config.pool_stride)
        used = (pooled - 1) * config.pool_stride + config.pool_window
        x = lax.slice_in_dim(x, 0, (used - 1) * config.conv_stride + kernel, axis=axis)
    return x


def conv_block(x: jax.Array, w: jax.Array, b: jax.Array, config: Config,
               strategy: Strategy) -> jax.Array:
    """pool(relu(conv(x, w) + b)) in `strategy.layout` (x is NHWC or CNHW to match)."""
    cm = strategy.layout == "CNHW"
    axes = (2, 3) if cm else (1, 2)
    reshape_pool = strategy.pool_impl == "reshape"
    if cm and reshape_pool and strategy.conv_impl == "patches":
        return pooled_conv_cm(x, w, b, config.conv_stride, config.conv_padding, config.pool,
                              config.pool_window)
    if reshape_pool:
        x = _crop_to_pooled(x, w.shape[0], config, axes)
    if cm and strategy.conv_impl == "patches":
        y = conv2d_patches_cm(x, w, config.conv_stride, config.conv_padding) + b[:, None, None, None]
    elif cm:
        y = lax.conv_general_dilated(x, w, (config.conv_stride,) * 2, config.conv_padding,
                                     dimension_numbers=("CNHW", "HWIO", "CNHW")) + b[:, None, None, None]
    else:
        conv = layers.conv2d_patches if strategy.conv_impl == "patches" else layers.conv2d
        y = conv(x, w, b, config.conv_stride, config.conv_padding)
    k = config.pool_window
    if not reshape_pool:
        return _reduce_window_pool(layers.relu(y), config, axes)
    if config.pool == "max":
        return layers.relu(max_pool_reshape(y, k, axes))   # relu(max(.)) == max(relu(.))
    return avg_pool_reshape(layers.relu(y), k, axes)
