#include "registry.h"

#include <string>

namespace vattn {

ManagerRegistry& ManagerRegistry::instance() {
  static ManagerRegistry* r = new ManagerRegistry();  // leaked: handlers may run during interpreter exit
  return *r;
}

uint64_t ManagerRegistry::add(std::shared_ptr<CacheManager> manager) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  managers_.emplace(id, std::move(manager));
  return id;
}

std::shared_ptr<CacheManager> ManagerRegistry::find(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = managers_.find(id);
  if (it == managers_.end())
    throw Error(ErrorKind::kClosed, "cache manager #" + std::to_string(id) + " is closed (or was never opened)");
  return it->second;
}

void ManagerRegistry::remove(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  managers_.erase(id);
}

}  // namespace vattn
