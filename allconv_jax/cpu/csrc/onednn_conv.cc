// oneDNN 2-d convolutions (NHWC activations, HWIO kernels; float32 or bfloat16) as XLA FFI
// handlers for the CPU: the forward pass, the input gradient and the weight gradient. XLA:CPU's
// own (Eigen) weight gradient needs the activations transposed to (C, H, W, N) and the output
// gradient to (H, W, N, D) first; oneDNN reads both as they are, and in bfloat16 it uses the
// AMX tiles where the CPU has them. Built and loaded by allconv_jax/onednn.py.
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

struct Geometry {  // logical sizes, oneDNN order: src (N, C, H, W), weights (D, C, KH, KW)
  memory::dims src, weights, dst, strides, pad_l, pad_r;
  memory::data_type type;
  std::string Key(char role) const {
    std::string key = std::string(1, role) + std::to_string(static_cast<int>(type));
    for (const auto* v : {&src, &weights, &dst, &strides, &pad_l, &pad_r})
      for (auto d : *v) key += "," + std::to_string(d);
    return key;
  }
};

Geometry Make(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
              ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
              int64_t pl, int64_t pr, memory::data_type type) {
  return {{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
          {sh, sw}, {pt, pl}, {pb, pr}, type};
}

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;  // guards the cache: XLA may run two convolutions at once
  std::unordered_map<std::string, std::pair<dnnl::primitive_desc, dnnl::primitive>> cache;
};

Runtime& GetRuntime() {
  static Runtime* runtime = new Runtime();
  return *runtime;
}

memory::desc Desc(const memory::dims& dims, memory::data_type type, Tag tag) {
  return memory::desc(dims, type, tag);
}

memory::desc Bias(const Geometry& g) {  // float32 in both types
  return Desc({g.weights[0]}, memory::data_type::f32, Tag::a);
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      GetRuntime().engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Desc(g.src, g.type, Tag::nhwc), Desc(g.weights, g.type, Tag::any), Bias(g),
      Desc(g.dst, g.type, Tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

dnnl::primitive_desc MakePd(const Geometry& g, char role) {
  Runtime& rt = GetRuntime();
  if (role == 'f') return ForwardPd(g);
  if (role == 'd') {
    return dnnl::convolution_backward_data::primitive_desc(
        rt.engine, dnnl::algorithm::convolution_direct, Desc(g.src, g.type, Tag::nhwc),
        Desc(g.weights, g.type, Tag::any), Desc(g.dst, g.type, Tag::nhwc), g.strides, g.pad_l,
        g.pad_r, ForwardPd(g));
  }
  // The weight and bias gradients accumulate in float32 whatever the activations' type.
  return dnnl::convolution_backward_weights::primitive_desc(
      rt.engine, dnnl::algorithm::convolution_direct, Desc(g.src, g.type, Tag::nhwc),
      Desc(g.weights, memory::data_type::f32, Tag::any), Bias(g),
      Desc(g.dst, g.type, Tag::nhwc), g.strides, g.pad_l, g.pad_r, ForwardPd(g));
}

// The primitive for `role` ('f' forward, 'd' input gradient, 'w' weight gradient) and its
// descriptor, created once per geometry (creating one compiles its kernels).
std::pair<dnnl::primitive_desc, dnnl::primitive> Primitive(const Geometry& g, char role) {
  Runtime& rt = GetRuntime();
  std::string key = g.Key(role);
  std::lock_guard<std::mutex> lock(rt.mu);
  auto it = rt.cache.find(key);
  if (it != rt.cache.end()) return it->second;
  dnnl::primitive_desc pd = MakePd(g, role);
  auto entry = std::make_pair(pd, dnnl::primitive(pd));
  rt.cache.emplace(key, entry);
  return entry;
}

// Runs a convolution primitive; `weights` is the user's HWIO buffer, converted to or from the
// primitive's own layout (and for the weight gradient from float32) around the call; `bias` is
// the bias ('f') or its gradient ('w').
void Run(const Geometry& g, char role, void* src, void* weights, void* dst, void* bias) {
  Runtime& rt = GetRuntime();
  auto [pd, prim] = Primitive(g, role);
  dnnl::stream stream(rt.engine);
  memory user_w(Desc(g.weights, g.type, Tag::hwio), rt.engine, weights);
  memory::desc prim_w_md = role == 'w' ? pd.diff_weights_desc() : pd.weights_desc();
  memory prim_w = prim_w_md == user_w.get_desc() ? user_w : memory(prim_w_md, rt.engine);
  if (role != 'w' && prim_w != user_w) dnnl::reorder(user_w, prim_w).execute(stream, user_w, prim_w);
  memory x(Desc(g.src, g.type, Tag::nhwc), rt.engine, src);
  memory y(Desc(g.dst, g.type, Tag::nhwc), rt.engine, dst);
  if (role == 'f') {
    prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, prim_w},
                          {DNNL_ARG_BIAS, memory(Bias(g), rt.engine, bias)}, {DNNL_ARG_DST, y}});
  } else if (role == 'd') {
    prim.execute(stream, {{DNNL_ARG_DIFF_SRC, x}, {DNNL_ARG_WEIGHTS, prim_w},
                          {DNNL_ARG_DIFF_DST, y}});
  } else {
    prim.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_WEIGHTS, prim_w},
                          {DNNL_ARG_DIFF_BIAS, memory(Bias(g), rt.engine, bias)},
                          {DNNL_ARG_DIFF_DST, y}});
    if (prim_w != user_w) dnnl::reorder(prim_w, user_w).execute(stream, prim_w, user_w);
  }
  stream.wait();
}

template <ffi::DataType T>
constexpr memory::data_type Type() {
  return T == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
}

template <typename F>
ffi::Error Guarded(F run) {
  try {
    run();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

#define ALLCONV_ATTRS int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr
#define ALLCONV_PADS sh, sw, pt, pb, pl, pr

// (x, w, bias) -> y
template <ffi::DataType T>
ffi::Error Forward(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::Buffer<ffi::F32> bias,
                   ffi::Result<ffi::Buffer<T>> y, ALLCONV_ATTRS) {
  return Guarded([&] {
    Run(Make(x.dimensions(), w.dimensions(), y->dimensions(), ALLCONV_PADS, Type<T>()), 'f',
        x.untyped_data(), w.untyped_data(), y->untyped_data(), bias.untyped_data());
  });
}

// (dy, w) -> dx
template <ffi::DataType T>
ffi::Error InputGrad(ffi::Buffer<T> dy, ffi::Buffer<T> w, ffi::Result<ffi::Buffer<T>> dx,
                     ALLCONV_ATTRS) {
  return Guarded([&] {
    Run(Make(dx->dimensions(), w.dimensions(), dy.dimensions(), ALLCONV_PADS, Type<T>()), 'd',
        dx->untyped_data(), w.untyped_data(), dy.untyped_data(), nullptr);
  });
}

// (x, dy) -> (dw, dbias)
template <ffi::DataType T>
ffi::Error WeightGrad(ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::Result<ffi::Buffer<T>> dw,
                      ffi::Result<ffi::Buffer<ffi::F32>> dbias, ALLCONV_ATTRS) {
  return Guarded([&] {
    Run(Make(x.dimensions(), dw->dimensions(), dy.dimensions(), ALLCONV_PADS, Type<T>()), 'w',
        x.untyped_data(), dw->untyped_data(), dy.untyped_data(), dbias->untyped_data());
  });
}

template <typename B>
auto WithPads(B binding) {
  return std::move(binding)
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr");
}

template <ffi::DataType T>
auto BindForward() {
  return WithPads(ffi::Ffi::Bind()
                      .template Arg<ffi::Buffer<T>>()
                      .template Arg<ffi::Buffer<T>>()
                      .template Arg<ffi::Buffer<ffi::F32>>()
                      .template Ret<ffi::Buffer<T>>());
}

template <ffi::DataType T>
auto BindInputGrad() {
  return WithPads(ffi::Ffi::Bind()
                      .template Arg<ffi::Buffer<T>>()
                      .template Arg<ffi::Buffer<T>>()
                      .template Ret<ffi::Buffer<T>>());
}

template <ffi::DataType T>
auto BindWeightGrad() {
  return WithPads(ffi::Ffi::Bind()
                      .template Arg<ffi::Buffer<T>>()
                      .template Arg<ffi::Buffer<T>>()
                      .template Ret<ffi::Buffer<T>>()
                      .template Ret<ffi::Buffer<ffi::F32>>());
}

}  // namespace

#define ALLCONV_HANDLER(Op, T) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(AllconvConv##Op##T, Op<ffi::DataType::T>, Bind##Op<ffi::DataType::T>());

ALLCONV_HANDLER(Forward, F32)
ALLCONV_HANDLER(InputGrad, F32)
ALLCONV_HANDLER(WeightGrad, F32)
ALLCONV_HANDLER(Forward, BF16)
ALLCONV_HANDLER(InputGrad, BF16)
ALLCONV_HANDLER(WeightGrad, BF16)
