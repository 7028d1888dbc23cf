// The Python binding of ldm_engine._C: every op's input checks live here, before any launch.
// Kernels take device pointers, shapes and a stream (see the .cu files), so this module links
// the CUDA runtime and pybind11 only -- never PyTorch's C++ library.
//
// Arrays arrive as Python objects exposing __cuda_array_interface__ (torch CUDA tensors do), the
// stream as an integer handle (torch.cuda.current_stream().cuda_stream), so launches go on the
// caller's stream and can be captured in CUDA graphs. Nothing here allocates or synchronises.
//
// Every array's dtype is declared by the caller (dtype= strings); the typestr must agree with it.
//
// Error contract: a missing / malformed __cuda_array_interface__, an unsupported dtype or a typestr
// that disagrees with the declared dtype -> TypeError; wrong shape, strides, alignment, sizes, device or workspace -> ValueError; a CUDA
// runtime failure (no driver, launch error) -> RuntimeError. Each message names the argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "ldm_kernels.h"

namespace py = pybind11;

#ifndef LDM_ENGINE_CUDA_ARCHS
#define LDM_ENGINE_CUDA_ARCHS "unknown"
#endif

namespace {

// Build and device facts. Never throws: on a machine without a driver or a GPU it says so.
py::dict device_info() {
  py::dict info;
  info["built_for_archs"] = std::string(LDM_ENGINE_CUDA_ARCHS);
  info["cuda_runtime_version"] = CUDART_VERSION;
  int driver = 0;
  cudaError_t err = cudaDriverGetVersion(&driver);
  info["driver_version"] = (err == cudaSuccess) ? driver : 0;
  int count = 0;
  err = cudaGetDeviceCount(&count);
  py::list devices;
  if (err != cudaSuccess) {
    info["device_count"] = 0;
    info["error"] = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
  } else {
    info["device_count"] = count;
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
      py::dict d;
      d["index"] = i;
      d["name"] = std::string(prop.name);
      d["compute_capability"] = py::make_tuple(prop.major, prop.minor);
      d["multiprocessors"] = prop.multiProcessorCount;
      d["total_memory"] = static_cast<long long>(prop.totalGlobalMem);
      d["shared_memory_per_block_optin"] = static_cast<long long>(prop.sharedMemPerBlockOptin);
      devices.append(d);
    }
  }
  info["devices"] = devices;
  return info;
}

// ------------------------------------------------------------------------------------------------
// __cuda_array_interface__ parsing
// ------------------------------------------------------------------------------------------------
struct Array {
  std::string name;
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int itemsize = 0;
  ldm::DType dtype = ldm::DType::kF16;
  bool readonly = false;

  int ndim() const { return int(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// The dtype comes from the caller (torch's tensor.dtype), never from the typestr alone: torch 2.5 and
// 2.6 report bfloat16 as "<f2" (float16's typestr), later versions as "<V2" (as ml_dtypes does), so a
// typestr-derived dtype read bf16 data as fp16 on those versions -- silently wrong results. The
// typestr must still agree with the declared dtype: float16 "<f2"; bfloat16 "<V2" or "<f2" (old
// torch); float32 "<f4". Anything else is refused (TypeError naming both).
ldm::DType parse_dtype_name(const std::string& name, const std::string& what) {
  if (name == "float16") return ldm::DType::kF16;
  if (name == "bfloat16") return ldm::DType::kBF16;
  if (name == "float32") return ldm::DType::kF32;
  type_error(what + ": unknown dtype '" + name + "' (expected 'float16', 'bfloat16' or 'float32')");
}

bool typestr_agrees(const std::string& typestr, ldm::DType dtype) {
  switch (dtype) {
    case ldm::DType::kF16: return typestr == "<f2";
    case ldm::DType::kBF16: return typestr == "<V2" || typestr == "<f2";
    case ldm::DType::kF32: return typestr == "<f4";
  }
  return false;
}

bool known_typestr(const std::string& typestr) { return typestr == "<f2" || typestr == "<V2" || typestr == "<f4"; }

const char* dtype_name(ldm::DType t) {
  switch (t) {
    case ldm::DType::kF16: return "float16";
    case ldm::DType::kBF16: return "bfloat16";
    case ldm::DType::kF32: return "float32";
  }
  return "?";
}

Array parse_array(py::handle obj, const std::string& name, ldm::DType dtype) {
  if (obj.is_none() || !py::hasattr(obj, "__cuda_array_interface__")) {
    const std::string tname = py::str(py::type::of(obj).attr("__name__"));
    type_error(name + ": expected a CUDA array exposing __cuda_array_interface__ (e.g. a torch CUDA tensor), got " +
               tname + (tname == "Tensor" ? " on the CPU" : ""));
  }
  py::object cai_obj = obj.attr("__cuda_array_interface__");
  if (!py::isinstance<py::dict>(cai_obj)) type_error(name + ": __cuda_array_interface__ is not a dict");
  py::dict cai = cai_obj.cast<py::dict>();
  for (const char* key : {"shape", "typestr", "data"})
    if (!cai.contains(key)) type_error(name + ": __cuda_array_interface__ lacks '" + key + "'");
  Array a;
  a.name = name;
  try {
    for (py::handle s : cai["shape"].cast<py::tuple>()) a.shape.push_back(s.cast<int64_t>());
  } catch (const py::cast_error&) {
    type_error(name + ": __cuda_array_interface__['shape'] must be a tuple of ints");
  }
  const std::string typestr = py::str(cai["typestr"]);
  if (!known_typestr(typestr))
    type_error(name + ": dtype '" + typestr + "' is not supported (float16 '<f2', bfloat16 '<V2', float32 '<f4')");
  if (!typestr_agrees(typestr, dtype))
    type_error(name + ": typestr '" + typestr + "' disagrees with the declared dtype " + dtype_name(dtype));
  a.dtype = dtype;
  a.itemsize = ldm::dtype_size(dtype);
  try {
    py::tuple data = cai["data"].cast<py::tuple>();
    if (data.size() != 2) throw py::cast_error();
    a.ptr = data[0].cast<uintptr_t>();
    a.readonly = data[1].cast<bool>();
  } catch (const py::cast_error&) {
    type_error(name + ": __cuda_array_interface__['data'] must be (pointer, read_only)");
  }
  if (cai.contains("mask") && !cai["mask"].is_none()) value_error(name + ": masked arrays are not supported");
  for (int64_t s : a.shape)
    if (s < 0) value_error(name + ": negative extent in shape " + shape_str(a.shape));
  a.strides.assign(a.shape.size(), 0);
  if (!cai.contains("strides") || cai["strides"].is_none()) {
    int64_t st = 1;  // C-contiguous
    for (int i = a.ndim() - 1; i >= 0; --i) {
      a.strides[i] = st;
      st *= std::max<int64_t>(a.shape[i], 1);
    }
  } else {
    py::tuple st;
    try {
      st = cai["strides"].cast<py::tuple>();
    } catch (const py::cast_error&) {
      type_error(name + ": __cuda_array_interface__['strides'] must be a tuple or None");
    }
    if (int(st.size()) != a.ndim()) value_error(name + ": strides and shape differ in length");
    for (int i = 0; i < a.ndim(); ++i) {
      const int64_t bytes = st[i].cast<int64_t>();
      if (bytes % a.itemsize != 0)
        value_error(name + ": stride " + std::to_string(bytes) + " bytes of dim " + std::to_string(i) +
                    " is not a multiple of the element size");
      a.strides[i] = bytes / a.itemsize;
    }
  }
  if (a.numel() > 0 && a.ptr == 0) value_error(name + ": null data pointer");
  if (a.ptr % a.itemsize != 0) value_error(name + ": data pointer is not aligned to its element size");
  return a;
}

// Strides must equal `expected` on every dim of extent > 1 (extent-1 dims carry no layout).
void require_strides(const Array& a, const std::vector<int64_t>& expected, const std::string& layout) {
  for (int i = 0; i < a.ndim(); ++i) {
    if (a.shape[i] > 1 && a.strides[i] != expected[i])
      value_error(a.name + ": strides " + shape_str(a.strides) + " (elements) are not " + layout + " for shape " +
                  shape_str(a.shape) + "; expected " + shape_str(expected));
  }
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (int i = int(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return st;
}

// The pointer must be device (or managed) memory of `device`; needs a working CUDA runtime.
// cudaPointerGetAttributes costs ~1 us per call; callers that already know every array is device
// memory of `device` (ldm_engine.ops._cuda_backend: torch CUDA tensors whose .device it checked)
// pass check_pointers=False and skip it. Everything else (shapes, strides, alignment) is always checked.
void require_device_pointer(const Array& a, int device, bool check) {
  if (!check || a.numel() == 0) return;
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(a.ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(a.name + ": cannot inspect the pointer (" + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    value_error(a.name + ": pointer is not CUDA device memory");
  if (attr.device != device)
    value_error(a.name + ": lives on cuda:" + std::to_string(attr.device) + ", expected cuda:" + std::to_string(device));
}

void require_writable(const Array& a) {
  if (a.readonly) value_error(a.name + ": output array is read-only");
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(what + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the scope (the runtime's current device is per host thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
};

// ------------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)
// ------------------------------------------------------------------------------------------------
struct GnShape {
  int64_t n = 0, c = 0, s = 0;
  std::vector<int64_t> expected_strides;
  std::string layout;
};

GnShape gn_shape(const Array& x, bool channels_last) {
  GnShape g;
  const int nd = x.ndim();
  if (channels_last) {
    if (nd == 3) {  // (N, L, C), contiguous
      g.n = x.shape[0];
      g.s = x.shape[1];
      g.c = x.shape[2];
      g.expected_strides = contiguous_strides(x.shape);
      g.layout = "contiguous (N, L, C)";
    } else if (nd == 4) {  // (N, C, H, W) in channels_last memory
      g.n = x.shape[0];
      g.c = x.shape[1];
      g.s = x.shape[2] * x.shape[3];
      g.expected_strides = {g.s * g.c, 1, x.shape[3] * g.c, g.c};
      g.layout = "channels_last";
    } else {
      value_error(x.name + ": channels_last layout needs a 3-D (N, L, C) or 4-D (N, C, H, W) array, got shape " +
                  shape_str(x.shape));
    }
  } else {
    if (nd < 2) value_error(x.name + ": expected (N, C, *spatial), got shape " + shape_str(x.shape));
    g.n = x.shape[0];
    g.c = x.shape[1];
    g.s = 1;
    for (int i = 2; i < nd; ++i) g.s *= x.shape[i];
    g.expected_strides = contiguous_strides(x.shape);
    g.layout = "contiguous";
  }
  return g;
}

GnShape gn_check_x(const Array& x, int64_t num_groups, bool channels_last) {
  GnShape g = gn_shape(x, channels_last);
  require_strides(x, g.expected_strides, g.layout);
  if (num_groups <= 0) value_error("num_groups must be positive, got " + std::to_string(num_groups));
  if (g.c % num_groups != 0)
    value_error(x.name + ": " + std::to_string(g.c) + " channels are not divisible by num_groups=" +
                std::to_string(num_groups));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (g.c > kIntMax || g.n * num_groups > kIntMax || g.s > (int64_t(1) << 40))
    value_error(x.name + ": shape " + shape_str(x.shape) + " is too large");
  if (channels_last && g.n > 65535) value_error(x.name + ": batch above 65535 in channels_last layout");
  return g;
}

// sm_count: the device's multiprocessor count (0: unknown -> the fused plan wherever it fits).
int64_t group_norm_silu_workspace_size(py::handle x_obj, int64_t num_groups, bool channels_last,
                                       const std::string& dtype, int sm_count) {
  const Array x = parse_array(x_obj, "x", parse_dtype_name(dtype, "x"));
  const GnShape g = gn_check_x(x, num_groups, channels_last);
  const ldm::GroupNormPlan plan = ldm::group_norm_plan(g.n, g.c, g.s, int(num_groups), channels_last, x.dtype,
                                                       x.ptr % 16 == 0, sm_count);
  return plan.workspace_floats;
}

// weight / bias: C elements of `param_dtype`, which is x's dtype or float32 (read as fp32 by the
// kernels: no rounding of fp32 parameters to fp16 / bf16, no cast kernel, no allocation).
// Returns the parsed array (empty name when absent); its pointer is checked with the others.
Array check_param(const py::object& obj, const std::string& name, const Array& x, ldm::DType param_dtype, int64_t c,
                  const void** out) {
  *out = nullptr;
  if (obj.is_none()) return Array{};
  Array p = parse_array(obj, name, param_dtype);
  if (p.dtype != x.dtype && p.dtype != ldm::DType::kF32)
    type_error(name + ": dtype " + dtype_name(p.dtype) + " is neither x's " + dtype_name(x.dtype) + " nor float32");
  if (p.ndim() != 1 || p.shape[0] != c)
    value_error(name + ": expected shape (" + std::to_string(c) + ",), got " + shape_str(p.shape));
  if (c > 1 && p.strides[0] != 1) value_error(name + ": must be contiguous");
  *out = reinterpret_cast<const void*>(p.ptr);
  return p;
}

void group_norm_silu(py::handle x_obj, py::object weight, py::object bias, py::handle y_obj, py::object workspace,
                     int64_t num_groups, double eps, bool silu, bool channels_last, uintptr_t stream, int device,
                     const std::string& dtype, const std::string& param_dtype, int sm_count, bool check_pointers) {
  const ldm::DType dt = parse_dtype_name(dtype, "x");
  const ldm::DType pdt = parse_dtype_name(param_dtype, "weight/bias");
  const Array x = parse_array(x_obj, "x", dt);
  const Array y = parse_array(y_obj, "y", dt);
  const GnShape g = gn_check_x(x, num_groups, channels_last);
  if (y.shape != x.shape) value_error("y: shape " + shape_str(y.shape) + " differs from x's " + shape_str(x.shape));
  require_strides(y, g.expected_strides, g.layout);
  require_writable(y);
  if (!std::isfinite(eps) || eps < 0) value_error("eps must be finite and >= 0");
  if (device < 0) value_error("device must be a CUDA device index >= 0");
  if (sm_count < 0) value_error("sm_count must be >= 0");

  ldm::GroupNormArgs args;
  const Array w = check_param(weight, "weight", x, pdt, g.c, &args.weight);
  const Array b = check_param(bias, "bias", x, pdt, g.c, &args.bias);

  const ldm::GroupNormPlan plan = ldm::group_norm_plan(g.n, g.c, g.s, int(num_groups), channels_last, x.dtype,
                                                       x.ptr % 16 == 0 && y.ptr % 16 == 0, sm_count);
  float* ws_ptr = nullptr;
  Array ws;
  if (plan.workspace_floats > 0) {
    if (workspace.is_none())
      value_error("workspace: " + std::to_string(plan.workspace_floats) +
                  " float32 elements are required for this shape (group_norm_silu_workspace_size)");
    ws = parse_array(workspace, "workspace", ldm::DType::kF32);
    if (ws.numel() < plan.workspace_floats)
      value_error("workspace: " + std::to_string(ws.numel()) + " elements, " + std::to_string(plan.workspace_floats) +
                  " required");
    require_strides(ws, contiguous_strides(ws.shape), "contiguous");
    if (ws.ptr % 16 != 0) value_error("workspace: pointer must be 16-byte aligned");
    require_writable(ws);
    ws_ptr = reinterpret_cast<float*>(ws.ptr);
  }
  // Pointer queries last: every other check has passed by now.
  for (const Array* a : std::initializer_list<const Array*>{&x, &y, &w, &b, &ws})
    if (!a->name.empty()) require_device_pointer(*a, device, check_pointers);

  args.x = reinterpret_cast<const void*>(x.ptr);
  args.y = reinterpret_cast<void*>(y.ptr);
  args.workspace = ws_ptr;
  args.params_f32 = pdt == ldm::DType::kF32;
  args.n = g.n;
  args.c = g.c;
  args.s = g.s;
  args.groups = int(num_groups);
  args.eps = float(eps);
  args.silu = silu;
  args.channels_last = channels_last;
  args.dtype = x.dtype;
  DeviceGuard guard(device);
  check_cuda(ldm::group_norm_silu_launch(args, plan, reinterpret_cast<cudaStream_t>(stream)), "group_norm_silu launch");
}

// ------------------------------------------------------------------------------------------------
// Attention
// ------------------------------------------------------------------------------------------------
void attn_check_4d(const Array& a) {
  if (a.ndim() != 4) value_error(a.name + ": expected a 4-D array (B, H, L, D), got shape " + shape_str(a.shape));
  if (a.dtype == ldm::DType::kF32)
    type_error(a.name + ": float32 is not supported by the cuda attention (float16 or bfloat16)");
  if (a.shape[3] > 1 && a.strides[3] != 1) value_error(a.name + ": the head dim (last) must be contiguous");
  for (int i = 0; i < 3; ++i) {
    if (a.strides[i] < 0) value_error(a.name + ": negative strides are not supported");
    if (a.shape[i] > 1 && (a.strides[i] * a.itemsize) % 16 != 0)
      value_error(a.name + ": stride of dim " + std::to_string(i) + " (" + std::to_string(a.strides[i]) +
                  " elements) is not a multiple of 16 bytes");
  }
  if (a.ptr % 16 != 0) value_error(a.name + ": data pointer must be 16-byte aligned");
}

struct AttnShape {
  int b, h, lq, lk, d;
};

AttnShape attn_check(const Array& q, const Array& k, const Array* v, const Array* o) {
  attn_check_4d(q);
  attn_check_4d(k);
  if (k.shape[0] != q.shape[0] || k.shape[1] != q.shape[1] || k.shape[3] != q.shape[3])
    value_error("k: shape " + shape_str(k.shape) + " does not match q " + shape_str(q.shape) +
                " (expected (B, H, Lk, D))");
  if (v != nullptr) {
    attn_check_4d(*v);
    if (v->shape != k.shape) value_error("v: shape " + shape_str(v->shape) + " differs from k's " + shape_str(k.shape));
  }
  if (o != nullptr) {
    attn_check_4d(*o);
    if (o->shape != q.shape) value_error("o: shape " + shape_str(o->shape) + " differs from q's " + shape_str(q.shape));
    require_writable(*o);
  }
  const int64_t d = q.shape[3];
  if (d > 1024 || !ldm::attention_head_dim_supported(int(d)))
    value_error("q: head dim " + std::to_string(d) + " is not built (supported: 40, 64, 80, 128, 160, 512)");
  if (q.shape[2] < 1 || k.shape[2] < 1) value_error("q, k: sequence lengths must be >= 1");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (q.shape[2] > kIntMax / 2 || k.shape[2] > kIntMax / 2) value_error("q, k: sequence too long");
  if (q.shape[0] * q.shape[1] > 65535) value_error("q: batch * heads must be <= 65535");
  if (q.shape[0] < 1 || q.shape[1] < 1) value_error("q: batch and heads must be >= 1");
  return {int(q.shape[0]), int(q.shape[1]), int(q.shape[2]), int(k.shape[2]), int(d)};
}

py::tuple attention_plan(py::handle q_obj, py::handle k_obj, int device, const std::string& dtype) {
  const ldm::DType dt = parse_dtype_name(dtype, "q");
  const Array q = parse_array(q_obj, "q", dt);
  const Array k = parse_array(k_obj, "k", dt);
  const AttnShape s = attn_check(q, k, nullptr, nullptr);
  if (device < 0) value_error("device must be a CUDA device index >= 0");
  DeviceGuard guard(device);
  int splits = 1;
  check_cuda(ldm::attention_num_splits(s.b, s.h, s.lq, s.lk, s.d, q.dtype, device, &splits), "attention plan");
  return py::make_tuple(splits, ldm::attention_workspace_floats(s.b, s.h, s.lq, s.d, splits));
}

// CUDA runtime calls of attention and group_norm_silu, checked against the CUDA Runtime API
// reference (cudaStreamBeginCapture / cudaThreadExchangeStreamCaptureMode: what is unsafe during a
// capture is work outside the captured stream, allocation and synchronisation) -- none of these
// enqueues, allocates or synchronises: cudaGetDevice / cudaSetDevice (DeviceGuard; cudaSetDevice only
// when the device differs), cudaFuncSetAttribute (attention; first launch of a kernel on a device
// only, and ops warm up before a capture), cudaGetLastError, kernel launches on `stream`, and
// cudaPointerGetAttributes (skipped with check_pointers=False, as ops._cuda_backend passes for torch
// CUDA tensors). attention_plan's occupancy / attribute queries run once per shape, before a capture.
// Not yet run under capture on a GPU:
// tests/test_cuda_extension.py::test_gpu_ops_run_on_a_side_stream_and_in_a_cuda_graph will tell.
void attention(py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle o_obj, py::object workspace,
               double scale, int num_splits, uintptr_t stream, int device, const std::string& dtype,
               bool check_pointers) {
  const ldm::DType dt = parse_dtype_name(dtype, "q");
  const Array q = parse_array(q_obj, "q", dt);
  const Array k = parse_array(k_obj, "k", dt);
  const Array v = parse_array(v_obj, "v", dt);
  const Array o = parse_array(o_obj, "o", dt);
  const AttnShape s = attn_check(q, k, &v, &o);
  if (!std::isfinite(scale) || scale <= 0) value_error("scale must be finite and > 0");
  if (num_splits < 1 || num_splits > 64) value_error("num_splits must be in [1, 64]");
  if (device < 0) value_error("device must be a CUDA device index >= 0");
  float* ws_ptr = nullptr;
  if (num_splits > 1) {
    const int64_t need = ldm::attention_workspace_floats(s.b, s.h, s.lq, s.d, num_splits);
    if (workspace.is_none())
      value_error("workspace: num_splits > 1 needs " + std::to_string(need) + " float32 elements");
    const Array ws = parse_array(workspace, "workspace", ldm::DType::kF32);
    if (ws.numel() < need)
      value_error("workspace: " + std::to_string(ws.numel()) + " elements, " + std::to_string(need) + " required");
    require_strides(ws, contiguous_strides(ws.shape), "contiguous");
    if (ws.ptr % 16 != 0) value_error("workspace: pointer must be 16-byte aligned");
    require_writable(ws);
    require_device_pointer(ws, device, check_pointers);
    ws_ptr = reinterpret_cast<float*>(ws.ptr);
  }
  for (const Array* a : {&q, &k, &v, &o}) require_device_pointer(*a, device, check_pointers);

  ldm::AttentionArgs args;
  args.q = reinterpret_cast<const void*>(q.ptr);
  args.k = reinterpret_cast<const void*>(k.ptr);
  args.v = reinterpret_cast<const void*>(v.ptr);
  args.o = reinterpret_cast<void*>(o.ptr);
  args.workspace = ws_ptr;
  args.b = s.b;
  args.h = s.h;
  args.lq = s.lq;
  args.lk = s.lk;
  args.d = s.d;
  args.q_sb = q.strides[0]; args.q_sh = q.strides[1]; args.q_sl = q.strides[2];
  args.k_sb = k.strides[0]; args.k_sh = k.strides[1]; args.k_sl = k.strides[2];
  args.v_sb = v.strides[0]; args.v_sh = v.strides[1]; args.v_sl = v.strides[2];
  args.o_sb = o.strides[0]; args.o_sh = o.strides[1]; args.o_sl = o.strides[2];
  args.scale = float(scale);
  args.num_splits = ws_ptr != nullptr ? num_splits : 1;
  args.dtype = q.dtype;
  DeviceGuard guard(device);
  check_cuda(ldm::attention_launch(args, device, reinterpret_cast<cudaStream_t>(stream)), "attention launch");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ldm_engine CUDA kernels (pybind11; takes device pointers, shapes and a stream)";
  m.def("device_info", &device_info, "Build info and the CUDA devices visible to this process.");
  m.def("group_norm_silu_workspace_size", &group_norm_silu_workspace_size, py::arg("x"), py::arg("num_groups"),
        py::arg("channels_last"), py::kw_only(), py::arg("dtype"), py::arg("sm_count") = 0,
        "float32 elements of workspace group_norm_silu needs for x (0: none), assuming y is 16-byte aligned.");
  m.def("group_norm_silu", &group_norm_silu, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        py::arg("workspace"), py::arg("num_groups"), py::arg("eps"), py::arg("silu"), py::arg("channels_last"),
        py::arg("stream"), py::arg("device"), py::kw_only(), py::arg("dtype"), py::arg("param_dtype"),
        py::arg("sm_count") = 0, py::arg("check_pointers") = true,
        "y = silu(group_norm(x)) (silu optional). x, y: (N, C, *spatial) contiguous, or channels_last: (N, L, C) "
        "contiguous / (N, C, H, W) in channels_last memory. dtype: x's ('float16' | 'bfloat16' | 'float32'); "
        "param_dtype: weight's and bias's (x's dtype or 'float32'); sm_count: the device's multiprocessors (picks "
        "the plan). Launches on `stream` (a cudaStream_t as int).");
  m.def("attention_plan", &attention_plan, py::arg("q"), py::arg("k"), py::arg("device"), py::kw_only(),
        py::arg("dtype"), "(num_splits, workspace_floats) for attention on this device.");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("workspace"),
        py::arg("scale"), py::arg("num_splits"), py::arg("stream"), py::arg("device"), py::kw_only(),
        py::arg("dtype"), py::arg("check_pointers") = true,
        "o = softmax(q k^T * scale) v, non-causal; q, o (B, H, Lq, D), k, v (B, H, Lk, D); dtype 'float16' / "
        "'bfloat16' (declared by the caller); D in {40, 64, 80, 128, 160, 512}; head dim contiguous, other "
        "strides multiples of 16 bytes.");
}
