// Maps the integer id carried as an FFI attribute to a live CacheManager and
// the handler-side state kept next to it.
//
// XLA FFI attributes can only carry plain values, and a compiled executable can
// outlive the Python object that traced it. Passing a raw pointer would turn a
// call after close() into a use-after-free; looking the id up here turns it
// into a CacheClosedError. This table is the extension's one process-wide
// object; all cache state stays owned by the managers and their guards.
//
// A device group (tensor parallelism) is an id for one cache per device: one
// program runs on every device of a mesh (shard_map) with the same attribute,
// and each handler picks its own device's cache by the FFI DeviceOrdinal.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

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
  // A group of registered caches, one per device ordinal; the group's id
  // shares the caches' id space. kInvalidArgument for mismatched lists, a
  // repeated ordinal or an id that is not a registered cache.
  uint64_t add_group(const std::vector<int32_t>& ordinals, const std::vector<uint64_t>& ids);
  // The cache `id` names for a handler running on device `ordinal`: the cache
  // itself, or a group's member for that device. Throw Error(kClosed) for an
  // id that was closed or never existed (or a member that was closed), and
  // kInvalidArgument for a group with no cache on that device.
  std::shared_ptr<CacheManager> find(uint64_t id, int32_t ordinal = -1);
  RegisteredCache find_cache(uint64_t id, int32_t ordinal = -1);
  void remove(uint64_t id);  // a cache or a group (a group's members stay)

 private:
  std::mutex mu_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, RegisteredCache> caches_;
  std::unordered_map<uint64_t, std::unordered_map<int32_t, uint64_t>> groups_;  // id -> ordinal -> cache id
};

}  // namespace vattn
