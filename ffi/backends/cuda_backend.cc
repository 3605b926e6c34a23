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
  ScopedContext scope(*this);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal_;
  cu_.check(cu_.cuMemGetAllocationGranularity(&granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity");
}

CudaBackend::~CudaBackend() {
  {
    ScopedContext scope(*this);
    if (tables_.capacity) cu_.cuMemFree(tables_.capacity);
    if (tables_.error) cu_.cuMemFree(tables_.error);
  }
  cu_.cuDevicePrimaryCtxRelease(device_);
}

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

void CudaBackend::mem_info(size_t* free_bytes, size_t* total_bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemGetInfo(free_bytes, total_bytes), "cuMemGetInfo");
}

uint64_t CudaBackend::tables_version() const {
  std::lock_guard<std::mutex> lock(tables_mu_);
  return tables_version_;
}

CudaBackend::Tables CudaBackend::tables(CUstream stream, const std::vector<int32_t>& capacity, uint64_t version) {
  std::lock_guard<std::mutex> lock(tables_mu_);
  ScopedContext scope(*this);
  const int64_t n = static_cast<int64_t>(capacity.size());
  if (!tables_.capacity) {
    cu_.check(cu_.cuMemAlloc(&tables_.capacity, n * sizeof(int32_t)), "cuMemAlloc(capacity table)");
    cu_.check(cu_.cuMemAlloc(&tables_.error, 4 * sizeof(int32_t)), "cuMemAlloc(error word)");
    cu_.check(cu_.cuMemsetD8Async(tables_.error, 0, 4 * sizeof(int32_t), stream), "cuMemsetD8Async");
    tables_size_ = n;
    tables_version_ = 0;
  }
  if (tables_version_ != version) {
    // Pageable source: the call returns once the data is staged, so `capacity`
    // may change afterwards; the copy is ordered on the stream before the kernel.
    cu_.check(cu_.cuMemcpyHtoDAsync(tables_.capacity, capacity.data(), n * sizeof(int32_t), stream),
              "cuMemcpyHtoDAsync(capacity table)");
    tables_version_ = version;
  }
  return tables_;
}

void CudaBackend::take_error(CUstream stream, int32_t out[4]) {
  std::lock_guard<std::mutex> lock(tables_mu_);
  out[0] = out[1] = out[2] = out[3] = 0;
  if (!tables_.error) return;
  ScopedContext scope(*this);
  if (!stream) cu_.check(cu_.cuCtxSynchronize(), "cuCtxSynchronize");
  cu_.check(cu_.cuMemcpyDtoHAsync(out, tables_.error, 4 * sizeof(int32_t), stream), "cuMemcpyDtoHAsync");
  cu_.check(cu_.cuStreamSynchronize(stream), "cuStreamSynchronize");
  if (out[0]) cu_.check(cu_.cuMemsetD8Async(tables_.error, 0, 4 * sizeof(int32_t), stream), "cuMemsetD8Async");
}

}  // namespace vattn
