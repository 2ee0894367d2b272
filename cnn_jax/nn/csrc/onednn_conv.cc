// oneDNN's convolutions (forward, backward data, backward weights) and k x k / stride k max pooling
// (forward, backward) as XLA FFI handlers for jax.ffi (cnn_jax/onednn.py). Activations NHWC, weights
// HWIO, float32; each convolution primitive picks its own weight layout (reordered here).
#include <cstdint>
#include <functional>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN's logical order is NCHW (activations) and OIHW (weights); the buffers are NHWC and HWIO.
memory::dims nchw(ffi::Span<const int64_t> d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims oihw(ffi::Span<const int64_t> d) { return {d[3], d[2], d[0], d[1]}; }
memory::desc desc(const memory::dims& dims, tag layout) { return memory::desc(dims, memory::data_type::f32, layout); }
memory wrap(const memory::desc& d, void* data) { return memory(d, cpu_engine(), data); }

// A convolution's shapes: x (N H W C), w (KH KW C O), y (N OH OW O), stride, padding.
struct Conv {
  memory::desc src, weights, any_weights, dst;
  memory::dims strides, pad_l, pad_r;

  Conv(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y, int64_t stride,
       int64_t pt, int64_t pb, int64_t pl, int64_t pr)
      : src(desc(nchw(x), tag::nhwc)), weights(desc(oihw(w), tag::hwio)), any_weights(desc(oihw(w), tag::any)),
        dst(desc(nchw(y), tag::nhwc)), strides{stride, stride}, pad_l{pt, pl}, pad_r{pb, pr} {}

  dnnl::convolution_forward::primitive_desc forward() const {
    return {cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            src, any_weights, dst, strides, pad_l, pad_r};
  }
  dnnl::convolution_backward_data::primitive_desc backward_data() const {
    return {cpu_engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_l, pad_r,
            forward()};
  }
  dnnl::convolution_backward_weights::primitive_desc backward_weights() const {
    return {cpu_engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, pad_l, pad_r,
            forward()};
  }
};

// `user` in the primitive's layout `want` (a reordered copy when they differ).
memory to_layout(memory user, const memory::desc& want, dnnl::stream& s) {
  if (user.get_desc() == want) return user;
  memory out(want, cpu_engine());
  dnnl::reorder(user, out).execute(s, user, out);
  return out;
}

ffi::Error run(const char* what, const std::function<void(dnnl::stream&)>& body) {
  try {
    dnnl::stream s(cpu_engine());
    body(s);
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": oneDNN: " + e.what());
  }
}

ffi::Error ConvForward(F32 x, F32 w, F32Result y, int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run("conv forward", [&](dnnl::stream& s) {
    Conv c(x.dimensions(), w.dimensions(), y->dimensions(), stride, pt, pb, pl, pr);
    auto pd = c.forward();
    memory weights = to_layout(wrap(c.weights, w.typed_data()), pd.weights_desc(), s);
    dnnl::convolution_forward(pd).execute(s, {{DNNL_ARG_SRC, wrap(c.src, x.typed_data())},
                                              {DNNL_ARG_WEIGHTS, weights},
                                              {DNNL_ARG_DST, wrap(c.dst, y->typed_data())}});
  });
}

ffi::Error ConvBackwardData(F32 dy, F32 w, F32Result dx, int64_t stride, int64_t pt, int64_t pb, int64_t pl,
                            int64_t pr) {
  return run("conv backward data", [&](dnnl::stream& s) {
    Conv c(dx->dimensions(), w.dimensions(), dy.dimensions(), stride, pt, pb, pl, pr);
    auto pd = c.backward_data();
    memory weights = to_layout(wrap(c.weights, w.typed_data()), pd.weights_desc(), s);
    dnnl::convolution_backward_data(pd).execute(s, {{DNNL_ARG_DIFF_DST, wrap(c.dst, dy.typed_data())},
                                                    {DNNL_ARG_WEIGHTS, weights},
                                                    {DNNL_ARG_DIFF_SRC, wrap(c.src, dx->typed_data())}});
  });
}

ffi::Error ConvBackwardWeights(F32 x, F32 dy, F32Result dw, int64_t stride, int64_t pt, int64_t pb, int64_t pl,
                               int64_t pr) {
  return run("conv backward weights", [&](dnnl::stream& s) {
    Conv c(x.dimensions(), dw->dimensions(), dy.dimensions(), stride, pt, pb, pl, pr);
    auto pd = c.backward_weights();
    memory out = wrap(c.weights, dw->typed_data());
    memory blocked = pd.diff_weights_desc() == c.weights ? out : memory(pd.diff_weights_desc(), cpu_engine());
    dnnl::convolution_backward_weights(pd).execute(s, {{DNNL_ARG_SRC, wrap(c.src, x.typed_data())},
                                                       {DNNL_ARG_DIFF_DST, wrap(c.dst, dy.typed_data())},
                                                       {DNNL_ARG_DIFF_WEIGHTS, blocked}});
    if (blocked != out) dnnl::reorder(blocked, out).execute(s, blocked, out);
  });
}

dnnl::pooling_forward::primitive_desc pool_forward(const memory::desc& src, const memory::desc& dst, int64_t k,
                                                   dnnl::prop_kind prop) {
  return {cpu_engine(), prop, dnnl::algorithm::pooling_max, src, dst, {k, k}, {k, k}, {0, 0}, {0, 0}, {0, 0}};
}

ffi::Error MaxPoolForward(F32 x, F32Result y, int64_t window) {
  return run("max pool forward", [&](dnnl::stream& s) {
    memory::desc src = desc(nchw(x.dimensions()), tag::nhwc), dst = desc(nchw(y->dimensions()), tag::nhwc);
    dnnl::pooling_forward(pool_forward(src, dst, window, dnnl::prop_kind::forward_inference))
        .execute(s, {{DNNL_ARG_SRC, wrap(src, x.typed_data())}, {DNNL_ARG_DST, wrap(dst, y->typed_data())}});
  });
}

// The gradient goes to each window's first maximum: the forward pass runs again here for its
// workspace (the maxima's positions), which is cheaper than carrying it between the two calls.
ffi::Error MaxPoolBackward(F32 x, F32 dy, F32Result dx, int64_t window) {
  return run("max pool backward", [&](dnnl::stream& s) {
    memory::desc src = desc(nchw(x.dimensions()), tag::nhwc), dst = desc(nchw(dy.dimensions()), tag::nhwc);
    auto forward = pool_forward(src, dst, window, dnnl::prop_kind::forward_training);
    dnnl::pooling_backward::primitive_desc backward(cpu_engine(), dnnl::algorithm::pooling_max, src, dst,
                                                    {window, window}, {window, window}, {0, 0}, {0, 0}, {0, 0},
                                                    forward);
    memory workspace(forward.workspace_desc(), cpu_engine());
    dnnl::pooling_forward(forward).execute(s, {{DNNL_ARG_SRC, wrap(src, x.typed_data())},
                                               {DNNL_ARG_DST, memory(dst, cpu_engine())},
                                               {DNNL_ARG_WORKSPACE, workspace}});
    dnnl::pooling_backward(backward).execute(s, {{DNNL_ARG_DIFF_DST, wrap(dst, dy.typed_data())},
                                                 {DNNL_ARG_DIFF_SRC, wrap(src, dx->typed_data())},
                                                 {DNNL_ARG_WORKSPACE, workspace}});
  });
}

}  // namespace

#define CONV_BINDING                                                                                  \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("stride").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ConvForward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, ConvBackwardData, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, ConvBackwardWeights, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("window"));
