// Shared by the CPU and CUDA handlers: exception-to-ffi::Error conversion and
// the argument checks both platforms make before touching memory.
#pragma once

#include <exception>
#include <string>

#include "../core/cache_manager.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace vattn {

namespace ffi = xla::ffi;

// Aliases keep commas out of the XLA_FFI_DEFINE_HANDLER_SYMBOL macro arguments.
using I32Vec = ffi::Buffer<ffi::S32, 1>;     // [B] int32
using I32Out = ffi::ResultBuffer<ffi::S32, 1>;

// Runs `body`, turning any exception into an ffi::Error whose message starts
// with the Python class name (errors raised inside jit arrive as text only).
template <typename F>
ffi::Error guarded(const char* op, F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const Error& e) {
    ffi::ErrorCode code = ffi::ErrorCode::kInternal;
    switch (e.kind()) {
      case ErrorKind::kInvalidArgument: code = ffi::ErrorCode::kInvalidArgument; break;
      case ErrorKind::kSlotState: code = ffi::ErrorCode::kFailedPrecondition; break;
      case ErrorKind::kPoolExhausted: code = ffi::ErrorCode::kResourceExhausted; break;
      case ErrorKind::kClosed: code = ffi::ErrorCode::kFailedPrecondition; break;
      case ErrorKind::kBackend: code = ffi::ErrorCode::kInternal; break;
    }
    // Core messages usually name the operation already ("grow: slot 3 ..."); don't repeat it.
    const std::string what = e.what(), prefix = std::string(op) + ":";
    const std::string body = what.rfind(prefix, 0) == 0 ? what : prefix + " " + what;
    return ffi::Error(code, std::string(e.python_name()) + ": " + body);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("VAttentionError: ") + op + ": " + e.what());
  }
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw Error(ErrorKind::kInvalidArgument, message);
}

// Rows of one grow call: slots and lengths are both [B].
inline int64_t check_grow_args(const I32Vec& slots, const I32Vec& lengths) {
  const int64_t n = static_cast<int64_t>(slots.element_count());
  require(static_cast<int64_t>(lengths.element_count()) == n, "slots and lengths must have the same shape [B]");
  return n;
}

// Shape of one write call: k_new / v_new are [B, T, kv_heads, head_dim].
struct WriteShape {
  int64_t batch = 0, tokens = 0;
};

inline WriteShape check_write_args(const CacheLayout& L, int64_t layer, const ffi::AnyBuffer& k,
                                   const ffi::AnyBuffer& v, const I32Vec& slots, const I32Vec& starts,
                                   const I32Vec& counts) {
  require(layer >= 0 && layer < L.num_layers,
          "layer " + std::to_string(layer) + " is out of range [0, " + std::to_string(L.num_layers) + ")");
  auto dk = k.dimensions(), dv = v.dimensions();
  require(dk.size() == 4 && dv.size() == 4, "k_new and v_new must be rank 4 [B, T, kv_heads, head_dim]");
  for (int i = 0; i < 4; ++i) require(dk[i] == dv[i], "k_new and v_new shapes differ");
  require(dk[2] == L.kv_heads && dk[3] == L.head_dim,
          "k_new has kv_heads x head_dim = " + std::to_string(dk[2]) + " x " + std::to_string(dk[3]) +
              ", cache has " + std::to_string(L.kv_heads) + " x " + std::to_string(L.head_dim));
  require(static_cast<int64_t>(ffi::ByteWidth(k.element_type())) == L.itemsize &&
              k.element_type() == v.element_type(),
          "k_new/v_new element size does not match the cache dtype");
  const int64_t b = dk[0];
  require(static_cast<int64_t>(slots.element_count()) == b && static_cast<int64_t>(starts.element_count()) == b &&
              static_cast<int64_t>(counts.element_count()) == b,
          "slots, starts and counts must all have shape [B] with B = k_new.shape[0]");
  return {b, dk[1]};
}

}  // namespace vattn
