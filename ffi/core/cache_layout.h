// Geometry of the token-major cache. g = layers_per_group picks the layout:
//   g = 1 (per-layer):   2*L tensors of [max_batch, max_seq, kv_heads, head_dim],
//                        tensor 2*layer + kv holds one layer's K (kv 0) or V (kv 1);
//   g > 1 (interleaved): L/g tensors of [max_batch, max_seq, g, 2, kv_heads, head_dim],
//                        a token holds K then V of every layer of its group.
// An entry is one token of one layer's K or V ([kv_heads, head_dim]); a token
// of one tensor is entries_per_token entries (1, or 2g), token_bytes apart.
// Layer `layer`'s K (kv 0) or V (kv 1) is flat entry f = 2*layer + kv: tensor
// f / E, entry f % E (CacheConfig.locate mirrors this arithmetic).
//
// Each batch slot owns a page-aligned region, so max_seq is rounded up until a
// slot is a whole number of pages; the rounding is reported, never hidden.
//
// Every size is computed with overflow checks: a configuration whose byte
// counts do not fit in int64 is a CacheValueError naming the fields, never a
// wrapped (zero or negative) size.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <string>

#include "error.h"

namespace vattn {

// Where one layer's K or V lives: a reserved tensor and the byte offset of its
// entry within each token of that tensor.
struct EntryLocation {
  int64_t tensor = 0;
  int64_t offset = 0;  // bytes, (f % entries_per_token) * entry_bytes
};

struct CacheLayout {
  int64_t num_layers = 0;
  int64_t max_batch = 0;
  int64_t requested_max_seq = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t itemsize = 0;
  int64_t page_bytes = 0;
  int64_t layers_per_group = 1;  // g: 1 per-layer, > 1 interleaved; divides num_layers

  // Derived by finalize().
  int64_t entries_per_token = 0;  // 1 per-layer, 2 * layers_per_group interleaved
  int64_t entry_bytes = 0;        // kv_heads * head_dim * itemsize: one token of one layer's K (or V)
  int64_t token_bytes = 0;        // entries_per_token * entry_bytes: the token stride of one tensor
  int64_t tensors = 0;            // 2 * num_layers / entries_per_token
  int64_t max_seq = 0;            // requested_max_seq rounded up
  int64_t slot_bytes = 0;         // max_seq * token_bytes, a multiple of page_bytes
  int64_t pages_per_slot = 0;     // slot_bytes / page_bytes
  int64_t tensor_bytes = 0;       // max_batch * slot_bytes

  // Limits: slots and tokens are int32 in the FFI calls and device tables; one
  // tensor and the whole cache must fit the address space that can be reserved.
  static constexpr int64_t kMaxIndex = (int64_t{1} << 31) - 1;
  static constexpr int64_t kMaxTensorBytes = int64_t{1} << 46;  // 64 TiB
  static constexpr int64_t kMaxTotalBytes = int64_t{1} << 47;   // 128 TiB, a 48-bit address space's user half

  bool interleaved() const { return layers_per_group > 1; }
  int64_t num_tensors() const { return tensors; }
  int64_t reserved_bytes() const { return num_tensors() * tensor_bytes; }

  // The tensor and entry offset of layer `layer`'s K (kv 0) or V (kv 1).
  EntryLocation locate(int64_t layer, int64_t kv) const {
    if (layer < 0 || layer >= num_layers)
      throw Error(ErrorKind::kInvalidArgument,
                  "layer " + str(layer) + " is out of range [0, " + str(num_layers) + ")");
    if (kv != 0 && kv != 1)
      throw Error(ErrorKind::kInvalidArgument, "kv must be 0 (K) or 1 (V), got " + str(kv));
    const int64_t flat = 2 * layer + kv;
    return {flat / entries_per_token, flat % entries_per_token * entry_bytes};
  }

  // Pages a slot needs (in each tensor) so that tokens [0, n) are backed.
  int64_t pages_for_tokens(int64_t n) const {
    return (n * token_bytes + page_bytes - 1) / page_bytes;
  }
  // Tokens fully backed by the first p pages of a slot.
  int64_t tokens_for_pages(int64_t p) const {
    return std::min(max_seq, p * page_bytes / token_bytes);
  }

  void finalize() {
    positive(num_layers, "num_layers");
    positive(max_batch, "max_batch");
    positive(requested_max_seq, "max_seq");
    positive(kv_heads, "kv_heads");
    positive(head_dim, "head_dim");
    positive(itemsize, "itemsize");
    positive(page_bytes, "page_bytes");
    if (layers_per_group <= 0 || num_layers % layers_per_group != 0)
      throw Error(ErrorKind::kInvalidArgument,
                  "layers_per_group=" + str(layers_per_group) + " must be a positive divisor of num_layers=" +
                      str(num_layers) + " (1 = per-layer tensors, num_layers = fully interleaved)");
    if (max_batch > kMaxIndex)
      throw Error(ErrorKind::kInvalidArgument, "max_batch=" + str(max_batch) + " exceeds " + str(kMaxIndex) +
                                                   " (slots are int32 in the FFI calls)");
    // Whole cache first: it names num_layers, and 2*L / E below cannot overflow once it passed.
    // (num_tensors * token_bytes = 2 * num_layers * entry_bytes in either layout.)
    entry_bytes = product({kv_heads, head_dim, itemsize}, "kv_heads * head_dim * itemsize");
    product({2, num_layers, entry_bytes}, "2 * num_layers * kv_heads * head_dim * itemsize");
    entries_per_token = layers_per_group > 1 ? 2 * layers_per_group : 1;  // 2g <= 2L: no overflow
    tensors = 2 * num_layers / entries_per_token;
    token_bytes = product({entries_per_token, entry_bytes}, "entries_per_token * entry_bytes");
    // Smallest token count whose bytes are a whole number of pages:
    // lcm(token_bytes, page_bytes) / token_bytes, computed without the lcm.
    const int64_t seq_quantum = page_bytes / std::gcd(token_bytes, page_bytes);
    int64_t padded = 0;
    if (__builtin_add_overflow(requested_max_seq, seq_quantum - 1, &padded))
      throw Error(ErrorKind::kInvalidArgument, "cache too large: max_seq=" + str(requested_max_seq) +
                                                   " rounded up to a multiple of " + str(seq_quantum) +
                                                   " tokens (whole pages) overflows a 64-bit count");
    max_seq = padded / seq_quantum * seq_quantum;
    if (max_seq > kMaxIndex)
      throw Error(ErrorKind::kInvalidArgument,
                  "cache too large: max_seq=" + str(requested_max_seq) + " rounds up to " + str(max_seq) +
                      " tokens (whole pages of " + str(page_bytes) + " bytes at " + str(token_bytes) +
                      " bytes per token), more than " + str(kMaxIndex));
    slot_bytes = product({max_seq, token_bytes}, "max_seq * token_bytes");
    pages_per_slot = slot_bytes / page_bytes;
    tensor_bytes = product({max_batch, max_seq, token_bytes}, "max_batch * max_seq * token_bytes");
    if (tensor_bytes > kMaxTensorBytes)
      throw Error(ErrorKind::kInvalidArgument, "cache too large: one tensor would reserve " + str(tensor_bytes) +
                                                   " bytes (max_batch * max_seq * token_bytes; limit " +
                                                   str(kMaxTensorBytes) + ")");
    const int64_t total = product({tensors, max_batch, max_seq, token_bytes},
                                  "num_tensors * max_batch * max_seq * token_bytes (num_tensors = 2 * num_layers / "
                                  "entries_per_token)");
    if (total > kMaxTotalBytes)
      throw Error(ErrorKind::kInvalidArgument, "cache too large: num_layers=" + str(num_layers) + " in " +
                                                   str(tensors) + " tensors would reserve " + str(total) +
                                                   " bytes (limit " + str(kMaxTotalBytes) + ")");
  }

 private:
  static std::string str(int64_t v) { return std::to_string(v); }

  static void positive(int64_t v, const char* what) {
    if (v <= 0) throw Error(ErrorKind::kInvalidArgument, std::string(what) + " must be positive, got " + str(v));
  }

  // The product of positive factors, or a CacheValueError "what = v1 * v2 * ...
  // overflows" (`what` names the factors, in order).
  static int64_t product(std::initializer_list<int64_t> factors, const std::string& what) {
    int64_t result = 1;
    for (int64_t f : factors) {
      if (!__builtin_mul_overflow(result, f, &result)) continue;
      std::string values;
      for (int64_t v : factors) values += (values.empty() ? "" : " * ") + str(v);
      const bool per_token = what.find("token_bytes") != std::string::npos;
      throw Error(ErrorKind::kInvalidArgument,
                  "cache too large: " + what + " = " + values + " overflows a 64-bit byte count" +
                      (per_token ? " (token_bytes = entries_per_token * kv_heads * head_dim * itemsize)" : ""));
    }
    return result;
  }
};

}  // namespace vattn
