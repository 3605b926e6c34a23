// XLA FFI handlers for the CPU platform (host backend). They adapt buffers and
// call the core: CacheManager::grow and write_rows (which validates every row
// against the manager before any byte moves).
#include <cstring>

#include "../core/write_rows.h"
#include "common.h"
#include "handlers.h"

namespace vattn {
namespace {

ffi::Error GrowCpu(int32_t ordinal, uint64_t manager_id, I32Vec slots, I32Vec lengths, I32Out out) {
  return guarded("grow", [&] {
    auto m = ManagerRegistry::instance().find(manager_id, ordinal);
    const int64_t n = check_grow_args(slots, lengths);
    m->grow(slots.typed_data(), lengths.typed_data(), n);
    std::memcpy(out->typed_data(), lengths.typed_data(), n * sizeof(int32_t));
  });
}

ffi::Error WriteCpu(int32_t ordinal, uint64_t manager_id, int64_t layer, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                    I32Vec slots, I32Vec starts, I32Vec counts, I32Out out) {
  return guarded("write", [&] {
    auto m = ManagerRegistry::instance().find(manager_id, ordinal);
    const WriteShape ws = check_write_args(m->layout(), layer, k_new, v_new, slots, starts, counts);
    WriteRowsRequest r;
    r.layer = layer;
    r.batch = ws.batch;
    r.tokens = ws.tokens;
    r.k_new = k_new.untyped_data();
    r.v_new = v_new.untyped_data();
    r.slots = slots.typed_data();
    r.starts = starts.typed_data();
    r.counts = counts.typed_data();
    r.lengths = out->typed_data();
    write_rows(*m, r);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGrowCpu, GrowCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()  // picks a device group's member
                                  .Attr<uint64_t>("manager_id")
                                  .Arg<I32Vec>()  // slots   [B]
                                  .Arg<I32Vec>()  // lengths [B]
                                  .Ret<I32Vec>()  // lengths [B], after mapping
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWriteCpu, WriteCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::DeviceOrdinal>()  // picks a device group's member
                                  .Attr<uint64_t>("manager_id")
                                  .Attr<int64_t>("layer")
                                  .Arg<ffi::AnyBuffer>()  // k_new  [B, T, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()  // v_new  [B, T, Hkv, D]
                                  .Arg<I32Vec>()          // slots  [B]
                                  .Arg<I32Vec>()          // starts [B]
                                  .Arg<I32Vec>()          // counts [B]
                                  .Ret<I32Vec>()          // lengths [B] = starts + counts
);

}  // namespace vattn
