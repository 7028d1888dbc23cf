// The Python binding of ldm_engine._C: every op's input checks live here, before any launch.
// Kernels take device pointers, shapes and a stream (see the .cu files), so this module links
// the CUDA runtime and pybind11 only -- never PyTorch's C++ library.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ldm_engine CUDA kernels (pybind11; takes device pointers, shapes and a stream)";
  m.def("device_info", &device_info, "Build info and the CUDA devices visible to this process.");
  // Ops (group_norm_silu, attention) are bound here, each after its input checks.
}
