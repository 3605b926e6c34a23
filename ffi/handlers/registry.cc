#include "registry.h"

#include <string>

namespace vattn {

ManagerRegistry& ManagerRegistry::instance() {
  static ManagerRegistry* r = new ManagerRegistry();  // leaked: handlers may run during interpreter exit
  return *r;
}

uint64_t ManagerRegistry::add(std::shared_ptr<CacheManager> manager, std::shared_ptr<DeviceWriteGuard> write_guard) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  caches_.emplace(id, RegisteredCache{std::move(manager), std::move(write_guard)});
  return id;
}

uint64_t ManagerRegistry::add_group(const std::vector<int32_t>& ordinals, const std::vector<uint64_t>& ids) {
  std::lock_guard<std::mutex> lock(mu_);
  if (ordinals.size() != ids.size() || ids.empty())
    throw Error(ErrorKind::kInvalidArgument, "device group: " + std::to_string(ordinals.size()) + " ordinals for " +
                                                 std::to_string(ids.size()) + " caches");
  std::unordered_map<int32_t, uint64_t> members;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!caches_.count(ids[i]))
      throw Error(ErrorKind::kInvalidArgument, "device group: cache #" + std::to_string(ids[i]) + " is not open");
    if (!members.emplace(ordinals[i], ids[i]).second)
      throw Error(ErrorKind::kInvalidArgument,
                  "device group: device ordinal " + std::to_string(ordinals[i]) + " has two caches");
  }
  const uint64_t id = next_id_++;
  groups_.emplace(id, std::move(members));
  return id;
}

RegisteredCache ManagerRegistry::find_cache(uint64_t id, int32_t ordinal) {
  std::lock_guard<std::mutex> lock(mu_);
  auto group = groups_.find(id);
  if (group != groups_.end()) {
    auto member = group->second.find(ordinal);
    if (member == group->second.end())
      throw Error(ErrorKind::kInvalidArgument, "device group #" + std::to_string(id) + " has no cache on device " +
                                                   std::to_string(ordinal) + " (run its calls on the group's mesh)");
    id = member->second;
  }
  auto it = caches_.find(id);
  if (it == caches_.end())
    throw Error(ErrorKind::kClosed, "cache manager #" + std::to_string(id) + " is closed (or was never opened)");
  return it->second;
}

std::shared_ptr<CacheManager> ManagerRegistry::find(uint64_t id, int32_t ordinal) {
  return find_cache(id, ordinal).manager;
}

void ManagerRegistry::remove(uint64_t id) {
  RegisteredCache removed;  // released after the lock: a guard's destructor frees device memory
  {
    std::lock_guard<std::mutex> lock(mu_);
    groups_.erase(id);
    auto it = caches_.find(id);
    if (it == caches_.end()) return;
    removed = std::move(it->second);
    caches_.erase(it);
  }
}

}  // namespace vattn
