"""The lowerings every model family runs on, and the choice among them.

The reference is `layers.py` as written: `lax.conv_general_dilated` convolutions and
`lax.reduce_window` pooling on NHWC arrays. XLA:CPU runs the convolution's backward pass and
max pooling's backward pass (`select_and_scatter`) slowly, so on CPU the models run these
instead (tests/test_lowering.py holds each equal to the reference in value and gradient):

- conv "patches": im2col patches and one matmul (`layers.conv2d_patches`); conv "onednn":
  oneDNN's convolutions (`nn.onednn`).
- pool "reshape" (window == stride): crop, reshape to windows, max / mean. Max pooling's
  gradient goes to the *first* maximum of each window in row-major order, as
  `select_and_scatter` does, through a custom VJP (`max_pool_reshape`).

The tutorial CNN's fused channel-major and Winograd blocks are its own
(`cnn_jax.models.cnn_blocks`). `resolve(config)` turns the config's `auto` choices into the
concrete strategy for the backend, and `describe` names it for the start-up log line.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax.nn import layers, onednn
from cnn_jax.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The concrete lowerings a config runs with (no `auto` left)."""

    conv_impl: str   # lax | patches | winograd | onednn
    pool_impl: str   # reduce_window | reshape | onednn (global_mean: a family pooling only by a global mean)
    layout: str      # NHWC | CHWN
    loop: str        # step | scan
    ynnpack: str     # on | off (XLA:CPU only)
    compute_dtype: str = layers.FLOAT32   # float32 | bfloat16: the products' inputs

    def describe(self) -> str:
        """The start-up line's lowerings; a low-precision compute dtype is named with what runs it."""
        line = (f"conv={self.conv_impl} pool={self.pool_impl} layout={self.layout} "
                f"loop={self.loop} ynnpack={self.ynnpack}")
        if self.compute_dtype != layers.FLOAT32:
            line += f" compute={self.compute_dtype} ({bf16_support() or 'accelerator'})"
        return line


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")   # x86 AMX, x86 AVX-512, Arm (Linux's names)


def bf16_flag(cpuinfo: str) -> str:
    """The first of `BF16_CPU_FLAGS` that the text of a /proc/cpuinfo reports, upper case (e.g.
    AVX512_BF16); '' if none."""
    flags = {word for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.split(":", 1)[1].split()}
    return next((flag.upper() for flag in BF16_CPU_FLAGS if flag in flags), "")


@functools.lru_cache(maxsize=None)
def bf16_support() -> str:
    """`bf16_flag` of this machine ('' without /proc/cpuinfo): the instructions XLA:CPU and oneDNN
    run bfloat16 products with."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_flag(f.read())
    except OSError:
        return ""


def check_compute_dtype(config: Config, backend: str | None = None) -> None:
    """One-line ConfigError for bfloat16 on a CPU without bfloat16 instructions, where it would run
    emulated and slower than float32; accelerators run it natively."""
    if config.compute_dtype != layers.FLOAT32 and (backend or jax.default_backend()) == "cpu" \
            and not bf16_support():
        raise ConfigError(f"--compute_dtype={config.compute_dtype}: this CPU has no bfloat16 instructions "
                          f"({', '.join(f.upper() for f in BF16_CPU_FLAGS[:2])}), so it would run emulated and "
                          "slower than float32: use --compute_dtype=float32")


def _auto_conv(config: Config, pool: str) -> str:
    """The CPU convolution `auto` means for the tutorial CNN (`resolve`)."""
    if config.compute_dtype != layers.FLOAT32:
        return "onednn" if config.layout in ("auto", "NHWC") and onednn.available() else "patches"
    return "winograd" if pool == "reshape" and config.layout in ("auto", "CHWN") else "patches"


def resolve(config: Config, backend: str | None = None) -> Strategy:
    """Replace every `auto` of the config by the choice measured fastest on `backend`
    (docs/performance.md, docs/lowering.md).

    CPU: Winograd conv where it applies and patches elsewhere (with reduce_window pooling or an
    NHWC layout: patches), reshape pooling, CHWN layout, scanned epochs, YNNPACK fusions off; in
    bfloat16 products oneDNN's convolutions (NHWC) where oneDNN builds, else patches (Winograd's
    transforms lose ~3% there); but one call per batch for the lax convolution, which XLA:CPU runs
    far slower inside a loop body (jax-ml/jax#12868; docs/performance.md).
    Elsewhere (GPU/TPU): the reference lax convolution, reshape pooling, NHWC, scanned epochs.
    """
    backend = backend or jax.default_backend()
    check_compute_dtype(config, backend)
    cpu = backend == "cpu"
    pool = config.pool_impl
    if pool == "auto":
        pool = "reshape" if config.pool_window == config.pool_stride else "reduce_window"
    conv = config.conv_impl
    if conv == "auto":
        conv = _auto_conv(config, pool) if cpu else "lax"
    if conv == "onednn":
        onednn.require("conv_impl", "auto or lax", backend)
    layout = config.layout if config.layout != "auto" else (
        "CHWN" if cpu and conv in ("patches", "winograd") and pool == "reshape" else "NHWC")
    # A scanned epoch: the steps run inside one compiled call, without a host round trip and a
    # dispatch per batch (the `default` against `default_step` rows of docs/performance.md).
    loop = config.loop if config.loop != "auto" else ("step" if cpu and conv == "lax" else "scan")
    ynnpack = config.ynnpack if config.ynnpack != "auto" else ("off" if cpu else "on")
    return Strategy(conv, pool, layout, loop, ynnpack, config.compute_dtype)


def inference_config(config: Config) -> Config:
    """The config with its `auto` lowerings set to the fastest *forward-only* choice.

    Evaluation needs no gradient, and XLA:CPU's own convolution runs the forward pass
    faster than patches + matmul at evaluation batch sizes, so on CPU `auto` means the lax
    convolution (NHWC) there, with reshape max pooling but `reduce_window` average pooling (the
    faster average pooling of the forward pass); but where training resolves to oneDNN (bfloat16
    products) evaluation keeps it, faster forward than XLA's convolution there (docs/lowering.md).
    Explicit choices are kept. The default of `model.inference_config`; the batch-normalised
    families keep oneDNN (`models.common`)."""
    if config.conv_impl != "auto" or config.layout != "auto" or resolve(config).conv_impl == "onednn":
        return config
    pool_impl = config.pool_impl
    if pool_impl == "auto" and config.pool == "avg":
        pool_impl = "reduce_window"
    return dataclasses.replace(config, conv_impl="lax", layout="NHWC", pool_impl=pool_impl)


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
    own reductions and elementwise loops instead of YNNPACK fusions, which run slower for this
    network's shapes."""
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


def _flat_windows(x: jax.Array, k: int, axes: tuple[int, int]) -> jax.Array:
    """`_windows` with each window's k x k values moved last, in row-major order: (..., k * k)."""
    ha, wa = axes
    xw = jnp.moveaxis(_windows(x, k, axes), (ha + 1, wa + 2), (-2, -1))
    return xw.reshape(*xw.shape[:-2], k * k)


def _max_pool_fwd(x, window, axes):
    # The gradient goes to the first maximum of each window, found here and kept as an index: the
    # backward pass must not look for the maximum again by comparing values, since under jit XLA
    # may recompute x there with other rounding and then match no element, or another one.
    windows = _flat_windows(x, window, axes)
    return jnp.max(windows, axis=-1), (jnp.argmax(windows, axis=-1), x)


def _max_pool_bwd(window, axes, residuals, g):
    first, x = residuals                                 # x only for its shape
    ha, wa = axes
    gw = jax.nn.one_hot(first, window * window, dtype=g.dtype) * g[..., None]
    gw = jnp.moveaxis(gw.reshape(*gw.shape[:-1], window, window), (-2, -1), (ha + 1, wa + 2))
    cropped = list(x.shape)
    cropped[ha], cropped[wa] = g.shape[ha] * window, g.shape[wa] * window
    gx = gw.reshape(cropped)
    pads = [(0, 0, 0)] * x.ndim
    pads[ha] = (0, x.shape[ha] - gx.shape[ha], 0)
    pads[wa] = (0, x.shape[wa] - gx.shape[wa], 0)
    return (lax.pad(gx, jnp.zeros((), gx.dtype), pads),)


max_pool_reshape.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool_reshape(x: jax.Array, window: int, axes: tuple[int, int] = (1, 2)) -> jax.Array:
    """Average pooling with window == stride (VALID) over spatial `axes`."""
    ha, wa = axes
    return jnp.mean(_windows(x, window, axes), axis=(ha + 1, wa + 2))


def nhwc_conv(impl: str, compute_dtype: str = layers.FLOAT32):
    """conv(x, w, b, stride, padding) on NHWC activations for a resolved `conv_impl` (Winograd, which
    needs the fused channel-major block, falls back to patches), its products in `compute_dtype`."""
    conv = {"lax": layers.conv2d, "onednn": onednn.conv2d}.get(impl, layers.conv2d_patches)
    return conv if compute_dtype == layers.FLOAT32 else functools.partial(conv, compute_dtype=compute_dtype)
