// CacheManager's page mapping: taking physical pages from the pool, mapping
// them into a slot's region of every reserved tensor, unmapping them again,
// and reclaiming the pages of free slots (deferred reclamation). Called with
// the manager's mutex held.
//
// A grow maps one run of consecutive pages per tensor (MemoryBackend::map_run):
// with an interleaved layout a page holds few tokens (16 for Llama-3-8B with
// every layer in one group), so a slot often needs several pages at once, and
// a run costs one access setting on CUDA instead of one per page.
#include <algorithm>

#include "cache_manager.h"

namespace vattn {

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
        free_pages_.insert(free_pages_.end(), run.begin(), run.end());
        throw;
      }
      maps_ += n;
      for (int64_t i = 0; i < n; ++i) s.pages[(first + i) * T + t] = run[i];
    }
  } catch (...) {
    for (int64_t u = t - 1; u >= 0; --u)
      for (int64_t p = target_pages - 1; p >= first; --p) {
        backend_->unmap(page_addr(u, slot, p), page_bytes);
        ++unmaps_;
        free_pages_.push_back(s.pages[p * T + u]);
      }
    s.pages.resize(first * T);
    ++capacity_version_;
    throw;
  }
  s.mapped_pages = target_pages;
  ++capacity_version_;  // only on a change: a new version makes the CUDA write re-upload its capacity table
}

// Unmaps page indices [keep_pages, mapped_pages) in every tensor, returning
// the physical pages to the free list. Caller synchronizes the device first.
void CacheManager::unmap_pages(int64_t slot, int64_t keep_pages) {
  Slot& s = slots_[slot];
  const int64_t T = layout_.num_tensors();
  while (s.mapped_pages > keep_pages) {
    const int64_t page = s.mapped_pages - 1;
    for (int64_t t = T - 1; t >= 0; --t) {
      backend_->unmap(page_addr(t, slot, page), layout_.page_bytes);
      ++unmaps_;
      free_pages_.push_back(s.pages.back());
      s.pages.pop_back();
    }
    --s.mapped_pages;
    ++capacity_version_;
  }
}

// Deferred reclamation: take pages back from free slots, largest first.
int64_t CacheManager::reclaim_free_slots(int64_t pages_wanted) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < layout_.max_batch; ++i)
    if (!slots_[i].allocated && slots_[i].mapped_pages > 0) order.push_back(i);
  if (order.empty()) return 0;
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return slots_[a].mapped_pages > slots_[b].mapped_pages; });
  backend_->synchronize();
  int64_t got = 0;
  const int64_t T = layout_.num_tensors();
  for (int64_t i : order) {
    if (pages_wanted >= 0 && got >= pages_wanted) break;
    int64_t keep = 0;
    if (pages_wanted >= 0) {
      int64_t still = (pages_wanted - got + T - 1) / T;  // page indices still needed
      keep = std::max<int64_t>(0, slots_[i].mapped_pages - still);
    }
    got += (slots_[i].mapped_pages - keep) * T;
    unmap_pages(i, keep);
  }
  return got;
}

}  // namespace vattn
