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

RegisteredCache ManagerRegistry::find_cache(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = caches_.find(id);
  if (it == caches_.end())
    throw Error(ErrorKind::kClosed, "cache manager #" + std::to_string(id) + " is closed (or was never opened)");
  return it->second;
}

std::shared_ptr<CacheManager> ManagerRegistry::find(uint64_t id) { return find_cache(id).manager; }

void ManagerRegistry::remove(uint64_t id) {
  RegisteredCache removed;  // released after the lock: a guard's destructor frees device memory
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = caches_.find(id);
    if (it == caches_.end()) return;
    removed = std::move(it->second);
    caches_.erase(it);
  }
}

}  // namespace vattn
