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

void copy_rows(uint8_t* k_base, uint8_t* v_base, const CacheLayout& L, const WriteRowsRequest& r) {
  const auto* k_src = static_cast<const uint8_t*>(r.k_new);
  const auto* v_src = static_cast<const uint8_t*>(r.v_new);
  for (int64_t b = 0; b < r.batch; ++b) {
    r.lengths[b] = r.starts[b];
    if (r.slots[b] < 0) continue;
    const int64_t dst = r.slots[b] * L.slot_bytes + int64_t{r.starts[b]} * L.token_bytes;
    const int64_t src = b * r.tokens * L.token_bytes;
    const int64_t bytes = int64_t{r.counts[b]} * L.token_bytes;
    std::memcpy(k_base + dst, k_src + src, bytes);
    std::memcpy(v_base + dst, v_src + src, bytes);
    r.lengths[b] = r.starts[b] + r.counts[b];
  }
}

}  // namespace

void write_rows(CacheManager& manager, const WriteRowsRequest& request) {
  const auto access = manager.memory_access();  // close() cannot unmap until the copies are done
  check_rows(manager, request);
  auto* k_base = reinterpret_cast<uint8_t*>(manager.tensor_base(request.layer, 0));
  auto* v_base = reinterpret_cast<uint8_t*>(manager.tensor_base(request.layer, 1));
  copy_rows(k_base, v_base, manager.layout(), request);
}

}  // namespace vattn
