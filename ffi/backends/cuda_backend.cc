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

namespace {

CUmemAccessDesc access_desc(int ordinal, CUmemAccess_flags flags) {
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = ordinal;
  access.flags = flags;
  return access;
}

}  // namespace

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

// -- kZeros: the read-only zero page ----------------------------------------

void CudaBackend::create_zero_page(size_t page_bytes) {
  const CUmemAllocationProp prop = page_prop();
  CUmemGenericAllocationHandle h = 0;
  cu_.check(cu_.cuMemCreate(&h, page_bytes, &prop, 0), "cuMemCreate (zero page)");
  // cuMemCreate does not clear memory: zero it once through a temporary
  // read-write mapping, then drop that mapping (the handle keeps the memory).
  CUdeviceptr scratch = 0;
  bool reserved = false, mapped = false;
  const char* what = "cuMemAddressReserve (zero page)";
  CUresult r = cu_.cuMemAddressReserve(&scratch, page_bytes, page_bytes, 0, 0);
  reserved = r == CUDA_SUCCESS;
  if (r == CUDA_SUCCESS) {
    what = "cuMemMap (zero page)";
    r = cu_.cuMemMap(scratch, page_bytes, 0, h, 0);
    mapped = r == CUDA_SUCCESS;
  }
  if (r == CUDA_SUCCESS) {
    what = "cuMemSetAccess (zero page, read-write)";
    const CUmemAccessDesc rw = access_desc(ordinal_, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    r = cu_.cuMemSetAccess(scratch, page_bytes, &rw, 1);
  }
  if (r == CUDA_SUCCESS) {
    what = "cuMemsetD8Async (zero page)";
    r = cu_.cuMemsetD8Async(scratch, 0, page_bytes, nullptr);
  }
  if (r == CUDA_SUCCESS) {
    what = "cuStreamSynchronize (zero page)";
    r = cu_.cuStreamSynchronize(nullptr);  // the memset is done before any mapping can be read
  }
  if (mapped) {
    const CUresult u = cu_.cuMemUnmap(scratch, page_bytes);
    if (r == CUDA_SUCCESS) r = u, what = "cuMemUnmap (zero page scratch)";
  }
  if (reserved) {
    const CUresult f = cu_.cuMemAddressFree(scratch, page_bytes);
    if (r == CUDA_SUCCESS) r = f, what = "cuMemAddressFree (zero page scratch)";
  }
  if (r != CUDA_SUCCESS) {
    cu_.cuMemRelease(h);
    cu_.check(r, what);
  }
  zero_page_ = h;
  zero_page_bytes_ = page_bytes;
  has_zero_page_ = true;
}

void CudaBackend::destroy_zero_page() noexcept {
  if (!has_zero_page_) return;
  cu_.cuMemRelease(zero_page_);  // every mapping of it is gone by now
  has_zero_page_ = false;
  zero_page_ = 0;
  zero_page_bytes_ = 0;
}

CUresult CudaBackend::map_zero_page(CUdeviceptr ptr) const {
  CUresult r = cu_.cuMemMap(ptr, zero_page_bytes_, 0, zero_page_, 0);
  if (r != CUDA_SUCCESS) return r;
  // Access is per mapping: every new mapping starts inaccessible, and this one is read-only.
  const CUmemAccessDesc ro = access_desc(ordinal_, CU_MEM_ACCESS_FLAGS_PROT_READ);
  r = cu_.cuMemSetAccess(ptr, zero_page_bytes_, &ro, 1);
  if (r != CUDA_SUCCESS) cu_.cuMemUnmap(ptr, zero_page_bytes_);
  return r;
}

CudaBackend::Reservation& CudaBackend::reservation_of(uintptr_t addr, size_t bytes, size_t* first_page) {
  auto it = reservations_.upper_bound(addr);
  if (it != reservations_.begin()) {
    --it;
    const uintptr_t base = it->first;
    const size_t z = zero_page_bytes_;
    if (z != 0 && bytes != 0 && addr >= base && bytes <= it->second.bytes && addr - base <= it->second.bytes - bytes &&
        (addr - base) % z == 0 && bytes % z == 0) {
      *first_page = (addr - base) / z;
      return it->second;
    }
  }
  throw Error(ErrorKind::kBackend, "cuda backend: [" + std::to_string(addr) + ", +" + std::to_string(bytes) +
                                       ") is not whole pages of a reservation");
}

void CudaBackend::remove_zero_pages(uintptr_t addr, size_t bytes) {
  size_t first = 0;
  Reservation& r = reservation_of(addr, bytes, &first);
  const size_t z = zero_page_bytes_;
  for (size_t i = 0; i < bytes / z; ++i) {
    if (!r.zero_mapped[first + i]) continue;  // a failed restore left it unmapped
    const CUresult u = cu_.cuMemUnmap(static_cast<CUdeviceptr>(addr + i * z), z);
    if (u != CUDA_SUCCESS) {
      restore_zero_pages(addr, i * z);
      cu_.check(u, "cuMemUnmap (zero page)");
    }
    r.zero_mapped[first + i] = 0;
  }
}

void CudaBackend::restore_zero_pages(uintptr_t addr, size_t bytes) noexcept {
  if (bytes == 0) return;
  try {
    size_t first = 0;
    Reservation& r = reservation_of(addr, bytes, &first);
    const size_t z = zero_page_bytes_;
    for (size_t i = 0; i < bytes / z; ++i)
      if (!r.zero_mapped[first + i] && map_zero_page(static_cast<CUdeviceptr>(addr + i * z)) == CUDA_SUCCESS)
        r.zero_mapped[first + i] = 1;
  } catch (...) {
    // Not a reservation of ours: nothing to restore.
  }
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
  Reservation& r = reservations_[static_cast<uintptr_t>(ptr)];
  r.bytes = bytes;
  r.zero_mapped.assign(pages, 0);
  for (size_t i = 0; i < pages; ++i) {
    const CUresult res = map_zero_page(ptr + i * page_bytes);
    if (res != CUDA_SUCCESS) {
      for (size_t j = 0; j < i; ++j) cu_.cuMemUnmap(ptr + j * page_bytes, page_bytes);
      reservations_.erase(static_cast<uintptr_t>(ptr));
      cu_.cuMemAddressFree(ptr, bytes);
      if (reservations_.empty()) destroy_zero_page();
      cu_.check(res, "cuMemMap/cuMemSetAccess of the zero page");
    }
    r.zero_mapped[i] = 1;
  }
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

void CudaBackend::map(uintptr_t addr, size_t bytes, PageHandle page) {
  if (take_map_fault()) throw Error(ErrorKind::kBackend, "cuda backend: injected map failure");
  ScopedContext scope(*this);
  const bool zeros = unbacked_reads_ == UnbackedReads::kZeros;
  const CUdeviceptr ptr = static_cast<CUdeviceptr>(addr);
  if (zeros) remove_zero_pages(addr, bytes);  // the VA must be free before cuMemMap
  CUresult r = cu_.cuMemMap(ptr, bytes, 0, static_cast<CUmemGenericAllocationHandle>(page), 0);
  if (r != CUDA_SUCCESS) {
    if (zeros) restore_zero_pages(addr, bytes);
    cu_.check(r, "cuMemMap");
  }
  const CUmemAccessDesc rw = access_desc(ordinal_, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
  r = cu_.cuMemSetAccess(ptr, bytes, &rw, 1);
  if (r != CUDA_SUCCESS) {
    cu_.cuMemUnmap(ptr, bytes);
    if (zeros) restore_zero_pages(addr, bytes);
    cu_.check(r, "cuMemSetAccess");
  }
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
