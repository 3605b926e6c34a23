// The vAttention cache manager: reservations, a bounded physical page pool and
// the slot lifecycle. Includes neither XLA nor CUDA headers; every memory API
// call goes through the MemoryBackend it owns.
//
// The layout (CacheLayout) reserves num_tensors() tensors: 2*L per-layer ones,
// or L/g interleaved ones. Page p of slot s in tensor t lives at
// base[t] + s*slot_bytes + p*page_bytes. A slot always has the same number of
// pages mapped in every tensor. Page mapping is page_mapping.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "backend.h"
#include "cache_layout.h"

namespace vattn {

struct CacheStats {
  int64_t reserved_bytes = 0;
  int64_t page_bytes = 0;
  int64_t pages_budget = 0;        // pool size in pages
  int64_t pages_created = 0;       // physical pages that exist (mapped + free list)
  int64_t pages_free = 0;          // created, unmapped, on the free list
  int64_t pages_mapped = 0;        // mapped into some slot, summed over all reserved tensors
  int64_t pages_mapped_free_slots = 0;  // of those, held by free slots (deferred reclamation)
  int64_t live_slots = 0;
  // Lifetime counters of backend calls.
  int64_t creates = 0, destroys = 0, maps = 0, unmaps = 0;
  std::vector<int64_t> slot_capacity;  // tokens backed per slot
  std::vector<uint8_t> slot_allocated;
};

// Thread-safe: every public method takes the manager's mutex.
class CacheManager {
 public:
  CacheManager(const CacheLayout& layout, int64_t pool_bytes, bool deferred_reclaim,
               std::unique_ptr<MemoryBackend> backend);
  ~CacheManager();
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;

  const CacheLayout& layout() const { return layout_; }
  MemoryBackend& backend() { return *backend_; }

  // Base address of reserved tensor `tensor` in [0, num_tensors()).
  uintptr_t tensor_base(int64_t tensor) const;
  // Address of layer `layer`'s K (kv 0) or V (kv 1) at slot 0, token 0: its
  // tensor's base plus the entry offset (layout().locate). Token p of slot s is
  // token_bytes * p + slot_bytes * s further; entry_bytes of it are the layer's.
  uintptr_t entry_address(int64_t layer, int64_t kv) const;

  // Allocate a free slot, preferring one whose deferred pages already cover
  // `min_tokens` (best fit), then back [0, min_tokens).
  int64_t allocate(int64_t min_tokens);
  // Back tokens [0, lengths[i]) of slots[i]; rows with slot < 0 are skipped.
  // All-or-nothing with respect to the pool check; reclaims deferred pages of
  // free slots when the pool is short.
  void grow(const int32_t* slots, const int32_t* lengths, int64_t n);
  void grow_one(int64_t slot, int64_t tokens);
  void free(int64_t slot);
  // Unmap pages of free slots (all if max_pages < 0) and, if release_physical,
  // destroy the free list. Returns pages unmapped.
  int64_t trim(int64_t max_pages, bool release_physical);
  void close();

  bool closed() const;
  bool allocated(int64_t slot) const;
  int64_t capacity(int64_t slot) const;  // tokens backed, allocated or not
  // Writable tokens per slot (capacity if allocated, else 0) and the version of
  // that table, which changes whenever any entry does.
  uint64_t writable_capacity(std::vector<int32_t>* out) const;
  uint64_t capacity_version() const;
  // Throws unless tokens [start, start+count) of slot are allocated and backed.
  void check_write(int64_t slot, int64_t start, int64_t count) const;
  // Host code that touches the mapped memory outside the manager's own calls
  // (the CPU write handler) holds this from its checks to its last store;
  // close() takes it exclusively, so it never unmaps under a running copy.
  std::shared_lock<std::shared_mutex> memory_access() const {
    return std::shared_lock<std::shared_mutex>(access_mu_);
  }
  CacheStats stats() const;

 private:
  struct Slot {
    bool allocated = false;
    int64_t mapped_pages = 0;
    std::vector<PageHandle> pages;  // [page][tensor], mapped_pages * num_tensors entries
  };

  void check_open() const;
  void check_slot(int64_t slot) const;
  int64_t available_pages() const;
  // Appends n pages from the free list or newly created ones to *out; on a
  // failure the ones it took go (back) to the free list and the error propagates.
  void acquire_pages(int64_t n, std::vector<PageHandle>* out);
  void map_pages(int64_t slot, int64_t target_pages);
  void unmap_pages(int64_t slot, int64_t keep_pages);
  int64_t reclaim_free_slots(int64_t pages_wanted);
  void grow_locked(const int32_t* slots, const int32_t* lengths, int64_t n);
  uintptr_t page_addr(int64_t tensor, int64_t slot, int64_t page) const;

  CacheLayout layout_;
  std::unique_ptr<MemoryBackend> backend_;
  bool deferred_reclaim_;
  int64_t pages_budget_;
  int64_t pages_created_ = 0;
  std::vector<PageHandle> free_pages_;
  std::vector<uintptr_t> bases_;
  std::vector<Slot> slots_;
  uint64_t capacity_version_ = 1;
  bool closed_ = false;
  int64_t creates_ = 0, destroys_ = 0, maps_ = 0, unmaps_ = 0;
  mutable std::mutex mu_;
  mutable std::shared_mutex access_mu_;  // taken before mu_, never after it
};

}  // namespace vattn
