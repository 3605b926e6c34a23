#include "cuda_backend.h"

#include <string>
#include <vector>

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

CUmemAccessDesc CudaBackend::access(CUmemAccess_flags flags) const {
  CUmemAccessDesc desc = {};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = ordinal_;
  desc.flags = flags;
  return desc;
}

CudaBackend::CudaBackend(int device_ordinal, UnbackedReads unbacked_reads)
    : cu_(CudaDriver::get()), ordinal_(device_ordinal), unbacked_reads_(unbacked_reads) {
  cu_.check(cu_.cuDeviceGet(&device_, ordinal_), "cuDeviceGet");
  cu_.check(cu_.cuDevicePrimaryCtxRetain(&ctx_, device_), "cuDevicePrimaryCtxRetain");
  try {
    ScopedContext scope(*this);
    const CUmemAllocationProp prop = page_prop();
    cu_.check(cu_.cuMemGetAllocationGranularity(&granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
              "cuMemGetAllocationGranularity");
  } catch (...) {
    cu_.cuDevicePrimaryCtxRelease(device_);  // the destructor does not run for a failed constructor
    throw;
  }
}

CudaBackend::~CudaBackend() {
  // The manager releases every reservation before its backend dies; this only
  // gives back what a failed release() left behind (kZeros keeps the record).
  if (!reservations_.empty() || has_zero_page_) {
    try {
      ScopedContext scope(*this);
      for (const auto& [base, r] : reservations_) {
        for (size_t i = 0; i < r.zero_mapped.size(); ++i)
          if (r.zero_mapped[i]) cu_.cuMemUnmap(static_cast<CUdeviceptr>(base + i * zero_page_bytes_), zero_page_bytes_);
        cu_.cuMemAddressFree(static_cast<CUdeviceptr>(base), r.bytes);
      }
      reservations_.clear();
      destroy_zero_page();
    } catch (...) {
      // No context to make current: the driver is going away with everything in it.
    }
  }
  cu_.cuDevicePrimaryCtxRelease(device_);
}

CUmemAllocationProp CudaBackend::page_prop() const {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal_;
  return prop;
}

// -- MemoryBackend ----------------------------------------------------------

uintptr_t CudaBackend::reserve(size_t bytes, size_t page_bytes) {
  ScopedContext scope(*this);
  CUdeviceptr ptr = 0;
  cu_.check(cu_.cuMemAddressReserve(&ptr, bytes, page_bytes, 0, 0),
            ("cuMemAddressReserve(" + std::to_string(bytes) + " bytes)").c_str());
  if (unbacked_reads_ != UnbackedReads::kZeros) return static_cast<uintptr_t>(ptr);
  try {
    if (page_bytes == 0 || bytes % page_bytes != 0)
      throw Error(ErrorKind::kInvalidArgument, "cuda backend: a reservation of " + std::to_string(bytes) +
                                                   " bytes is not whole pages of " + std::to_string(page_bytes));
    if (!has_zero_page_)
      create_zero_page(page_bytes);
    else if (page_bytes != zero_page_bytes_)
      throw Error(ErrorKind::kInvalidArgument, "cuda backend: page_bytes " + std::to_string(page_bytes) +
                                                   " differs from the zero page's " + std::to_string(zero_page_bytes_));
  } catch (...) {
    cu_.cuMemAddressFree(ptr, bytes);
    if (reservations_.empty()) destroy_zero_page();
    throw;
  }
  const size_t pages = bytes / page_bytes;
  // One access call for the whole reservation (the zero page mapped at every page of it): a cuMemSetAccess
  // per page costs about 36 us on an H200, one over 16384 pages about 5 ms.
  const CUresult res = map_zero_run(ptr, pages);
  if (res != CUDA_SUCCESS) {
    cu_.cuMemAddressFree(ptr, bytes);
    if (reservations_.empty()) destroy_zero_page();
    cu_.check(res, "cuMemMap/cuMemSetAccess of the zero page");
  }
  Reservation& r = reservations_[static_cast<uintptr_t>(ptr)];
  r.bytes = bytes;
  r.zero_mapped.assign(pages, 1);
  return static_cast<uintptr_t>(ptr);
}

void CudaBackend::release(uintptr_t addr, size_t bytes) {
  ScopedContext scope(*this);
  const CUdeviceptr ptr = static_cast<CUdeviceptr>(addr);
  auto it = reservations_.find(addr);
  if (it != reservations_.end()) {  // kZeros: unmap the zero page wherever it is mapped
    CUresult first_error = CUDA_SUCCESS;
    std::vector<uint8_t>& zero_mapped = it->second.zero_mapped;
    for (size_t i = 0; i < zero_mapped.size(); ++i) {
      if (!zero_mapped[i]) continue;
      const CUresult u = cu_.cuMemUnmap(ptr + i * zero_page_bytes_, zero_page_bytes_);
      if (u == CUDA_SUCCESS)
        zero_mapped[i] = 0;
      else if (first_error == CUDA_SUCCESS)
        first_error = u;
    }
    cu_.check(first_error, "cuMemUnmap (zero page)");  // the record stays; the destructor retries
  }
  cu_.check(cu_.cuMemAddressFree(ptr, bytes), "cuMemAddressFree");
  if (it != reservations_.end()) {
    reservations_.erase(it);
    if (reservations_.empty()) destroy_zero_page();
  }
}

PageHandle CudaBackend::create_page(size_t bytes) {
  if (take_create_fault()) throw Error(ErrorKind::kBackend, "cuda backend: injected create_page failure");
  ScopedContext scope(*this);
  const CUmemAllocationProp prop = page_prop();
  CUmemGenericAllocationHandle h = 0;
  cu_.check(cu_.cuMemCreate(&h, bytes, &prop, 0), "cuMemCreate");
  return static_cast<PageHandle>(h);
}

void CudaBackend::destroy_page(PageHandle page, size_t) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemRelease(static_cast<CUmemGenericAllocationHandle>(page)), "cuMemRelease");
}

void CudaBackend::map(uintptr_t addr, size_t bytes, PageHandle page) { map_run(addr, bytes, &page, 1); }

// cuMemMap of each page of the run, then ONE cuMemSetAccess over the whole run.
// The driver allows an access range that spans several mappings (of different
// allocations) as long as every byte of it is mapped: cuMemSetAccess fails on a
// range with an unmapped hole, which cannot happen here, since the run is set
// only after all of its cuMemMap calls succeeded. Measured on an H200 per 2 MiB
// page: cuMemMap 2.2 us, cuMemSetAccess 36.5 us, but one cuMemSetAccess over
// 16384 pages took 4.8 ms (0.3 us a page), so a grow of several pages of a
// slot pays the access call once per tensor, not once per page.
// In kZeros mode the zero pages of the run are unmapped first (cuMemMap needs
// free VA) and mapped back if anything fails; a failure (injected ones too, one
// per page of the run) unmaps what the run had mapped, so nothing of it stays.
void CudaBackend::map_run(uintptr_t addr, size_t page_bytes, const PageHandle* pages, size_t n) {
  if (n == 0) return;
  ScopedContext scope(*this);
  const bool zeros = unbacked_reads_ == UnbackedReads::kZeros;
  const CUdeviceptr ptr = static_cast<CUdeviceptr>(addr);
  const size_t bytes = n * page_bytes;
  if (zeros) remove_zero_pages(addr, bytes);  // the VA must be free before cuMemMap
  size_t mapped = 0;
  bool injected = false;
  CUresult r = CUDA_SUCCESS;
  const char* what = "cuMemMap";
  for (; mapped < n; ++mapped) {
    if (take_map_fault()) {  // one injected failure per page, where a cuMemMap failure would be
      injected = true;
      break;
    }
    r = cu_.cuMemMap(ptr + mapped * page_bytes, page_bytes, 0, static_cast<CUmemGenericAllocationHandle>(pages[mapped]),
                     0);
    if (r != CUDA_SUCCESS) break;
  }
  if (!injected && r == CUDA_SUCCESS) {
    const CUmemAccessDesc rw = access(CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    r = cu_.cuMemSetAccess(ptr, bytes, &rw, 1);
    what = "cuMemSetAccess";
    if (r == CUDA_SUCCESS) return;
  }
  for (size_t i = mapped; i > 0; --i) cu_.cuMemUnmap(ptr + (i - 1) * page_bytes, page_bytes);
  if (zeros) restore_zero_pages(addr, bytes);
  if (injected) throw Error(ErrorKind::kBackend, "cuda backend: injected map failure");
  cu_.check(r, what);
}

void CudaBackend::unmap(uintptr_t addr, size_t bytes) {
  ScopedContext scope(*this);
  cu_.check(cu_.cuMemUnmap(static_cast<CUdeviceptr>(addr), bytes), "cuMemUnmap");
  if (unbacked_reads_ == UnbackedReads::kZeros) restore_zero_pages(addr, bytes);  // reads give zeros again
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
