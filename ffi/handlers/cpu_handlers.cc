// XLA FFI handlers for the CPU platform (host backend). Buffers are host
// memory, so every row is validated against the manager before any byte moves.
#include <cstring>
#include <vector>

#include "common.h"
#include "handlers.h"

namespace vattn {
namespace {

ffi::Error GrowCpu(uint64_t manager_id, I32Vec slots, I32Vec lengths,
                   I32Out out) {
  return guarded("grow", [&] {
    auto m = ManagerRegistry::instance().find(manager_id);
    const int64_t n = static_cast<int64_t>(slots.element_count());
    require(static_cast<int64_t>(lengths.element_count()) == n, "slots and lengths must have the same shape [B]");
    m->grow(slots.typed_data(), lengths.typed_data(), n);
    std::memcpy(out->typed_data(), lengths.typed_data(), n * sizeof(int32_t));
  });
}

ffi::Error WriteCpu(uint64_t manager_id, int64_t layer, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                    I32Vec slots, I32Vec starts,
                    I32Vec counts, I32Out out) {
  return guarded("write", [&] {
    auto m = ManagerRegistry::instance().find(manager_id);
    const auto access = m->memory_access();  // close() cannot unmap until the copies are done
    const CacheLayout& L = m->layout();
    const WriteShape ws = check_write_args(L, layer, k_new, v_new, slots.element_count(), starts.element_count(),
                                           counts.element_count());
    const int32_t* s = slots.typed_data();
    const int32_t* st = starts.typed_data();
    const int32_t* c = counts.typed_data();
    // Validate all rows first: a bad row must not leave a half-written batch.
    for (int64_t b = 0; b < ws.batch; ++b) {
      if (s[b] < 0) continue;
      require(c[b] >= 0 && c[b] <= ws.tokens, "write: counts[" + std::to_string(b) + "] = " + std::to_string(c[b]) +
                                                  " is outside [0, T=" + std::to_string(ws.tokens) + "]");
      m->check_write(s[b], st[b], c[b]);
    }
    const uintptr_t kb = m->tensor_base(layer, 0), vb = m->tensor_base(layer, 1);
    const auto* ksrc = static_cast<const uint8_t*>(k_new.untyped_data());
    const auto* vsrc = static_cast<const uint8_t*>(v_new.untyped_data());
    int32_t* o = out->typed_data();
    for (int64_t b = 0; b < ws.batch; ++b) {
      o[b] = st[b];
      if (s[b] < 0) continue;
      const int64_t dst = s[b] * L.slot_bytes + int64_t{st[b]} * L.token_bytes;
      const int64_t src = b * ws.tokens * L.token_bytes;
      const int64_t bytes = int64_t{c[b]} * L.token_bytes;
      std::memcpy(reinterpret_cast<void*>(kb + dst), ksrc + src, bytes);
      std::memcpy(reinterpret_cast<void*>(vb + dst), vsrc + src, bytes);
      o[b] = st[b] + c[b];
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGrowCpu, GrowCpu,
                              ffi::Ffi::Bind()
                                  .Attr<uint64_t>("manager_id")
                                  .Arg<I32Vec>()  // slots   [B]
                                  .Arg<I32Vec>()  // lengths [B]
                                  .Ret<I32Vec>()  // lengths [B], after mapping
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWriteCpu, WriteCpu,
                              ffi::Ffi::Bind()
                                  .Attr<uint64_t>("manager_id")
                                  .Attr<int64_t>("layer")
                                  .Arg<ffi::AnyBuffer>()            // k_new  [B, T, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()            // v_new  [B, T, Hkv, D]
                                  .Arg<I32Vec>()  // slots  [B]
                                  .Arg<I32Vec>()  // starts [B]
                                  .Arg<I32Vec>()  // counts [B]
                                  .Ret<I32Vec>()  // lengths [B] = starts + counts
);

}  // namespace vattn
