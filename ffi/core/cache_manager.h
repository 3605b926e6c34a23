// The vAttention cache manager: reservations, a bounded physical page pool and
// the slot lifecycle. Includes neither XLA nor CUDA headers; every memory API
// call goes through the MemoryBackend it owns.
//
// The layout (CacheLayout) reserves num_tensors() tensors: 2*L per-layer ones,
// or L/g interleaved ones. Page p of slot s in tensor t lives at
// base[t] + s*slot_bytes + p*page_bytes. A slot always has the same number of
// pages mapped in every tensor. Page mapping is page_mapping.cc.
//
// Prefix sharing (page aliasing): every physical page not on the free list
// has a reference count, one per mapping of it and one per pin; it returns to
// the free list only when the count drops to 0. pin_pages() hands out the
// first pages of a slot as handles that outlive the slot; map_shared() maps
// such handles into another slot at the same page indices, where they are
// read-only (writes below the slot's shared range are refused, on the host
// by check_write, on CUDA by the write guard's table of writable_ranges).
// Reference counting, pinning and sharing live in page_mapping.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "backend.h"
#include "cache_layout.h"

namespace vattn {

struct CacheStats {
  int64_t reserved_bytes = 0;
  int64_t page_bytes = 0;
  int64_t pages_budget = 0;        // pool size in pages
  int64_t pages_created = 0;       // physical pages that exist (in use + free list)
  int64_t pages_free = 0;          // created, unreferenced, on the free list
  int64_t pages_in_use = 0;        // created - free: referenced by a mapping or a pin (what the budget bounds)
  // Mappings of pages into slots, summed over all reserved tensors: a page
  // aliased into n slots counts n times (so pages_mapped may exceed pages_in_use).
  int64_t pages_mapped = 0;
  int64_t pages_mapped_free_slots = 0;  // of those, held by free slots (deferred reclamation)
  int64_t pages_live = 0;          // distinct pages mapped into allocated slots (an aliased page counts once)
  int64_t pages_pinned = 0;        // distinct pages with at least one pin
  int64_t pages_shared = 0;        // distinct pages with more than one reference (mappings + pins)
  int64_t live_slots = 0;
  // Lifetime counters of backend calls.
  int64_t creates = 0, destroys = 0, maps = 0, unmaps = 0;
  std::vector<int64_t> slot_capacity;  // tokens backed per slot
  std::vector<uint8_t> slot_allocated;
  std::vector<int64_t> slot_shared_pages;  // page indices mapped by map_shared (read-only) per slot
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
  // `min_tokens` (best fit), then back [0, min_tokens). A free slot's deferred
  // pages from the first one that is also pinned or mapped elsewhere are
  // unmapped first: the new owner writes there, and must not write into a
  // page someone else reads.
  int64_t allocate(int64_t min_tokens);
  // Back tokens [0, lengths[i]) of slots[i]; rows with slot < 0 are skipped.
  // All-or-nothing with respect to the pool check; reclaims deferred pages of
  // free slots when the pool is short.
  void grow(const int32_t* slots, const int32_t* lengths, int64_t n);
  void grow_one(int64_t slot, int64_t tokens);
  // The slot's shared range ends (shared_pages becomes 0); with deferred
  // reclamation its pages stay mapped (see allocate for shared ones).
  void free(int64_t slot);
  // Unmap pages of free slots (all if max_pages < 0) and, if release_physical,
  // destroy the free list. Returns pages unmapped.
  int64_t trim(int64_t max_pages, bool release_physical);
  void close();

  // Page sharing (page_mapping.cc). Handles are opaque PageHandles, layout
  // [page][tensor]: n_pages * num_tensors() of them.
  //
  // The slot's page indices [0, n_pages) in every tensor, each referenced once
  // more, so they outlive the slot's own mapping. kSlotState if the slot is not
  // allocated; kInvalidArgument if it has fewer than n_pages mapped.
  std::vector<PageHandle> pin_pages(int64_t slot, int64_t n_pages);
  // Drops one pin of each handle (a handle listed k times drops k pins); a page
  // whose count reaches 0 goes to the free list. kInvalidArgument, with nothing
  // changed, if any handle has fewer pins than that.
  void unpin_pages(const std::vector<PageHandle>& handles);
  // Maps handle [p][t] at page index p of tensor t of `slot`, for the n =
  // handles.size() / num_tensors() first page indices; those tokens become
  // read-only for the slot (shared_pages = n). The slot's own pages are first
  // unmapped (references dropped, as a free without deferred reclamation would),
  // so a slot that already has pages may be given a prefix. Every handle must be
  // referenced now (pinned or mapped somewhere); all are validated before
  // anything changes (kInvalidArgument / kSlotState). All or nothing: on a
  // backend failure no handle stays mapped or gains a reference and the slot's
  // own pages are mapped back (if even that fails, it is left with none). A
  // later grow maps owned pages after the shared ones.
  void map_shared(int64_t slot, const std::vector<PageHandle>& handles);
  // Page indices of the slot mapped by map_shared (0 when none or not allocated).
  int64_t shared_pages(int64_t slot) const;

  bool closed() const;
  bool allocated(int64_t slot) const;
  int64_t capacity(int64_t slot) const;  // tokens backed, allocated or not
  // Writable tokens per slot as int32 pairs [max_batch][2] {from, to}: a write
  // of [start, start+count) is allowed iff start+count <= to and (count == 0 or from <= start).
  // `to` is the capacity if allocated, else 0; `from` is the end of the slot's
  // read-only shared range (0 if none). Returns the version of that table,
  // which changes whenever any entry does.
  uint64_t writable_ranges(std::vector<int32_t>* out) const;
  uint64_t capacity_version() const;
  // Throws unless tokens [start, start+count) of slot are allocated, backed, and
  // start is not inside the slot's read-only shared range.
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
    int64_t shared_pages = 0;       // page indices [0, shared_pages) came from map_shared: read-only
    std::vector<PageHandle> pages;  // [page][tensor], mapped_pages * num_tensors entries
  };

  void check_open() const;
  void check_slot(int64_t slot) const;
  int64_t available_pages() const;
  // Appends n pages from the free list or newly created ones to *out; on a
  // failure the ones it took go (back) to the free list and the error propagates.
  void acquire_pages(int64_t n, std::vector<PageHandle>* out);
  void map_pages(int64_t slot, int64_t target_pages);
  // Maps pages [page][tensor] at page indices [0, n) of the slot (map_shared).
  void map_runs(int64_t slot, const std::vector<PageHandle>& pages, int64_t n);
  // Returns the physical pages that went back to the free list (0 when the
  // unmapped pages are still referenced elsewhere).
  int64_t unmap_pages(int64_t slot, int64_t keep_pages);
  // Reclaims until pages_wanted pages are free again (all if < 0); returns pages unmapped.
  int64_t reclaim_free_slots(int64_t pages_wanted);
  // Reference counting: add_ref for a new mapping or pin; drop_ref returns the
  // page to the free list when its count reaches 0 (and says so).
  void add_ref(PageHandle page);
  bool drop_ref(PageHandle page);
  int64_t refs(PageHandle page) const;
  // Mappings into allocated slots (pages_live): count_live for one such mapping made (+1) or gone (-1);
  // set_allocated flips a slot and counts all its mappings in or out.
  void count_live(PageHandle page, int64_t delta);
  void set_allocated(Slot& s, bool allocated);
  // Leading page indices of a slot whose pages (in every tensor) have no other
  // reference than this slot's mapping: what a new owner of the slot may write.
  int64_t exclusive_pages(const Slot& s) const;
  // Tokens with any byte in the first p pages of a slot (read-only when shared).
  int64_t tokens_touching_pages(int64_t p) const;
  void grow_locked(const int32_t* slots, const int32_t* lengths, int64_t n);
  uintptr_t page_addr(int64_t tensor, int64_t slot, int64_t page) const;

  CacheLayout layout_;
  std::unique_ptr<MemoryBackend> backend_;
  bool deferred_reclaim_;
  int64_t pages_budget_;
  int64_t pages_created_ = 0;
  std::vector<PageHandle> free_pages_;
  std::unordered_map<PageHandle, int64_t> refs_;  // pages not on the free list: mappings + pins
  std::unordered_map<PageHandle, int64_t> pins_;  // pinned pages: pins
  int64_t pages_shared_ = 0;                      // entries of refs_ above 1
  std::unordered_map<PageHandle, int64_t> live_maps_;  // pages mapped into allocated slots (pages_live): such mappings
  std::vector<uintptr_t> bases_;
  std::vector<Slot> slots_;
  uint64_t capacity_version_ = 1;
  bool closed_ = false;
  int64_t creates_ = 0, destroys_ = 0, maps_ = 0, unmaps_ = 0;
  mutable std::mutex mu_;
  mutable std::shared_mutex access_mu_;  // taken before mu_, never after it
};

}  // namespace vattn
