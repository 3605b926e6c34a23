#include "device_write_guard.h"

#include <string>
#include <vector>

namespace vattn {
namespace {

constexpr size_t kRefusedBytes = 4 * sizeof(int32_t);

DeviceMemory& device_memory_of(CacheManager& manager) {
  DeviceMemory* memory = manager.backend().device_memory();
  if (!memory)
    throw Error(ErrorKind::kInvalidArgument, std::string("the ") + manager.backend().name() +
                                                 " backend has no device memory to guard writes with");
  return *memory;
}

}  // namespace

DeviceWriteGuard::DeviceWriteGuard(std::shared_ptr<CacheManager> manager)
    : manager_(std::move(manager)), memory_(device_memory_of(*manager_)) {}

DeviceWriteGuard::~DeviceWriteGuard() {
  if (tables_.capacity) memory_.deallocate(tables_.capacity);
  if (tables_.refused) memory_.deallocate(tables_.refused);
}

void DeviceWriteGuard::allocate_tables(void* stream) {
  const int64_t n = manager_->layout().max_batch;
  Tables t;
  try {
    t.capacity = memory_.allocate(2 * n * sizeof(int32_t));  // {from, to} per slot
    t.refused = memory_.allocate(kRefusedBytes);
    memory_.fill_zero(stream, t.refused, kRefusedBytes);
  } catch (...) {
    if (t.capacity) memory_.deallocate(t.capacity);
    if (t.refused) memory_.deallocate(t.refused);
    throw;
  }
  tables_ = t;
  capacity_entries_ = 2 * n;
  uploaded_version_ = 0;
}

DeviceWriteGuard::Tables DeviceWriteGuard::sync(void* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!tables_.capacity) allocate_tables(stream);
  if (uploaded_version_ == 0 || uploaded_version_ != manager_->capacity_version()) {
    std::vector<int32_t> capacity;  // [max_batch][2] {from, to}
    const uint64_t version = manager_->writable_ranges(&capacity);
    // Pageable source: the call returns once the data is staged, so `capacity`
    // may go away afterwards; the copy is ordered on the stream before the kernel.
    memory_.copy_to_device(stream, tables_.capacity, capacity.data(), capacity_entries_ * sizeof(int32_t));
    uploaded_version_ = version;
  }
  return tables_;
}

DeviceWriteGuard::RefusedWrite DeviceWriteGuard::take_refused(void* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!tables_.refused) {  // no write ran yet; still wait, as callers rely on it for their own copies
    memory_.wait(stream);
    return {};
  }
  int32_t out[4] = {0, 0, 0, 0};
  if (!stream) memory_.wait(nullptr);  // the writes may be queued on any stream
  memory_.copy_to_host(stream, out, tables_.refused, kRefusedBytes);
  memory_.wait(stream);
  if (out[0]) {
    memory_.fill_zero(stream, tables_.refused, kRefusedBytes);
    if (!stream) memory_.wait(nullptr);  // cleared before any later write on another stream
  }
  return {out[0], out[1], out[2], out[3]};
}

void DeviceWriteGuard::raise_refused(void* stream) {
  const RefusedWrite r = take_refused(stream);
  if (!r.flag) return;
  throw Error(ErrorKind::kInvalidArgument,
              "an earlier write was refused on the device: row " + std::to_string(r.row) + " slot " +
                  std::to_string(r.slot) + " would end at token " + std::to_string(r.end) +
                  ", past the slot's backed capacity, or starts inside its read-only shared range (or the slot "
                  "is not allocated); nothing was written for it");
}

}  // namespace vattn
