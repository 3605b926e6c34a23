// Stress driver for the C++ core, the host backend and the manager registry,
// built with -fsanitize=address or -fsanitize=thread by test_native_sanitizers.py.
//
// Phase 1: one thread, random operations, invariants checked after each, with
// unbacked reads faulting and reading zeros (then the first byte past every
// slot's mapped pages must read zero, whatever was unmapped there before), in
// the per-layer layout (4 tensors) and the interleaved one (both layers in 1).
// Phase 2: several threads own one slot each (allocate/grow/write/verify/free)
// while others trim, read stats and churn the registry.
// Phase 3: layouts whose sizes overflow int64 are rejected (kInvalidArgument),
// never wrapped (UB the sanitizers would not always see).
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "backends/host_backend.h"
#include "core/cache_manager.h"
#include "handlers/registry.h"

using namespace vattn;

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "CHECK failed at line %d: %s\n", __LINE__, #cond); \
      std::abort();                                                    \
    }                                                                  \
  } while (0)

// 2 layers of [8, 512, 1, 16] f32 entries, 64 tokens a page in either layout: per-layer (g = 1) 4 tensors of
// 64 B tokens in 4 KiB pages; interleaved (g = 2) 1 tensor of 256 B tokens in 16 KiB pages.
static CacheLayout layout(int64_t layers_per_group = 1) {
  CacheLayout L;
  L.num_layers = 2, L.max_batch = 8, L.requested_max_seq = 512, L.kv_heads = 1, L.head_dim = 16;
  L.itemsize = 4, L.layers_per_group = layers_per_group;
  L.page_bytes = 4096 * (layers_per_group == 1 ? 1 : 2 * layers_per_group);
  L.finalize();  // derives num_tensors() for the pool sizes below (the manager finalizes again, idempotently)
  return L;
}

// Entry addresses agree with the tensor bases and the layout's arithmetic.
static void check_entries(const CacheManager& m) {
  const CacheLayout& L = m.layout();
  CHECK(L.num_tensors() * L.entries_per_token == 2 * L.num_layers);
  CHECK(L.token_bytes == L.entries_per_token * L.entry_bytes);
  for (int64_t layer = 0; layer < L.num_layers; ++layer)
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t flat = 2 * layer + kv;
      CHECK(m.entry_address(layer, kv) ==
            m.tensor_base(flat / L.entries_per_token) + uintptr_t(flat % L.entries_per_token * L.entry_bytes));
    }
}

static void check_invariants(const CacheManager& m) {
  CacheStats s = m.stats();
  const CacheLayout& L = m.layout();
  int64_t want = 0;
  for (int64_t c : s.slot_capacity) want += L.pages_for_tokens(c) * L.num_tensors();
  CHECK(s.pages_mapped == want);
  CHECK(s.pages_created == s.pages_mapped + s.pages_free);
  CHECK(s.pages_created <= s.pages_budget);
}

// kZeros: the first page past each slot's mapped pages, in every tensor, reads zero.
static void check_unbacked_reads_zero(const CacheManager& m) {
  const CacheLayout& L = m.layout();
  const CacheStats s = m.stats();
  for (int64_t slot = 0; slot < L.max_batch; ++slot) {
    const int64_t pages = L.pages_for_tokens(s.slot_capacity[slot]);
    if (pages >= L.pages_per_slot) continue;
    for (int64_t t = 0; t < L.num_tensors(); ++t) {
      const auto* p =
          reinterpret_cast<const volatile float*>(m.tensor_base(t) + slot * L.slot_bytes + pages * L.page_bytes);
      CHECK(p[0] == 0.0f && p[L.page_bytes / sizeof(float) - 1] == 0.0f);
    }
  }
}

static void phase_single_thread(uint64_t seed, UnbackedReads unbacked_reads, int64_t layers_per_group, int ops) {
  const CacheLayout base = layout(layers_per_group);
  // A budget of 12 page indices in every tensor, of the 8 slots x 8 pages a full cache has.
  CacheManager m(base, 12 * base.num_tensors() * base.page_bytes, true, std::make_unique<HostBackend>(unbacked_reads));
  CHECK(m.backend().unbacked_reads() == unbacked_reads);
  check_entries(m);
  std::mt19937_64 rng(seed);
  std::vector<int64_t> live;
  int64_t errors = 0;
  for (int op = 0; op < ops; ++op) {
    try {
      switch (rng() % 6) {
        case 0: live.push_back(m.allocate(rng() % 300)); break;
        case 1:
          if (!live.empty()) m.grow_one(live[rng() % live.size()], rng() % 600);  // may exceed max_seq
          break;
        case 2:
          if (!live.empty()) {
            size_t i = rng() % live.size();
            m.free(live[i]);
            live.erase(live.begin() + i);
          }
          break;
        case 3: m.trim(rng() % 2 ? -1 : static_cast<int64_t>(rng() % 20), rng() % 2); break;
        case 4: m.free(static_cast<int64_t>(rng() % 12) - 2); break;  // often invalid
        case 5:
          m.backend().inject_failures(rng() % 2, rng() % 2);
          if (!live.empty()) m.grow_one(live[rng() % live.size()], rng() % 512);
          m.backend().inject_failures(0, 0);
          break;
      }
    } catch (const Error&) {
      m.backend().inject_failures(0, 0);
      ++errors;
    }
    check_invariants(m);
    if (unbacked_reads == UnbackedReads::kZeros) {
      // Dirty every backed token, so a page unmapped later would show through if it were not replaced by zeros.
      const CacheLayout& L = m.layout();
      const CacheStats s = m.stats();
      for (int64_t slot = 0; slot < L.max_batch; ++slot)
        for (int64_t t = 0; t < L.num_tensors(); ++t) {
          auto* p = reinterpret_cast<float*>(m.tensor_base(t) + slot * L.slot_bytes);
          for (int64_t j = 0; j < s.slot_capacity[slot] * L.token_bytes / 4; j += 64) p[j] = 1.0f + j;
        }
      check_unbacked_reads_zero(m);
    }
  }
  m.close();
  CHECK(m.stats().pages_created == 0 && m.stats().reserved_bytes == 0);
  std::printf("single-thread (unbacked reads: %s, layers_per_group %lld): %d ops, %lld expected errors\n",
              unbacked_reads_name(unbacked_reads), static_cast<long long>(layers_per_group), ops,
              static_cast<long long>(errors));
}

static void phase_threads(int64_t layers_per_group, int cycles_per_thread) {
  const CacheLayout base = layout(layers_per_group);
  auto m = std::make_shared<CacheManager>(base, 16 * base.num_tensors() * base.page_bytes, true,
                                          std::make_unique<HostBackend>(UnbackedReads::kZeros));
  check_entries(*m);
  const uint64_t id = ManagerRegistry::instance().add(m);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> cycles{0};
  const CacheLayout& L = m->layout();
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < cycles_per_thread; ++i) {
        int64_t slot;
        try {
          slot = ManagerRegistry::instance().find(id)->allocate(1 + rng() % 200);
        } catch (const Error&) {
          continue;  // no slot or pool exhausted right now
        }
        const int64_t cap = m->capacity(slot);
        // Write a pattern into the slot's backed memory of every tensor, then verify it.
        for (int64_t u = 0; u < L.num_tensors(); ++u) {
          auto* p = reinterpret_cast<float*>(m->tensor_base(u) + slot * L.slot_bytes);
          for (int64_t j = 0; j < cap * L.token_bytes / 4; ++j) p[j] = float(t * 1000 + i);
        }
        for (int64_t u = 0; u < L.num_tensors(); ++u) {
          auto* p = reinterpret_cast<const float*>(m->tensor_base(u) + slot * L.slot_bytes);
          for (int64_t j = 0; j < cap * L.token_bytes / 4; ++j) CHECK(p[j] == float(t * 1000 + i));
        }
        m->free(slot);
        ++cycles;
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop) m->trim(-1, true);
  });
  threads.emplace_back([&] {
    while (!stop) {
      check_invariants(*m);
      uint64_t other = ManagerRegistry::instance().add(m);
      ManagerRegistry::instance().remove(other);
    }
  });
  for (int t = 0; t < 6; ++t) threads[t].join();
  stop = true;
  for (size_t t = 6; t < threads.size(); ++t) threads[t].join();
  check_invariants(*m);
  ManagerRegistry::instance().remove(id);
  m->close();
  bool closed = false;
  try {
    ManagerRegistry::instance().find(id);
  } catch (const Error& e) {
    closed = e.kind() == ErrorKind::kClosed;
  }
  CHECK(closed);
  std::printf("threads (layers_per_group %lld): %lld slot cycles\n", static_cast<long long>(layers_per_group),
              static_cast<long long>(cycles.load()));
}

static void phase_layout_overflow() {
  struct Case {
    int64_t num_layers, max_batch, max_seq, kv_heads, head_dim, itemsize;
    const char* names;  // expected in the message
    int64_t layers_per_group = 1;
  };
  const int64_t big = int64_t{1} << 62;
  const Case cases[] = {
      {2, 3, 128, big, 16, 4, "kv_heads * head_dim * itemsize"},
      {2, 3, 128, int64_t{1} << 31, int64_t{1} << 31, 4, "kv_heads * head_dim * itemsize"},
      {2, 3, (int64_t{1} << 31) - 1, int64_t{1} << 40, 16, 4, "max_seq * token_bytes"},
      {2, int64_t{1} << 30, int64_t{1} << 30, int64_t{1} << 14, 16, 4, "max_batch * max_seq * token_bytes"},
      {2, big, 128, 2, 16, 4, "max_batch"},
      {big, 3, 128, 2, 16, 4, "num_layers"},
      {int64_t{1} << 40, 3, 128, 2, 16, 4, "num_layers"},
      {2, 3, INT64_MAX, 3, 16, 4, "max_seq"},
      {2, 3, 128, 2, 16, 4, "layers_per_group=0 must be a positive divisor of num_layers=2", 0},
      {4, 3, 128, 2, 16, 4, "layers_per_group=3 must be a positive divisor of num_layers=4", 3},
      {2, 3, 128, 2, 16, 4, "layers_per_group=-2", -2},
      {big, 3, 128, 2, 16, 4, "num_layers", big},  // interleaved: 2 * num_layers still overflows, named
  };
  for (const Case& c : cases) {
    CacheLayout L;
    L.num_layers = c.num_layers, L.max_batch = c.max_batch, L.requested_max_seq = c.max_seq;
    L.kv_heads = c.kv_heads, L.head_dim = c.head_dim, L.itemsize = c.itemsize, L.page_bytes = 4096;
    L.layers_per_group = c.layers_per_group;
    bool rejected = false;
    try {
      CacheManager m(L, 1 << 20, true, std::make_unique<HostBackend>(UnbackedReads::kFault));
    } catch (const Error& e) {
      rejected = e.kind() == ErrorKind::kInvalidArgument && std::strstr(e.what(), c.names) != nullptr;
      if (!rejected) std::fprintf(stderr, "unexpected error for %s: %s\n", c.names, e.what());
    }
    CHECK(rejected);
  }
  std::printf("layout overflow: %zu cases rejected\n", sizeof(cases) / sizeof(cases[0]));
}

int main() {
  // The per-layer layout at full length, the interleaved one (same code paths, other strides) at half.
  for (int64_t g : {1, 2}) {
    const int scale = g == 1 ? 2 : 1;
    phase_single_thread(1, UnbackedReads::kFault, g, 10000 * scale);
    phase_single_thread(2, UnbackedReads::kZeros, g, 10000 * scale);
    phase_threads(g, 200 * scale);
  }
  phase_layout_overflow();
  std::printf("OK\n");
  return 0;
}
