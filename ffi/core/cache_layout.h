// Geometry of the token-major cache: 2*L tensors of [max_batch, max_seq, kv_heads, head_dim].
// Each batch slot owns a page-aligned region, so max_seq is rounded up until a
// slot is a whole number of pages; the rounding is reported, never hidden.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>

#include "error.h"

namespace vattn {

struct CacheLayout {
  int64_t num_layers = 0;
  int64_t max_batch = 0;
  int64_t requested_max_seq = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t itemsize = 0;
  int64_t page_bytes = 0;

  // Derived by finalize().
  int64_t token_bytes = 0;     // kv_heads * head_dim * itemsize
  int64_t max_seq = 0;         // requested_max_seq rounded up
  int64_t slot_bytes = 0;      // max_seq * token_bytes, a multiple of page_bytes
  int64_t pages_per_slot = 0;  // slot_bytes / page_bytes
  int64_t tensor_bytes = 0;    // max_batch * slot_bytes

  int64_t num_tensors() const { return 2 * num_layers; }

  // Pages a slot needs so that tokens [0, n) are backed.
  int64_t pages_for_tokens(int64_t n) const {
    return (n * token_bytes + page_bytes - 1) / page_bytes;
  }
  // Tokens fully backed by the first p pages of a slot.
  int64_t tokens_for_pages(int64_t p) const {
    return std::min(max_seq, p * page_bytes / token_bytes);
  }

  void finalize() {
    auto positive = [](int64_t v, const char* what) {
      if (v <= 0) throw Error(ErrorKind::kInvalidArgument, std::string(what) + " must be positive, got " + std::to_string(v));
    };
    positive(num_layers, "num_layers");
    positive(max_batch, "max_batch");
    positive(requested_max_seq, "max_seq");
    positive(kv_heads, "kv_heads");
    positive(head_dim, "head_dim");
    positive(itemsize, "itemsize");
    positive(page_bytes, "page_bytes");
    token_bytes = kv_heads * head_dim * itemsize;
    // Smallest token count whose bytes are a whole number of pages.
    int64_t lcm = std::lcm(token_bytes, page_bytes);
    int64_t seq_quantum = lcm / token_bytes;
    max_seq = (requested_max_seq + seq_quantum - 1) / seq_quantum * seq_quantum;
    slot_bytes = max_seq * token_bytes;
    pages_per_slot = slot_bytes / page_bytes;
    tensor_bytes = max_batch * slot_bytes;
    constexpr int64_t kMaxTensorBytes = int64_t{1} << 46;  // 64 TiB of address space
    if (tensor_bytes > kMaxTensorBytes || max_seq > (int64_t{1} << 31) - 1)
      throw Error(ErrorKind::kInvalidArgument, "cache too large: one tensor would reserve " +
                                                   std::to_string(tensor_bytes) + " bytes");
  }
};

}  // namespace vattn
