// Maps the integer id carried as an FFI attribute to a live CacheManager and
// the handler-side state kept next to it.
//
// XLA FFI attributes can only carry plain values, and a compiled executable can
// outlive the Python object that traced it. Passing a raw pointer would turn a
// call after close() into a use-after-free; looking the id up here turns it
// into a CacheClosedError. This table is the extension's one process-wide
// object; all cache state stays owned by the managers and their guards.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "../core/cache_manager.h"

namespace vattn {

class DeviceWriteGuard;

struct RegisteredCache {
  std::shared_ptr<CacheManager> manager;
  // The device write path's state; null when the host stores into the cache itself.
  std::shared_ptr<DeviceWriteGuard> write_guard;
};

class ManagerRegistry {
 public:
  static ManagerRegistry& instance();
  uint64_t add(std::shared_ptr<CacheManager> manager, std::shared_ptr<DeviceWriteGuard> write_guard = nullptr);
  // Both throw Error(kClosed) for an id that was closed or never existed.
  std::shared_ptr<CacheManager> find(uint64_t id);
  RegisteredCache find_cache(uint64_t id);
  void remove(uint64_t id);

 private:
  std::mutex mu_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, RegisteredCache> caches_;
};

}  // namespace vattn
