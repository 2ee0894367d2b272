// oneDNN's convolutions (forward, backward data, backward weights) and k x k / stride k max pooling
// (forward, backward) as XLA FFI handlers for jax.ffi (cnn_jax/onednn.py). Activations NHWC, weights
// HWIO, float32; each convolution primitive picks its own weight layout (reordered here).
#include <cstdint>
#include <mutex>
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;
};

Geometry geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                  int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  // x: N H W C, w: KH KW C O, y: N OH OW O; oneDNN's logical order is NCHW / OIHW.
  return {{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
          {stride, stride}, {pt, pl}, {pb, pr}};
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src, dt::f32, tag::nhwc), memory::desc(g.weights, dt::f32, tag::any),
      memory::desc(g.dst, dt::f32, tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

// `user` reordered into the primitive's layout `want` (no copy when they agree).
memory to_layout(memory user, const memory::desc& want, dnnl::stream& s) {
  if (user.get_desc() == want) return user;
  memory out(want, cpu_engine());
  dnnl::reorder(user, out).execute(s, user, out);
  return out;
}

ffi::Error run(const char* what, const std::function<void()>& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": oneDNN: " + e.what());
  }
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run("conv forward", [&] {
    Geometry g = geometry(x.dimensions(), w.dimensions(), y->dimensions(), stride, pt, pb, pl, pr);
    auto pd = forward_pd(g);
    dnnl::stream s(cpu_engine());
    memory src(memory::desc(g.src, dt::f32, tag::nhwc), cpu_engine(), x.typed_data());
    memory wts(memory::desc(g.weights, dt::f32, tag::hwio), cpu_engine(), w.typed_data());
    memory dst(memory::desc(g.dst, dt::f32, tag::nhwc), cpu_engine(), y->typed_data());
    memory wts_p = to_layout(wts, pd.weights_desc(), s);
    dnnl::convolution_forward(pd).execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wts_p}, {DNNL_ARG_DST, dst}});
    s.wait();
  });
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                            int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run("conv backward data", [&] {
    Geometry g = geometry(dx->dimensions(), w.dimensions(), dy.dimensions(), stride, pt, pb, pl, pr);
    auto hint = forward_pd(g);
    dnnl::convolution_backward_data::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
        memory::desc(g.weights, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc), g.strides,
        g.pad_l, g.pad_r, hint);
    dnnl::stream s(cpu_engine());
    memory diff_src(memory::desc(g.src, dt::f32, tag::nhwc), cpu_engine(), dx->typed_data());
    memory wts(memory::desc(g.weights, dt::f32, tag::hwio), cpu_engine(), w.typed_data());
    memory diff_dst(memory::desc(g.dst, dt::f32, tag::nhwc), cpu_engine(), dy.typed_data());
    memory wts_p = to_layout(wts, pd.weights_desc(), s);
    dnnl::convolution_backward_data(pd).execute(
        s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wts_p}, {DNNL_ARG_DIFF_SRC, diff_src}});
    s.wait();
  });
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                               int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return run("conv backward weights", [&] {
    Geometry g = geometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride, pt, pb, pl, pr);
    auto hint = forward_pd(g);
    dnnl::convolution_backward_weights::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
        memory::desc(g.weights, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc), g.strides,
        g.pad_l, g.pad_r, hint);
    dnnl::stream s(cpu_engine());
    memory src(memory::desc(g.src, dt::f32, tag::nhwc), cpu_engine(), x.typed_data());
    memory diff_dst(memory::desc(g.dst, dt::f32, tag::nhwc), cpu_engine(), dy.typed_data());
    memory diff_w(memory::desc(g.weights, dt::f32, tag::hwio), cpu_engine(), dw->typed_data());
    memory diff_w_p = pd.diff_weights_desc() == diff_w.get_desc() ? diff_w
                                                                   : memory(pd.diff_weights_desc(), cpu_engine());
    dnnl::convolution_backward_weights(pd).execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_w_p}});
    if (diff_w_p != diff_w) dnnl::reorder(diff_w_p, diff_w).execute(s, diff_w_p, diff_w);
    s.wait();
  });
}

dnnl::pooling_forward::primitive_desc pool_pd(const memory::desc& src, const memory::desc& dst, int64_t k,
                                              dnnl::prop_kind prop) {
  return dnnl::pooling_forward::primitive_desc(cpu_engine(), prop, dnnl::algorithm::pooling_max, src, dst, {k, k},
                                               {k, k}, {0, 0}, {0, 0}, {0, 0});
}

ffi::Error MaxPoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t window) {
  return run("max pool forward", [&] {
    auto xd = x.dimensions(), yd = y->dimensions();
    memory::desc src_md({xd[0], xd[3], xd[1], xd[2]}, dt::f32, tag::nhwc);
    memory::desc dst_md({yd[0], yd[3], yd[1], yd[2]}, dt::f32, tag::nhwc);
    auto pd = pool_pd(src_md, dst_md, window, dnnl::prop_kind::forward_inference);
    dnnl::stream s(cpu_engine());
    memory src(src_md, cpu_engine(), x.typed_data()), dst(dst_md, cpu_engine(), y->typed_data());
    dnnl::pooling_forward(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}});
    s.wait();
  });
}

// The gradient goes to each window's first maximum: the forward pass runs again here for its
// workspace (the maxima's positions), which is cheaper than carrying it between the two calls.
ffi::Error MaxPoolBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t window) {
  return run("max pool backward", [&] {
    auto xd = x.dimensions(), yd = dy.dimensions();
    memory::desc src_md({xd[0], xd[3], xd[1], xd[2]}, dt::f32, tag::nhwc);
    memory::desc dst_md({yd[0], yd[3], yd[1], yd[2]}, dt::f32, tag::nhwc);
    auto fwd = pool_pd(src_md, dst_md, window, dnnl::prop_kind::forward_training);
    dnnl::pooling_backward::primitive_desc bwd(cpu_engine(), dnnl::algorithm::pooling_max, src_md, dst_md,
                                               {window, window}, {window, window}, {0, 0}, {0, 0}, {0, 0}, fwd);
    dnnl::stream s(cpu_engine());
    memory src(src_md, cpu_engine(), x.typed_data()), y(dst_md, cpu_engine());
    memory workspace(fwd.workspace_desc(), cpu_engine());
    dnnl::pooling_forward(fwd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, y}, {DNNL_ARG_WORKSPACE, workspace}});
    memory diff_dst(dst_md, cpu_engine(), dy.typed_data()), diff_src(src_md, cpu_engine(), dx->typed_data());
    dnnl::pooling_backward(bwd).execute(
        s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_WORKSPACE, workspace}});
    s.wait();
  });
}

}  // namespace

#define CONV_ATTRS                                                                       \
  .Attr<int64_t>("stride").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom")         \
      .Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ConvForward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, ConvBackwardData,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, ConvBackwardWeights,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("window"));
