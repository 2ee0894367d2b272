"""oneDNN's convolutions and max pooling as a lowering (`--conv_impl=onednn`, `--pool_impl=onednn`):
forward, input gradient and weight gradient are each one call into oneDNN (the library PyTorch's CPU
convolutions use) through `jax.ffi`, tied together by a custom VJP. NHWC activations, HWIO
weights, CPU only; float32, or with `compute_dtype="bfloat16"` oneDNN's bfloat16 convolutions
(AVX512_BF16 / AMX): bfloat16 src, weights and output gradient, accumulated into a float32 output
and a float32 weight gradient. Max pooling runs in its input's dtype.

XLA:CPU's own convolution and the patches lowering move data slowly for the batch-normalised
families' layers; oneDNN's blocked direct convolutions run them faster (docs/performance.md,
"The model families at their presets").
The handlers (`cnn_jax/nn/csrc/onednn_conv.cc`) are compiled on first use with the C++ compiler
(`$CXX`, else `g++`) against the pinned `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels, into
`$CNN_JAX_CACHE` (default `$XDG_CACHE_HOME/cnn_jax` or `~/.cache/cnn_jax`, beside the compilation
cache), keyed by the source, the compiler, the JAX build and the environment.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cnn_jax.nn import layers
from cnn_jax.config import ConfigError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "onednn_conv.cc")
TARGETS = {"cnn_jax_onednn_conv_forward": "OnednnConvForward",
           "cnn_jax_onednn_conv_backward_data": "OnednnConvBackwardData",
           "cnn_jax_onednn_conv_backward_weights": "OnednnConvBackwardWeights",
           "cnn_jax_onednn_max_pool_forward": "OnednnMaxPoolForward",
           "cnn_jax_onednn_max_pool_backward": "OnednnMaxPoolBackward"}
INSTALL = ("pip install -r requirements.txt (onednn-cpu-gomp, onednn-devel-cpu-gomp) and a C++ compiler "
           "(apt-get install g++), or use --conv_impl=patches")


class OnednnUnavailable(ConfigError):
    """oneDNN's lowering cannot be built or loaded here; the message says what is missing."""


def _prefix_paths() -> tuple[str, str]:
    """(include dir, lib dir) of the oneDNN wheels: they install into the environment's prefix."""
    return os.path.join(sys.prefix, "include"), os.path.join(sys.prefix, "lib")


def _library_path(compiler: str) -> str:
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + f"{compiler} {jaxlib.__version__} {sys.prefix}".encode()).hexdigest()[:16]
    cache = os.environ.get("CNN_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cnn_jax")
    return os.path.join(cache, f"onednn_conv-{key}.so")


def _build(path: str, compiler: str) -> None:
    """Compile the handlers into `path` (through a temporary file renamed into place, so that
    concurrent builders never load a half-written library)."""
    include, lib = _prefix_paths()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", f"-I{jax.ffi.include_dir()}",
               SOURCE, "-o", tmp, f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise OnednnUnavailable(f"--conv_impl=onednn: compiling {os.path.basename(SOURCE)} failed ({last}); "
                                    f"needs {INSTALL}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Build (once per source and JAX build) and load the handlers, and register them with XLA:CPU;
    returns the library's path. Raises OnednnUnavailable with a one-line reason."""
    include, lib = _prefix_paths()
    if not os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")) or not any(
            name.startswith("libdnnl.so") for name in os.listdir(lib) if os.path.isdir(lib)):
        raise OnednnUnavailable(f"--conv_impl=onednn: oneDNN is not installed in {sys.prefix}: {INSTALL}")
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise OnednnUnavailable(f"--conv_impl=onednn: no C++ compiler ({compiler}) to build it: {INSTALL}")
    path = _library_path(compiler)
    if not os.path.exists(path):
        _build(path, compiler)
    try:
        library = ctypes.cdll.LoadLibrary(path)
    except OSError as e:   # e.g. libdnnl.so or libgomp missing at run time
        raise OnednnUnavailable(f"--conv_impl=onednn: loading {path} failed ({e}); needs {INSTALL}") from None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether `load()` succeeds here (what `--conv_impl=auto` asks before choosing oneDNN)."""
    try:
        load()
        return True
    except OnednnUnavailable:
        return False


def require(flag: str, instead: str, backend: str | None = None) -> None:
    """Build and register the handlers for `--{flag}=onednn` now, before any program (traced, or
    loaded whole from the compilation cache) needs them; a one-line ConfigError off CPU (naming
    `instead`) or where they cannot be built."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        raise ConfigError(f"--{flag}=onednn runs on CPU only (this backend: {backend}): use {instead}")
    load()


def _pads(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int, padding: str) -> tuple[int, ...]:
    """(top, bottom, left, right) zero padding of `padding` (SAME as lax pads it, or VALID)."""
    if padding == "VALID":
        return (0, 0, 0, 0)
    return layers.same_padding(x_shape[1], w_shape[0], stride) + layers.same_padding(x_shape[2], w_shape[1], stride)


def _ffi(target: str, shape: tuple[int, ...], dtype, *operands: jax.Array, **attrs: int) -> jax.Array:
    """One handler's result of `shape` and `dtype` (the handlers read every buffer's dtype); under
    vmap, one call per element."""
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")(
        *operands, **{name: np.int64(value) for name, value in attrs.items()})


def _conv_attrs(stride: int, pads: tuple[int, ...]) -> dict[str, int]:
    return dict(stride=stride, pad_top=pads[0], pad_bottom=pads[1], pad_left=pads[2], pad_right=pads[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, w: jax.Array, stride: int = 1, padding: str = "VALID",
         compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """x (N, H, W, C) * w (kh, kw, C, O) -> float32 (N, H', W', O), as `lax.conv_general_dilated`
    (NHWC); x and w enter the products in `compute_dtype`."""
    return _conv_fwd(x, w, stride, padding, compute_dtype)[0]


def _conv_fwd(x, w, stride, padding, compute_dtype):
    load()
    oh = layers.conv_output_size(x.shape[1], w.shape[0], stride, padding)
    ow = layers.conv_output_size(x.shape[2], w.shape[1], stride, padding)
    attrs = _conv_attrs(stride, _pads(x.shape, w.shape, stride, padding))
    xc, wc = layers.compute_cast(x, compute_dtype), layers.compute_cast(w, compute_dtype)
    y = _ffi("cnn_jax_onednn_conv_forward", (x.shape[0], oh, ow, w.shape[3]), jnp.float32, xc, wc, **attrs)
    # An empty array of x's dtype: the input gradient comes back in it (float32, or bfloat16 after
    # bfloat16 pooling); the weight gradient in w's (float32).
    return y, (xc, wc, layers.dtype_marker(x), layers.dtype_marker(w))


def _conv_bwd(stride, padding, compute_dtype, residuals, g):
    x, w, x_dtype, w_dtype = residuals
    attrs = _conv_attrs(stride, _pads(x.shape, w.shape, stride, padding))
    g = layers.compute_cast(g, compute_dtype)
    dx = _ffi("cnn_jax_onednn_conv_backward_data", x.shape, x_dtype.dtype, g, w, **attrs)
    dw = _ffi("cnn_jax_onednn_conv_backward_weights", w.shape, w_dtype.dtype, x, g, **attrs)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


DTYPES = (jnp.float32, jnp.bfloat16)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int = 1, padding: str = "VALID",
           compute_dtype: str = layers.FLOAT32) -> jax.Array:
    """`layers.conv2d` through oneDNN (same signature and result, up to rounding)."""
    if x.dtype not in DTYPES or w.dtype not in DTYPES:
        raise ConfigError(f"--conv_impl=onednn runs float32 and bfloat16 only (got {x.dtype} and {w.dtype})")
    return conv(x, w, stride, padding, compute_dtype) + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Max pooling of NHWC `x` over window x window patches at stride `window` (VALID), as
    `lowering.max_pool_reshape`: the gradient goes to each window's first maximum in row-major order."""
    return _max_pool_fwd(x, window)[0]


def _max_pool_fwd(x, window):
    load()
    if x.dtype not in DTYPES:
        raise ConfigError(f"--pool_impl=onednn runs float32 and bfloat16 only (got {x.dtype})")
    shape = (x.shape[0], layers.conv_output_size(x.shape[1], window, window),
             layers.conv_output_size(x.shape[2], window, window), x.shape[3])
    return _ffi("cnn_jax_onednn_max_pool_forward", shape, x.dtype, x, window=window), x


def _max_pool_bwd(window, x, g):
    return (_ffi("cnn_jax_onednn_max_pool_backward", x.shape, x.dtype, x, g.astype(x.dtype), window=window),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
