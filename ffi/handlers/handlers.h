// Handler symbols exported to the bindings' registrations() dict.
#pragma once

#include "xla/ffi/api/c_api.h"

namespace vattn {

extern "C" XLA_FFI_Error* kGrowCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* kWriteCpu(XLA_FFI_CallFrame* call_frame);
#ifdef VATTN_WITH_CUDA
extern "C" XLA_FFI_Error* kGrowCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* kWriteCuda(XLA_FFI_CallFrame* call_frame);
#endif

}  // namespace vattn
