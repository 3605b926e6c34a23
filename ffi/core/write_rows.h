// The host write: copies new K/V token rows into their slots of one layer, in
// place at the layer's entries (CacheLayout::locate): token p of slot s is
// entry_address + s*slot_bytes + p*token_bytes, entry_bytes long (token_bytes
// = entry_bytes per-layer, so a row is one contiguous copy there).
// Plain C++ over host pointers; the CPU FFI handler only adapts its buffers.
#pragma once

#include <cstdint>

#include "cache_manager.h"

namespace vattn {

// One write call: row b of k_new / v_new ([batch, tokens, kv_heads, head_dim],
// in the cache dtype) stores its first counts[b] tokens at tokens
// [starts[b], starts[b] + counts[b]) of slot slots[b].
struct WriteRowsRequest {
  int64_t layer = 0;
  int64_t batch = 0;
  int64_t tokens = 0;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  const int32_t* slots = nullptr;   // [batch], < 0 skips the row
  const int32_t* starts = nullptr;  // [batch]
  const int32_t* counts = nullptr;  // [batch]
  int32_t* lengths = nullptr;       // [batch] out: starts + counts (starts for skipped rows)
};

// Validates every row first (a bad row must not leave a half-written batch),
// then copies. Holds the manager's memory access throughout, so close() cannot
// unmap under a running copy. Throws Error naming the first bad row.
void write_rows(CacheManager& manager, const WriteRowsRequest& request);

}  // namespace vattn
