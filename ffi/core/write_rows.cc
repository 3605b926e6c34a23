#include "write_rows.h"

#include <cstring>
#include <string>

namespace vattn {
namespace {

void check_rows(const CacheManager& manager, const WriteRowsRequest& r) {
  for (int64_t b = 0; b < r.batch; ++b) {
    if (r.slots[b] < 0) continue;
    if (r.counts[b] < 0 || r.counts[b] > r.tokens)
      throw Error(ErrorKind::kInvalidArgument, "write: counts[" + std::to_string(b) + "] = " +
                                                   std::to_string(r.counts[b]) + " is outside [0, T=" +
                                                   std::to_string(r.tokens) + "]");
    manager.check_write(r.slots[b], r.starts[b], r.counts[b]);
  }
}

// k_dst / v_dst: the layer's K / V entry at slot 0, token 0.
void copy_rows(uint8_t* k_dst, uint8_t* v_dst, const CacheLayout& L, const WriteRowsRequest& r) {
  const auto* k_src = static_cast<const uint8_t*>(r.k_new);
  const auto* v_src = static_cast<const uint8_t*>(r.v_new);
  const int64_t entry = L.entry_bytes, stride = L.token_bytes;
  for (int64_t b = 0; b < r.batch; ++b) {
    r.lengths[b] = r.starts[b];
    if (r.slots[b] < 0) continue;
    const int64_t dst = r.slots[b] * L.slot_bytes + int64_t{r.starts[b]} * stride;
    const int64_t src = b * r.tokens * entry;  // [B, T, Hkv, D]: rows of entry_bytes
    const int64_t count = r.counts[b];
    if (stride == entry) {  // per-layer: the row's tokens are contiguous in the cache too
      std::memcpy(k_dst + dst, k_src + src, count * entry);
      std::memcpy(v_dst + dst, v_src + src, count * entry);
    } else {
      for (int64_t t = 0; t < count; ++t) {
        std::memcpy(k_dst + dst + t * stride, k_src + src + t * entry, entry);
        std::memcpy(v_dst + dst + t * stride, v_src + src + t * entry, entry);
      }
    }
    r.lengths[b] = r.starts[b] + r.counts[b];
  }
}

}  // namespace

void write_rows(CacheManager& manager, const WriteRowsRequest& request) {
  const auto access = manager.memory_access();  // close() cannot unmap until the copies are done
  check_rows(manager, request);
  auto* k_dst = reinterpret_cast<uint8_t*>(manager.entry_address(request.layer, 0));
  auto* v_dst = reinterpret_cast<uint8_t*>(manager.entry_address(request.layer, 1));
  copy_rows(k_dst, v_dst, manager.layout(), request);
}

}  // namespace vattn
