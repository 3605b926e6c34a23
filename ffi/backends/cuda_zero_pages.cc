// CudaBackend, kZeros mode: one read-only physical page of zeros mapped at
// every unbacked page of every reservation, and its bookkeeping (which pages
// of a reservation hold it now). See cuda_backend.h; reserve / release /
// map_run / unmap call these.
#include <string>

#include "../core/error.h"
#include "cuda_backend.h"

namespace vattn {

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
    const CUmemAccessDesc rw = access(CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
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

CUresult CudaBackend::map_zero_run(CUdeviceptr ptr, size_t n) const {
  const size_t z = zero_page_bytes_;
  size_t mapped = 0;
  CUresult r = CUDA_SUCCESS;
  for (; mapped < n; ++mapped) {
    r = cu_.cuMemMap(ptr + mapped * z, z, 0, zero_page_, 0);
    if (r != CUDA_SUCCESS) break;
  }
  // Access is per mapping: every new mapping starts inaccessible, and these are read-only. One call covers
  // the run (legal because every byte of it is mapped; see map_run).
  if (r == CUDA_SUCCESS && n > 0) {
    const CUmemAccessDesc ro = access(CU_MEM_ACCESS_FLAGS_PROT_READ);
    r = cu_.cuMemSetAccess(ptr, n * z, &ro, 1);
  }
  if (r != CUDA_SUCCESS)
    for (size_t i = mapped; i > 0; --i) cu_.cuMemUnmap(ptr + (i - 1) * z, z);
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
    const size_t z = zero_page_bytes_, pages = bytes / z;
    for (size_t i = 0; i < pages;) {  // each maximal run of pages without the zero page: one map_zero_run
      if (r.zero_mapped[first + i]) {
        ++i;
        continue;
      }
      size_t end = i;
      while (end < pages && !r.zero_mapped[first + end]) ++end;
      const CUdeviceptr run = static_cast<CUdeviceptr>(addr + i * z);
      if (map_zero_run(run, end - i) == CUDA_SUCCESS) {
        for (size_t j = i; j < end; ++j) r.zero_mapped[first + j] = 1;
      } else {  // page by page, so one refused page leaves only itself unmapped
        for (size_t j = i; j < end; ++j)
          if (map_zero_run(static_cast<CUdeviceptr>(addr + j * z), 1) == CUDA_SUCCESS) r.zero_mapped[first + j] = 1;
      }
      i = end;
    }
  } catch (...) {
    // Not a reservation of ours: nothing to restore.
  }
}

}  // namespace vattn
