#include "cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

#include "../core/error.h"

namespace vattn {
namespace {

using GetProcAddress = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);

// Returns an error message, empty on success.
std::string load(CudaDriver* d) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return std::string("cannot load libcuda.so.1: ") + dlerror();
  auto get_proc = reinterpret_cast<GetProcAddress>(dlsym(lib, "cuGetProcAddress_v2"));
  if (!get_proc) return "libcuda.so.1 has no cuGetProcAddress_v2 (driver older than CUDA 12)";
  std::string missing;
  auto resolve = [&](const char* name, auto* fn) {
    void* p = nullptr;
    CUdriverProcAddressQueryResult status;
    // Request the CUDA 12.0 ABI of each entry point: every call used here has it.
    if (get_proc(name, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS || !p)
      missing += std::string(" ") + name;
    *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(p);
  };
#define VATTN_RESOLVE(name) resolve(#name, &d->name);
  VATTN_RESOLVE(cuInit)
  VATTN_RESOLVE(cuGetErrorString)
  VATTN_RESOLVE(cuDeviceGet)
  VATTN_RESOLVE(cuDevicePrimaryCtxRetain)
  VATTN_RESOLVE(cuDevicePrimaryCtxRelease)
  VATTN_RESOLVE(cuCtxGetCurrent)
  VATTN_RESOLVE(cuCtxSetCurrent)
  VATTN_RESOLVE(cuCtxSynchronize)
  VATTN_RESOLVE(cuMemGetInfo)
  VATTN_RESOLVE(cuMemGetAllocationGranularity)
  VATTN_RESOLVE(cuMemAddressReserve)
  VATTN_RESOLVE(cuMemAddressFree)
  VATTN_RESOLVE(cuMemCreate)
  VATTN_RESOLVE(cuMemRelease)
  VATTN_RESOLVE(cuMemMap)
  VATTN_RESOLVE(cuMemSetAccess)
  VATTN_RESOLVE(cuMemUnmap)
  VATTN_RESOLVE(cuMemAlloc)
  VATTN_RESOLVE(cuMemFree)
  VATTN_RESOLVE(cuMemcpyHtoDAsync)
  VATTN_RESOLVE(cuMemcpyDtoHAsync)
  VATTN_RESOLVE(cuMemcpyDtoDAsync)
  VATTN_RESOLVE(cuMemsetD8Async)
  VATTN_RESOLVE(cuStreamSynchronize)
#undef VATTN_RESOLVE
  if (!missing.empty()) return "libcuda.so.1 lacks:" + missing;
  CUresult r = d->cuInit(0);
  if (r != CUDA_SUCCESS) return "cuInit failed with CUresult " + std::to_string(static_cast<int>(r));
  return "";
}

struct Loaded {
  CudaDriver driver;
  std::string error;
};

const Loaded& loaded() {
  static Loaded* l = [] {
    auto* x = new Loaded();  // never freed: other threads may still use the table at exit
    x->error = load(&x->driver);
    return x;
  }();
  return *l;
}

}  // namespace

const CudaDriver& CudaDriver::get() {
  const Loaded& l = loaded();
  if (!l.error.empty()) throw Error(ErrorKind::kBackend, "CUDA driver unavailable: " + l.error);
  return l.driver;
}

bool CudaDriver::available() { return loaded().error.empty(); }

void CudaDriver::check(CUresult r, const char* what) const {
  if (r == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  if (cuGetErrorString) cuGetErrorString(r, &msg);
  throw Error(ErrorKind::kBackend, std::string(what) + " failed: " + (msg ? msg : "unknown CUDA error") +
                                       " (CUresult " + std::to_string(static_cast<int>(r)) + ")");
}

}  // namespace vattn
