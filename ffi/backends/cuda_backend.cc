#include "cuda_backend.h"

#include <string>

#include "../core/error.h"

namespace vattn {

// Makes the primary context current for the duration of a call, restoring the
// caller's context afterwards (Python threads have none; XLA threads have it).
class CudaBackend::ScopedContext {
 public:
  explicit ScopedContext(const CudaBackend& b) : cu_(b.cu_) {
    cu_.check(cu_.cuCtxGetCurrent(&prev_), "cuCtxGetCurrent");
    if (prev_ != b.ctx_) cu_.check(cu_.cuCtxSetCurrent(b.ctx_), "cuCtxSetCurrent"), switched_ = true;
  }
  ~ScopedContext() {
    if (switched_) cu_.cuCtxSetCurrent(prev_);
  }

 private:
  const CudaDriver& cu_;
  CUcontext prev_ = nullptr;
  bool switched_ = false;
};

CudaBackend::CudaBackend(int device_ordinal) : cu_(CudaDriver::get()), ordinal_(device_ordinal) {
  cu_.check(cu_.cuDeviceGet(&device_, ordinal_), "cuDeviceGet");
  cu_.check(cu_.cuDevicePrimaryCtxRetain(&ctx_, device_), "cuDevicePrimaryCtxRetain");
  try {
    ScopedContext scope(*this);
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal_;
    cu_.check(cu_.cuMemGetAllocationGranularity(&granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
              "cuMemGetAllocationGranularity");
  } catch (...) {
    cu_.cuDevicePrimaryCtxRelease(device_);  // the destructor does not run for a failed constructor
    throw;
  }
}

CudaBackend::~CudaBackend() { cu_.cuDevicePrimaryCtxRelease(device_); }

uintptr_t CudaBackend::reserve(size_t bytes, size_t alignment) {
  ScopedContext scope(*this);
  CUdeviceptr ptr = 0;
  cu_.check(cu_.cuMemAddressReserve(&ptr, bytes, alignment, 0, 0),
            ("cuMemAddressReserve(" + std::to_string(bytes) + " bytes)").c_str());
  return static_cast<uintptr_t>(ptr);
}

void CudaBackend::release(uintptr_t addr, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemAddressFree(static_cast<CUdeviceptr>(addr), bytes), "cuMemAddressFree");
}

PageHandle CudaBackend::create_page(size_t bytes) {
  if (take_create_fault()) throw Error(ErrorKind::kBackend, "cuda backend: injected create_page failure");
  ScopedContext scope(*this);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal_;
  CUmemGenericAllocationHandle h = 0;
  cu_.check(cu_.cuMemCreate(&h, bytes, &prop, 0), "cuMemCreate");
  return static_cast<PageHandle>(h);
}

void CudaBackend::destroy_page(PageHandle page, size_t) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(page)), "cuMemRelease");
}

void CudaBackend::map(uintptr_t addr, size_t bytes, PageHandle page) {
  if (take_map_fault()) throw Error(ErrorKind::kBackend, "cuda backend: injected map failure");
  ScopedContext scope(*this);
  const CUdeviceptr ptr = static_cast<CUdeviceptr>(addr);
  cu_.check(cu_.cuMemMap(ptr, bytes, 0, static_cast<CUmemGenericAllocationHandle>(page), 0), "cuMemMap");
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = ordinal_;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  CUresult r = cu_.cuMemSetAccess(ptr, bytes, &access, 1);
  if (r != CUDA_SUCCESS) {
    cu_.cuMemUnmap(ptr, bytes);
    cu_.check(r, "cuMemSetAccess");
  }
}

void CudaBackend::unmap(uintptr_t addr, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemUnmap(static_cast<CUdeviceptr>(addr), bytes), "cuMemUnmap");
}

void CudaBackend::synchronize() {
  ScopedContext scope(*this);
  cu_.check(cu_.cuCtxSynchronize(), "cuCtxSynchronize");
}

// -- DeviceMemory ----------------------------------------------------------

namespace {
CUstream as_stream(void* stream) { return static_cast<CUstream>(stream); }
}  // namespace

void CudaBackend::memory_info(size_t* free_bytes, size_t* total_bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemGetInfo(free_bytes, total_bytes), "cuMemGetInfo");
}

uintptr_t CudaBackend::allocate(size_t bytes) {
  ScopedContext scope(*this);
  CUdeviceptr ptr = 0;
  cu_.check(cu_.cuMemAlloc(&ptr, bytes), ("cuMemAlloc(" + std::to_string(bytes) + " bytes)").c_str());
  return static_cast<uintptr_t>(ptr);
}

void CudaBackend::deallocate(uintptr_t ptr) noexcept {
  try {
    ScopedContext scope(*this);
    cu_.cuMemFree(static_cast<CUdeviceptr>(ptr));
  } catch (...) {
    // Destructor path: a context that cannot be made current has nothing left to free.
  }
}

void CudaBackend::copy_to_device(void* stream, uintptr_t dst, const void* src, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemcpyHtoDAsync(static_cast<CUdeviceptr>(dst), src, bytes, as_stream(stream)),
            "cuMemcpyHtoDAsync");
}

void CudaBackend::copy_to_host(void* stream, void* dst, uintptr_t src, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemcpyDtoHAsync(dst, static_cast<CUdeviceptr>(src), bytes, as_stream(stream)),
            "cuMemcpyDtoHAsync");
}

void CudaBackend::copy_on_device(void* stream, uintptr_t dst, uintptr_t src, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemcpyDtoDAsync(static_cast<CUdeviceptr>(dst), static_cast<CUdeviceptr>(src), bytes,
                                  as_stream(stream)),
            "cuMemcpyDtoDAsync");
}

void CudaBackend::fill_zero(void* stream, uintptr_t dst, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemsetD8Async(static_cast<CUdeviceptr>(dst), 0, bytes, as_stream(stream)), "cuMemsetD8Async");
}

void CudaBackend::wait(void* stream) {
  ScopedContext scope(*this);
  if (stream)
    cu_.check(cu_.cuStreamSynchronize(as_stream(stream)), "cuStreamSynchronize");
  else
    cu_.check(cu_.cuCtxSynchronize(), "cuCtxSynchronize");
}

}  // namespace vattn
