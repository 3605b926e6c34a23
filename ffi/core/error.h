// Errors raised by the core and the backends. The FFI handlers turn them into
// ffi::Error, the bindings into the Python classes of jax_vattention.errors.
#pragma once

#include <stdexcept>
#include <string>

namespace vattn {

enum class ErrorKind {
  kInvalidArgument,  // bad shape, range or configuration (ValueError in Python)
  kSlotState,        // slot not allocated, double free, no free slot
  kPoolExhausted,    // the physical page budget cannot cover a grow
  kClosed,           // use after close()
  kBackend,          // a memory API (cuMem*, mmap) failed
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }
  // The Python class name, used as a message prefix where only text survives
  // (errors raised inside jit arrive as JaxRuntimeError).
  const char* python_name() const {
    switch (kind_) {
      case ErrorKind::kInvalidArgument: return "CacheValueError";
      case ErrorKind::kSlotState: return "SlotStateError";
      case ErrorKind::kPoolExhausted: return "PoolExhaustedError";
      case ErrorKind::kClosed: return "CacheClosedError";
      case ErrorKind::kBackend: return "BackendError";
    }
    return "VAttentionError";
  }

 private:
  ErrorKind kind_;
};

}  // namespace vattn
