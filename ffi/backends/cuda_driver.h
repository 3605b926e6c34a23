// The CUDA driver API, loaded at run time with dlopen so that the extension
// imports (and the host backend works) on machines without a GPU or driver.
// cuda.h is used for types and declarations only; nothing links libcuda.
#pragma once

#include <cuda.h>

#include <string>

namespace vattn {

struct CudaDriver {
#define VATTN_CU_FN(name) decltype(&::name) name = nullptr;
  VATTN_CU_FN(cuInit)
  VATTN_CU_FN(cuGetErrorString)
  VATTN_CU_FN(cuDeviceGet)
  VATTN_CU_FN(cuDevicePrimaryCtxRetain)
  VATTN_CU_FN(cuDevicePrimaryCtxRelease)
  VATTN_CU_FN(cuCtxGetCurrent)
  VATTN_CU_FN(cuCtxSetCurrent)
  VATTN_CU_FN(cuCtxSynchronize)
  VATTN_CU_FN(cuMemGetInfo)
  VATTN_CU_FN(cuMemGetAllocationGranularity)
  VATTN_CU_FN(cuMemAddressReserve)
  VATTN_CU_FN(cuMemAddressFree)
  VATTN_CU_FN(cuMemCreate)
  VATTN_CU_FN(cuMemRelease)
  VATTN_CU_FN(cuMemMap)
  VATTN_CU_FN(cuMemSetAccess)
  VATTN_CU_FN(cuMemUnmap)
  VATTN_CU_FN(cuMemAlloc)
  VATTN_CU_FN(cuMemFree)
  VATTN_CU_FN(cuMemcpyHtoDAsync)
  VATTN_CU_FN(cuMemcpyDtoHAsync)
  VATTN_CU_FN(cuMemcpyDtoDAsync)
  VATTN_CU_FN(cuMemsetD8Async)
  VATTN_CU_FN(cuStreamSynchronize)
#undef VATTN_CU_FN

  // Loads libcuda once per process; throws Error(kBackend) if unavailable.
  static const CudaDriver& get();
  // Whether a driver can be loaded (never throws).
  static bool available();
  // Throws Error(kBackend) naming `what` when `r` is not CUDA_SUCCESS.
  void check(CUresult r, const char* what) const;
};

}  // namespace vattn
