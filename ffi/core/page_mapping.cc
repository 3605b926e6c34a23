// CacheManager's page mapping: taking physical pages from the pool, mapping
// them into a slot's region of every reserved tensor, unmapping them again,
// and reclaiming the pages of free slots (deferred reclamation); and the
// reference counts that let a page be pinned and mapped into several slots
// (pin_pages / unpin_pages / map_shared). Private helpers are called with the
// manager's mutex held; the public sharing calls take it.
//
// Reference counts: refs_ holds every page that is not on the free list, with
// one reference per mapping of it (in any slot, live or free) and one per pin.
// A page goes to the free list exactly when its count reaches 0 (drop_ref), and
// pages taken from the free list are referenced as they are mapped, so no page
// is ever both free and referenced. pins_ counts the pins per page, so that
// unpin_pages only drops references that pins hold.
//
// A grow maps one run of consecutive pages per tensor (MemoryBackend::map_run):
// with an interleaved layout a page holds few tokens (16 for Llama-3-8B with
// every layer in one group), so a slot often needs several pages at once, and
// a run costs one access setting on CUDA instead of one per page.
#include <algorithm>
#include <string>

#include "cache_manager.h"

namespace vattn {

void CacheManager::add_ref(PageHandle page) {
  if (++refs_[page] == 2) ++pages_shared_;
}

bool CacheManager::drop_ref(PageHandle page) {
  auto it = refs_.find(page);
  if (it == refs_.end())  // a bug in the manager, never bad input: refuse rather than free a page twice
    throw Error(ErrorKind::kBackend, "internal error: page " + std::to_string(page) + " has no reference to drop");
  if (it->second-- == 2) --pages_shared_;
  if (it->second > 0) return false;
  refs_.erase(it);
  free_pages_.push_back(page);
  return true;
}

void CacheManager::count_live(PageHandle page, int64_t delta) {
  auto it = live_maps_.try_emplace(page, 0).first;
  if ((it->second += delta) > 0) return;
  if (it->second < 0)  // a bug in the manager, never bad input
    throw Error(ErrorKind::kBackend, "internal error: page " + std::to_string(page) + " unmapped from a live slot twice");
  live_maps_.erase(it);
}

void CacheManager::set_allocated(Slot& s, bool allocated) {
  if (s.allocated == allocated) return;
  s.allocated = allocated;
  for (PageHandle page : s.pages) count_live(page, allocated ? 1 : -1);
}

int64_t CacheManager::refs(PageHandle page) const {
  auto it = refs_.find(page);
  return it == refs_.end() ? 0 : it->second;
}

int64_t CacheManager::exclusive_pages(const Slot& s) const {
  const int64_t T = layout_.num_tensors();
  for (int64_t p = 0; p < s.mapped_pages; ++p)
    for (int64_t t = 0; t < T; ++t)
      if (refs(s.pages[p * T + t]) > 1) return p;
  return s.mapped_pages;
}

void CacheManager::acquire_pages(int64_t n, std::vector<PageHandle>* out) {
  const size_t first = out->size();
  try {
    for (int64_t i = 0; i < n; ++i) {
      if (!free_pages_.empty()) {
        out->push_back(free_pages_.back());
        free_pages_.pop_back();
        continue;
      }
      out->push_back(backend_->create_page(layout_.page_bytes));
      ++pages_created_;
      ++creates_;
    }
  } catch (...) {
    free_pages_.insert(free_pages_.end(), out->begin() + first, out->end());  // created ones stay in the pool
    out->resize(first);
    throw;
  }
}

// Maps page indices [mapped_pages, target_pages) of the slot in every tensor,
// one run per tensor. All or nothing for the slot: on a backend failure the
// runs already mapped by this call are unmapped again and their pages go to the
// free list, so the slot keeps its previous page count in every tensor and the
// error propagates.
void CacheManager::map_pages(int64_t slot, int64_t target_pages) {
  Slot& s = slots_[slot];
  const int64_t T = layout_.num_tensors(), first = s.mapped_pages, n = target_pages - first;
  if (n <= 0) return;
  const size_t page_bytes = static_cast<size_t>(layout_.page_bytes);
  s.pages.resize(target_pages * T);
  std::vector<PageHandle> run;
  run.reserve(n);
  int64_t t = 0;
  try {
    for (; t < T; ++t) {
      run.clear();
      acquire_pages(n, &run);
      try {
        backend_->map_run(page_addr(t, slot, first), page_bytes, run.data(), static_cast<size_t>(n));
      } catch (...) {
        free_pages_.insert(free_pages_.end(), run.begin(), run.end());  // never referenced
        throw;
      }
      maps_ += n;
      for (int64_t i = 0; i < n; ++i) {
        s.pages[(first + i) * T + t] = run[i], add_ref(run[i]);
        if (s.allocated) count_live(run[i], 1);
      }
    }
  } catch (...) {
    for (int64_t u = t - 1; u >= 0; --u)
      for (int64_t p = target_pages - 1; p >= first; --p) {
        backend_->unmap(page_addr(u, slot, p), page_bytes);
        ++unmaps_;
        if (s.allocated) count_live(s.pages[p * T + u], -1);
        drop_ref(s.pages[p * T + u]);  // its only reference: back to the free list
      }
    s.pages.resize(first * T);
    ++capacity_version_;
    throw;
  }
  s.mapped_pages = target_pages;
  ++capacity_version_;  // only on a change: a new version makes the CUDA write re-upload its capacity table
}

// Unmaps page indices [keep_pages, mapped_pages) in every tensor, dropping the
// mappings' references (pages still pinned or mapped elsewhere stay in use).
// Caller synchronizes the device first. Returns the pages freed.
int64_t CacheManager::unmap_pages(int64_t slot, int64_t keep_pages) {
  Slot& s = slots_[slot];
  const int64_t T = layout_.num_tensors();
  int64_t freed = 0;
  while (s.mapped_pages > keep_pages) {
    const int64_t page = s.mapped_pages - 1;
    for (int64_t t = T - 1; t >= 0; --t) {
      backend_->unmap(page_addr(t, slot, page), layout_.page_bytes);
      ++unmaps_;
      if (s.allocated) count_live(s.pages.back(), -1);
      freed += drop_ref(s.pages.back()) ? 1 : 0;
      s.pages.pop_back();
    }
    --s.mapped_pages;
    ++capacity_version_;
  }
  s.shared_pages = std::min(s.shared_pages, s.mapped_pages);
  return freed;
}

// Deferred reclamation: take pages back from free slots, largest first, one
// page index at a time from each slot's end until pages_wanted pages are free
// (an unmapped page that another slot or a pin still references frees nothing).
int64_t CacheManager::reclaim_free_slots(int64_t pages_wanted) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < layout_.max_batch; ++i)
    if (!slots_[i].allocated && slots_[i].mapped_pages > 0) order.push_back(i);
  if (order.empty()) return 0;
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return slots_[a].mapped_pages > slots_[b].mapped_pages; });
  backend_->synchronize();
  int64_t freed = 0, unmapped = 0;
  const int64_t T = layout_.num_tensors();
  for (int64_t i : order) {
    Slot& s = slots_[i];
    while (s.mapped_pages > 0 && (pages_wanted < 0 || freed < pages_wanted)) {
      freed += unmap_pages(i, s.mapped_pages - 1);
      unmapped += T;
    }
  }
  return unmapped;
}

// -- sharing ------------------------------------------------------------------

int64_t CacheManager::shared_pages(int64_t slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  return slots_[slot].shared_pages;
}

int64_t CacheManager::tokens_touching_pages(int64_t p) const {
  return std::min(layout_.max_seq, (p * layout_.page_bytes + layout_.token_bytes - 1) / layout_.token_bytes);
}

std::vector<PageHandle> CacheManager::pin_pages(int64_t slot, int64_t n_pages) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  const Slot& s = slots_[slot];
  if (!s.allocated)
    throw Error(ErrorKind::kSlotState, "pin_pages: slot " + std::to_string(slot) + " is not allocated");
  if (n_pages < 0 || n_pages > s.mapped_pages)
    throw Error(ErrorKind::kInvalidArgument, "pin_pages: n_pages=" + std::to_string(n_pages) + " is outside [0, " +
                                                 std::to_string(s.mapped_pages) + "], the pages slot " +
                                                 std::to_string(slot) + " has mapped");
  std::vector<PageHandle> out(s.pages.begin(), s.pages.begin() + n_pages * layout_.num_tensors());
  for (PageHandle page : out) add_ref(page), ++pins_[page];
  return out;
}

void CacheManager::unpin_pages(const std::vector<PageHandle>& handles) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  std::unordered_map<PageHandle, int64_t> wanted;  // validate every handle before dropping any pin
  for (size_t i = 0; i < handles.size(); ++i) {
    auto it = pins_.find(handles[i]);
    const int64_t have = it == pins_.end() ? 0 : it->second;
    if (++wanted[handles[i]] > have)
      throw Error(ErrorKind::kInvalidArgument,
                  "unpin_pages: handles[" + std::to_string(i) + "] = " + std::to_string(handles[i]) +
                      (have == 0 ? " is not a pinned page" : " is listed more often than its " +
                                                                 std::to_string(have) + " pin(s)") +
                      "; nothing was unpinned");
  }
  for (PageHandle page : handles) {
    if (--pins_[page] == 0) pins_.erase(page);
    drop_ref(page);
  }
}

void CacheManager::map_shared(int64_t slot, const std::vector<PageHandle>& handles) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  check_slot(slot);
  const int64_t T = layout_.num_tensors(), size = static_cast<int64_t>(handles.size()), n = size / T;
  if (!slots_[slot].allocated)
    throw Error(ErrorKind::kSlotState, "map_shared: slot " + std::to_string(slot) + " is not allocated");
  if (size % T != 0)
    throw Error(ErrorKind::kInvalidArgument, "map_shared: " + std::to_string(size) + " handles are not a multiple of the " +
                                                 std::to_string(T) + " reserved tensors (handles are [page][tensor], "
                                                 "as pin_pages returns them)");
  if (n > layout_.pages_per_slot)
    throw Error(ErrorKind::kInvalidArgument, "map_shared: " + std::to_string(n) + " pages exceed the " +
                                                 std::to_string(layout_.pages_per_slot) + " pages of a slot");
  for (int64_t i = 0; i < size; ++i)
    if (refs(handles[i]) == 0)
      throw Error(ErrorKind::kInvalidArgument, "map_shared: handles[" + std::to_string(i) + "] = " +
                                                   std::to_string(handles[i]) + " (page " + std::to_string(i / T) +
                                                   ", tensor " + std::to_string(i % T) +
                                                   ") is not a pinned or mapped page");
  // The new mappings' references first: a handle that only this slot's own
  // mapping held must survive the unmap below. The old pages keep theirs until
  // the shared ones are mapped, so a failure can map them back.
  for (PageHandle page : handles) add_ref(page);
  Slot& s = slots_[slot];
  const std::vector<PageHandle> old = s.pages;
  const int64_t old_n = s.mapped_pages, old_shared = s.shared_pages;
  if (old_n > 0) backend_->synchronize();
  const size_t page_bytes = static_cast<size_t>(layout_.page_bytes);
  for (int64_t p = old_n - 1; p >= 0; --p)
    for (int64_t t = T - 1; t >= 0; --t) backend_->unmap(page_addr(t, slot, p), page_bytes), ++unmaps_;
  for (PageHandle page : old) count_live(page, -1);
  s.pages.clear();
  s.mapped_pages = s.shared_pages = 0;
  ++capacity_version_;
  try {
    map_runs(slot, handles, n);
  } catch (...) {
    for (PageHandle page : handles) drop_ref(page);
    try {
      map_runs(slot, old, old_n);  // the slot as it was
      s.pages = old;
      s.mapped_pages = old_n;
      s.shared_pages = old_shared;
      for (PageHandle page : old) count_live(page, 1);
    } catch (...) {
      for (PageHandle page : old) drop_ref(page);  // left with no pages; the first error is reported
    }
    throw;
  }
  for (PageHandle page : old) drop_ref(page);
  for (PageHandle page : handles) count_live(page, 1);
  s.pages = handles;
  s.mapped_pages = n;
  s.shared_pages = n;
  ++capacity_version_;
}

// Maps pages[p * T + t] at page index p of tensor t of the slot, p < n, one run
// per tensor, without touching references. All or nothing: on a failure the
// runs already mapped are unmapped and the error propagates.
void CacheManager::map_runs(int64_t slot, const std::vector<PageHandle>& pages, int64_t n) {
  const int64_t T = layout_.num_tensors();
  const size_t page_bytes = static_cast<size_t>(layout_.page_bytes);
  std::vector<PageHandle> run(n);
  int64_t t = 0;
  try {
    for (; t < T && n > 0; ++t) {
      for (int64_t p = 0; p < n; ++p) run[p] = pages[p * T + t];
      backend_->map_run(page_addr(t, slot, 0), page_bytes, run.data(), static_cast<size_t>(n));
      maps_ += n;
    }
  } catch (...) {
    for (int64_t u = t - 1; u >= 0; --u)
      for (int64_t p = n - 1; p >= 0; --p) backend_->unmap(page_addr(u, slot, p), page_bytes), ++unmaps_;
    throw;
  }
}

}  // namespace vattn
