#include "cache_manager.h"

#include <algorithm>
#include <string>

namespace vattn {
namespace {

std::string mib(int64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

}  // namespace

CacheManager::CacheManager(const CacheLayout& layout, int64_t pool_bytes, bool deferred_reclaim,
                           std::unique_ptr<MemoryBackend> backend)
    : layout_(layout), backend_(std::move(backend)), deferred_reclaim_(deferred_reclaim) {
  layout_.finalize();
  const int64_t gran = static_cast<int64_t>(backend_->granularity());
  if (layout_.page_bytes % gran != 0)
    throw Error(ErrorKind::kInvalidArgument, "page_bytes=" + std::to_string(layout_.page_bytes) +
                                                 " is not a multiple of the " + backend_->name() +
                                                 " mapping granularity " + std::to_string(gran));
  if (pool_bytes < layout_.page_bytes)
    throw Error(ErrorKind::kInvalidArgument, "pool_bytes=" + std::to_string(pool_bytes) +
                                                 " is smaller than one page (" +
                                                 std::to_string(layout_.page_bytes) + " bytes)");
  pages_budget_ = pool_bytes / layout_.page_bytes;
  slots_.resize(layout_.max_batch);
  try {
    for (int64_t t = 0; t < layout_.num_tensors(); ++t)
      bases_.push_back(backend_->reserve(layout_.tensor_bytes, layout_.page_bytes));
  } catch (...) {
    for (uintptr_t b : bases_) backend_->release(b, layout_.tensor_bytes);
    throw;
  }
}

CacheManager::~CacheManager() {
  try {
    close();
  } catch (...) {
    // Destructors must not throw; close() already released what it could.
  }
}

void CacheManager::close() {
  std::unique_lock<std::shared_mutex> access(access_mu_);  // wait for host writes in flight
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  closed_ = true;
  backend_->synchronize();
  for (int64_t s = 0; s < layout_.max_batch; ++s) unmap_pages(s, 0);
  for (const auto& [page, pins] : pins_)  // pinned pages go last, when nothing maps them
    for (int64_t i = 0; i < pins; ++i) drop_ref(page);
  pins_.clear();
  live_maps_.clear();
  for (PageHandle p : free_pages_) backend_->destroy_page(p, layout_.page_bytes), ++destroys_;
  pages_created_ -= static_cast<int64_t>(free_pages_.size());
  free_pages_.clear();
  for (uintptr_t b : bases_) backend_->release(b, layout_.tensor_bytes);
  bases_.clear();
  ++capacity_version_;
}

bool CacheManager::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

void CacheManager::check_open() const {
  if (closed_) throw Error(ErrorKind::kClosed, "the cache manager is closed");
}

void CacheManager::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= layout_.max_batch)
    throw Error(ErrorKind::kInvalidArgument, "slot " + std::to_string(slot) + " is out of range [0, " +
                                                 std::to_string(layout_.max_batch) + ")");
}

uintptr_t CacheManager::tensor_base(int64_t tensor) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (tensor < 0 || tensor >= layout_.num_tensors())
    throw Error(ErrorKind::kInvalidArgument, "tensor " + std::to_string(tensor) + " is out of range [0, " +
                                                 std::to_string(layout_.num_tensors()) + ")");
  return bases_[tensor];
}

uintptr_t CacheManager::entry_address(int64_t layer, int64_t kv) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const EntryLocation at = layout_.locate(layer, kv);
  return bases_[at.tensor] + static_cast<uintptr_t>(at.offset);
}

uintptr_t CacheManager::page_addr(int64_t tensor, int64_t slot, int64_t page) const {
  return bases_[tensor] + slot * layout_.slot_bytes + page * layout_.page_bytes;
}

int64_t CacheManager::available_pages() const {
  return static_cast<int64_t>(free_pages_.size()) + (pages_budget_ - pages_created_);
}

void CacheManager::grow_locked(const int32_t* slots, const int32_t* lengths, int64_t n) {
  check_open();
  // Validate every row and size the request before touching anything.
  std::vector<int64_t> target(layout_.max_batch, -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i], len = lengths[i];
    if (slot < 0) continue;
    check_slot(slot);
    if (!slots_[slot].allocated)
      throw Error(ErrorKind::kSlotState, "grow: slot " + std::to_string(slot) + " (row " + std::to_string(i) +
                                             ") is not allocated");
    if (len < 0 || len > layout_.max_seq)
      throw Error(ErrorKind::kInvalidArgument, "grow: length " + std::to_string(len) + " for slot " +
                                                   std::to_string(slot) + " is outside [0, max_seq=" +
                                                   std::to_string(layout_.max_seq) + "]");
    target[slot] = std::max(target[slot], layout_.pages_for_tokens(len));
  }
  const int64_t T = layout_.num_tensors();
  int64_t needed = 0;
  for (int64_t s = 0; s < layout_.max_batch; ++s)
    if (target[s] > slots_[s].mapped_pages) needed += (target[s] - slots_[s].mapped_pages) * T;
  if (needed == 0) return;
  if (needed > available_pages()) reclaim_free_slots(needed - available_pages());
  if (needed > available_pages()) {
    int64_t live = 0;
    for (const Slot& s : slots_) live += s.allocated ? s.mapped_pages * T : 0;
    throw Error(ErrorKind::kPoolExhausted,
                "pool exhausted: grow needs " + std::to_string(needed) + " pages but only " +
                    std::to_string(available_pages()) + " are free (budget " + std::to_string(pages_budget_) +
                    " pages of " + mib(layout_.page_bytes) + ", " + std::to_string(live) +
                    " mapped to live slots)");
  }
  for (int64_t s = 0; s < layout_.max_batch; ++s)
    if (target[s] > slots_[s].mapped_pages) map_pages(s, target[s]);
}

void CacheManager::grow(const int32_t* slots, const int32_t* lengths, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  grow_locked(slots, lengths, n);
}

void CacheManager::grow_one(int64_t slot, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  if (tokens < 0 || tokens > layout_.max_seq)
    throw Error(ErrorKind::kInvalidArgument, "grow: length " + std::to_string(tokens) +
                                                 " is outside [0, max_seq=" + std::to_string(layout_.max_seq) + "]");
  const int32_t s32 = static_cast<int32_t>(slot), l32 = static_cast<int32_t>(tokens);
  grow_locked(&s32, &l32, 1);
}

int64_t CacheManager::allocate(int64_t min_tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (min_tokens < 0 || min_tokens > layout_.max_seq)
    throw Error(ErrorKind::kInvalidArgument, "allocate: min_tokens " + std::to_string(min_tokens) +
                                                 " is outside [0, max_seq=" + std::to_string(layout_.max_seq) + "]");
  const int64_t need = layout_.pages_for_tokens(min_tokens);
  // Best fit: the free slot with the fewest reusable pages (exclusive_pages)
  // that still covers `need`; otherwise the one with the most.
  std::vector<int64_t> reusable(layout_.max_batch, 0);
  int64_t best = -1;
  for (int64_t i = 0; i < layout_.max_batch; ++i) {
    if (slots_[i].allocated) continue;
    reusable[i] = exclusive_pages(slots_[i]);
    if (best < 0) { best = i; continue; }
    const int64_t m = reusable[i], bm = reusable[best];
    const bool fits = m >= need, best_fits = bm >= need;
    if ((fits && (!best_fits || m < bm)) || (!fits && !best_fits && m > bm)) best = i;
  }
  if (best < 0)
    throw Error(ErrorKind::kSlotState, "allocate: all " + std::to_string(layout_.max_batch) + " slots are in use");
  if (reusable[best] < slots_[best].mapped_pages) {  // pages another slot or a pin still reads
    backend_->synchronize();
    unmap_pages(best, reusable[best]);
  }
  set_allocated(slots_[best], true);
  slots_[best].shared_pages = 0;
  ++capacity_version_;
  // A fitting slot's pages beyond `need` are kept only while the pool could
  // map that many afresh: under pressure they would sit idle in a live slot
  // (counted against admission) while other requests wait for pages. A pool
  // that backs every slot to max_seq (the premapped control) is never under
  // pressure.
  const int64_t T = layout_.num_tensors(), excess = slots_[best].mapped_pages - need;
  const bool can_back_all = pages_budget_ >= layout_.max_batch * layout_.pages_per_slot * T;
  if (excess > 0 && !can_back_all && available_pages() < excess * T) {
    backend_->synchronize();
    unmap_pages(best, need);
  }
  if (min_tokens > 0) {
    const int32_t s32 = static_cast<int32_t>(best), l32 = static_cast<int32_t>(min_tokens);
    try {
      grow_locked(&s32, &l32, 1);
    } catch (...) {
      set_allocated(slots_[best], false);
      throw;
    }
  }
  return best;
}

void CacheManager::free(int64_t slot) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  if (!slots_[slot].allocated)
    throw Error(ErrorKind::kSlotState, "free: slot " + std::to_string(slot) + " is not allocated (double free?)");
  set_allocated(slots_[slot], false);
  slots_[slot].shared_pages = 0;  // allocate() unmaps the shared pages before a new owner could write them
  ++capacity_version_;
  if (!deferred_reclaim_ && slots_[slot].mapped_pages > 0) {
    backend_->synchronize();
    unmap_pages(slot, 0);
  }
}

int64_t CacheManager::trim(int64_t max_pages, bool release_physical) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  int64_t got = reclaim_free_slots(max_pages);
  if (release_physical) {
    for (PageHandle p : free_pages_) backend_->destroy_page(p, layout_.page_bytes), ++destroys_;
    pages_created_ -= static_cast<int64_t>(free_pages_.size());
    free_pages_.clear();
  }
  return got;
}

bool CacheManager::allocated(int64_t slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  return slots_[slot].allocated;
}

int64_t CacheManager::capacity(int64_t slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  return layout_.tokens_for_pages(slots_[slot].mapped_pages);
}

uint64_t CacheManager::writable_ranges(std::vector<int32_t>* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  out->assign(2 * layout_.max_batch, 0);  // [max_batch][2] {from, to}
  if (closed_) return capacity_version_;
  for (int64_t i = 0; i < layout_.max_batch; ++i) {
    if (!slots_[i].allocated) continue;
    (*out)[2 * i] = static_cast<int32_t>(tokens_touching_pages(slots_[i].shared_pages));
    (*out)[2 * i + 1] = static_cast<int32_t>(layout_.tokens_for_pages(slots_[i].mapped_pages));
  }
  return capacity_version_;
}

uint64_t CacheManager::capacity_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return capacity_version_;
}

void CacheManager::check_write(int64_t slot, int64_t start, int64_t count) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  if (!slots_[slot].allocated)
    throw Error(ErrorKind::kSlotState, "write: slot " + std::to_string(slot) + " is not allocated");
  const std::string range = "tokens [" + std::to_string(start) + ", " + std::to_string(start + count) + ") of slot " +
                            std::to_string(slot);
  const int64_t cap = layout_.tokens_for_pages(slots_[slot].mapped_pages);
  if (start < 0 || count < 0 || start + count > cap)
    throw Error(ErrorKind::kInvalidArgument, "write: " + range + " are not backed (capacity " + std::to_string(cap) +
                                                 " tokens); grow the slot first");
  const int64_t shared = tokens_touching_pages(slots_[slot].shared_pages);
  if (count > 0 && start < shared)  // an empty write touches nothing (padding rows write 0 tokens at 0)
    throw Error(ErrorKind::kInvalidArgument, "write: " + range + " start inside its read-only shared range [0, " +
                                                 std::to_string(shared) + ") mapped by map_shared; write from token " +
                                                 std::to_string(shared) + " on");
}

CacheStats CacheManager::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CacheStats st;
  st.page_bytes = layout_.page_bytes;
  st.pages_budget = pages_budget_;
  st.pages_created = pages_created_;
  st.pages_free = static_cast<int64_t>(free_pages_.size());
  st.pages_in_use = st.pages_created - st.pages_free;
  st.pages_live = static_cast<int64_t>(live_maps_.size());
  st.pages_pinned = static_cast<int64_t>(pins_.size());
  st.pages_shared = pages_shared_;
  st.reserved_bytes = static_cast<int64_t>(bases_.size()) * layout_.tensor_bytes;
  st.creates = creates_, st.destroys = destroys_, st.maps = maps_, st.unmaps = unmaps_;
  const int64_t T = layout_.num_tensors();
  for (const Slot& s : slots_) {
    st.pages_mapped += s.mapped_pages * T;
    if (!s.allocated) st.pages_mapped_free_slots += s.mapped_pages * T;
    st.live_slots += s.allocated ? 1 : 0;
    st.slot_capacity.push_back(layout_.tokens_for_pages(s.mapped_pages));
    st.slot_allocated.push_back(s.allocated ? 1 : 0);
    st.slot_shared_pages.push_back(s.shared_pages);
  }
  return st;
}

}  // namespace vattn
