// oneDNN's convolutions (forward, backward data, backward weights) and k x k / stride k max pooling
// (forward, backward) as XLA FFI handlers for jax.ffi (cnn_jax/onednn.py). Activations NHWC, weights
// HWIO; each convolution primitive picks its own weight layout (reordered here). Every buffer is
// float32 or bfloat16, the primitive's data types read off the buffers: a float32 convolution, or a
// mixed-precision one whose products take bfloat16 (src, weights, diff_dst) and accumulate into a
// float32 dst / diff_weights (diff_src in its input's dtype); pooling runs in its input's dtype.
#include <cstdint>
#include <functional>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dtype = memory::data_type;
using Any = ffi::AnyBuffer;
using AnyResult = ffi::Result<ffi::AnyBuffer>;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN's logical order is NCHW (activations) and OIHW (weights); the buffers are NHWC and HWIO.
memory::dims nchw(ffi::Span<const int64_t> d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims oihw(ffi::Span<const int64_t> d) { return {d[3], d[2], d[0], d[1]}; }
dtype type_of(ffi::DataType t) { return t == ffi::DataType::BF16 ? dtype::bf16 : dtype::f32; }
memory::desc desc(const memory::dims& dims, dtype t, tag layout) { return memory::desc(dims, t, layout); }
memory wrap(const memory::desc& d, void* data) { return memory(d, cpu_engine(), data); }

// A convolution's shapes: x (N H W C), w (KH KW C O), y (N OH OW O), stride, padding; `compute` is
// the products' input type (src, weights, diff_dst).
struct Conv {
  memory::dims x, w, y, strides, pad_l, pad_r;
  dtype compute;

  Conv(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y, dtype compute,
       int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr)
      : x(nchw(x)), w(oihw(w)), y(nchw(y)), strides{stride, stride}, pad_l{pt, pl}, pad_r{pb, pr},
        compute(compute) {}

  memory::desc src(dtype t) const { return desc(x, t, tag::nhwc); }
  memory::desc weights(dtype t) const { return desc(w, t, tag::hwio); }
  memory::desc any_weights(dtype t) const { return desc(w, t, tag::any); }
  memory::desc dst(dtype t) const { return desc(y, t, tag::nhwc); }

  dnnl::convolution_forward::primitive_desc forward(dtype dst_type) const {
    return {cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            src(compute), any_weights(compute), dst(dst_type), strides, pad_l, pad_r};
  }
  dnnl::convolution_backward_data::primitive_desc backward_data(dtype diff_src_type) const {
    return {cpu_engine(), dnnl::algorithm::convolution_direct, src(diff_src_type), any_weights(compute),
            dst(compute), strides, pad_l, pad_r, forward(dtype::f32)};
  }
  dnnl::convolution_backward_weights::primitive_desc backward_weights(dtype diff_weights_type) const {
    return {cpu_engine(), dnnl::algorithm::convolution_direct, src(compute), any_weights(diff_weights_type),
            dst(compute), strides, pad_l, pad_r, forward(dtype::f32)};
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

// A primitive that reads an activation (`in` at `in_arg`) and the weights and writes an activation
// (`out` at `out_arg`): the forward pass, and the backward pass to the data.
template <typename Primitive, typename Desc>
void execute_with_weights(dnnl::stream& s, const Desc& pd, const Conv& c, Any w, int in_arg, memory in, int out_arg,
                          memory out) {
  memory weights = to_layout(wrap(c.weights(type_of(w.element_type())), w.untyped_data()), pd.weights_desc(), s);
  Primitive(pd).execute(s, {{in_arg, in}, {DNNL_ARG_WEIGHTS, weights}, {out_arg, out}});
}

ffi::Error ConvForward(Any x, Any w, AnyResult y, int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run("conv forward", [&](dnnl::stream& s) {
    Conv c(x.dimensions(), w.dimensions(), y->dimensions(), type_of(x.element_type()), stride, pt, pb, pl, pr);
    auto pd = c.forward(type_of(y->element_type()));
    execute_with_weights<dnnl::convolution_forward>(s, pd, c, w, DNNL_ARG_SRC, wrap(c.src(c.compute), x.untyped_data()),
                                                    DNNL_ARG_DST, wrap(pd.dst_desc(), y->untyped_data()));
  });
}

ffi::Error ConvBackwardData(Any dy, Any w, AnyResult dx, int64_t stride, int64_t pt, int64_t pb, int64_t pl,
                            int64_t pr) {
  return run("conv backward data", [&](dnnl::stream& s) {
    Conv c(dx->dimensions(), w.dimensions(), dy.dimensions(), type_of(dy.element_type()), stride, pt, pb, pl, pr);
    auto pd = c.backward_data(type_of(dx->element_type()));
    execute_with_weights<dnnl::convolution_backward_data>(
        s, pd, c, w, DNNL_ARG_DIFF_DST, wrap(c.dst(c.compute), dy.untyped_data()), DNNL_ARG_DIFF_SRC,
        wrap(pd.diff_src_desc(), dx->untyped_data()));
  });
}

ffi::Error ConvBackwardWeights(Any x, Any dy, AnyResult dw, int64_t stride, int64_t pt, int64_t pb, int64_t pl,
                               int64_t pr) {
  return run("conv backward weights", [&](dnnl::stream& s) {
    Conv c(x.dimensions(), dw->dimensions(), dy.dimensions(), type_of(x.element_type()), stride, pt, pb, pl, pr);
    dtype out_type = type_of(dw->element_type());
    auto pd = c.backward_weights(out_type);
    memory out = wrap(c.weights(out_type), dw->untyped_data());
    memory blocked = pd.diff_weights_desc() == c.weights(out_type) ? out : memory(pd.diff_weights_desc(), cpu_engine());
    dnnl::convolution_backward_weights(pd).execute(s, {{DNNL_ARG_SRC, wrap(c.src(c.compute), x.untyped_data())},
                                                       {DNNL_ARG_DIFF_DST, wrap(c.dst(c.compute), dy.untyped_data())},
                                                       {DNNL_ARG_DIFF_WEIGHTS, blocked}});
    if (blocked != out) dnnl::reorder(blocked, out).execute(s, blocked, out);
  });
}

dnnl::pooling_forward::primitive_desc pool_forward(const memory::desc& src, const memory::desc& dst, int64_t k,
                                                   dnnl::prop_kind prop) {
  return {cpu_engine(), prop, dnnl::algorithm::pooling_max, src, dst, {k, k}, {k, k}, {0, 0}, {0, 0}, {0, 0}};
}

ffi::Error MaxPoolForward(Any x, AnyResult y, int64_t window) {
  return run("max pool forward", [&](dnnl::stream& s) {
    dtype t = type_of(x.element_type());
    memory::desc src = desc(nchw(x.dimensions()), t, tag::nhwc), dst = desc(nchw(y->dimensions()), t, tag::nhwc);
    dnnl::pooling_forward(pool_forward(src, dst, window, dnnl::prop_kind::forward_inference))
        .execute(s, {{DNNL_ARG_SRC, wrap(src, x.untyped_data())}, {DNNL_ARG_DST, wrap(dst, y->untyped_data())}});
  });
}

// The gradient goes to each window's first maximum: the forward pass runs again here for its
// workspace (the maxima's positions), which is cheaper than carrying it between the two calls.
ffi::Error MaxPoolBackward(Any x, Any dy, AnyResult dx, int64_t window) {
  return run("max pool backward", [&](dnnl::stream& s) {
    dtype t = type_of(x.element_type());
    memory::desc src = desc(nchw(x.dimensions()), t, tag::nhwc), dst = desc(nchw(dy.dimensions()), t, tag::nhwc);
    auto forward = pool_forward(src, dst, window, dnnl::prop_kind::forward_training);
    dnnl::pooling_backward::primitive_desc backward(cpu_engine(), dnnl::algorithm::pooling_max, src, dst,
                                                    {window, window}, {window, window}, {0, 0}, {0, 0}, {0, 0},
                                                    forward);
    memory workspace(forward.workspace_desc(), cpu_engine());
    dnnl::pooling_forward(forward).execute(s, {{DNNL_ARG_SRC, wrap(src, x.untyped_data())},
                                               {DNNL_ARG_DST, memory(dst, cpu_engine())},
                                               {DNNL_ARG_WORKSPACE, workspace}});
    dnnl::pooling_backward(backward).execute(s, {{DNNL_ARG_DIFF_DST, wrap(dst, dy.untyped_data())},
                                                 {DNNL_ARG_DIFF_SRC, wrap(src, dx->untyped_data())},
                                                 {DNNL_ARG_WORKSPACE, workspace}});
  });
}

}  // namespace

#define CONV_BINDING                                                                                  \
  ffi::Ffi::Bind().Arg<Any>().Arg<Any>().Ret<Any>().Attr<int64_t>("stride").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ConvForward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, ConvBackwardData, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, ConvBackwardWeights, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind().Arg<Any>().Ret<Any>().Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind().Arg<Any>().Arg<Any>().Ret<Any>().Attr<int64_t>("window"));
