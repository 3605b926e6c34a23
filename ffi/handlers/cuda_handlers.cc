// XLA FFI handlers for the CUDA platform.
//
// grow copies slots/lengths [B] to the host and synchronizes the stream, then
// maps pages; mapping is a host-side driver call, so it completes before any
// later kernel on the stream runs. The sync is one small D2H copy per decode
// step, the same price XLA pays to test a while loop's condition.
//
// write never leaves the GPU: a kernel checks each row against the device
// table of writable capacity (DeviceWriteGuard) and reports violations through
// the refused-write record instead of storing into unmapped memory. The next
// grow (or Manager.take_device_error) raises that error.
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "common.h"
#include "device_write_guard.h"
#include "handlers.h"
#include "write_kernel.h"

namespace vattn {
namespace {

// The registered cache and its device write guard, or an error if the cache
// lives where a CUDA computation cannot reach it.
RegisteredCache find_device_cache(uint64_t manager_id, int32_t ordinal) {
  RegisteredCache cache = ManagerRegistry::instance().find_cache(manager_id, ordinal);
  if (!cache.write_guard)
    throw Error(ErrorKind::kInvalidArgument, std::string("this cache lives on the ") +
                                                 cache.manager->backend().name() +
                                                 " backend but the computation runs on a CUDA device");
  return cache;
}

uintptr_t device_address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

ffi::Error GrowCuda(cudaStream_t stream, int32_t ordinal, uint64_t manager_id, I32Vec slots, I32Vec lengths,
                    I32Out out) {
  return guarded("grow", [&] {
    const RegisteredCache cache = find_device_cache(manager_id, ordinal);
    DeviceWriteGuard& guard = *cache.write_guard;
    DeviceMemory& memory = guard.memory();
    const int64_t n = check_grow_args(slots, lengths);
    const size_t bytes = n * sizeof(int32_t);
    std::vector<int32_t> host_slots(n), host_lengths(n);
    memory.copy_to_host(stream, host_slots.data(), device_address(slots.typed_data()), bytes);
    memory.copy_to_host(stream, host_lengths.data(), device_address(lengths.typed_data()), bytes);
    guard.raise_refused(stream);  // waits for the stream, so the copies above are done
    cache.manager->grow(host_slots.data(), host_lengths.data(), n);
    guard.sync(stream);
    memory.copy_on_device(stream, device_address(out->typed_data()), device_address(lengths.typed_data()), bytes);
  });
}

ffi::Error WriteCuda(cudaStream_t stream, int32_t ordinal, uint64_t manager_id, int64_t layer, ffi::AnyBuffer k_new,
                     ffi::AnyBuffer v_new, I32Vec slots, I32Vec starts, I32Vec counts, I32Out out) {
  cudaError_t launched = cudaSuccess;
  ffi::Error error = guarded("write", [&] {
    const RegisteredCache cache = find_device_cache(manager_id, ordinal);
    DeviceWriteGuard& guard = *cache.write_guard;
    CacheManager& m = *cache.manager;
    const CacheLayout& L = m.layout();
    const WriteShape ws = check_write_args(L, layer, k_new, v_new, slots, starts, counts);
    const DeviceWriteGuard::Tables tables = guard.sync(stream);
    if (ws.tokens == 0) {  // nothing to copy; lengths are the starts
      guard.memory().copy_on_device(stream, device_address(out->typed_data()), device_address(starts.typed_data()),
                                    ws.batch * sizeof(int32_t));
      return;
    }
    WriteKernelArgs a;
    a.k_new = k_new.untyped_data();
    a.v_new = v_new.untyped_data();
    a.slots = slots.typed_data();
    a.starts = starts.typed_data();
    a.counts = counts.typed_data();
    a.out_lengths = out->typed_data();
    a.capacity = reinterpret_cast<const int32_t*>(tables.capacity);
    a.error = reinterpret_cast<int32_t*>(tables.refused);
    a.k_base = reinterpret_cast<void*>(m.entry_address(layer, 0));  // the layer's entries, wherever it lives
    a.v_base = reinterpret_cast<void*>(m.entry_address(layer, 1));
    a.batch = ws.batch;
    a.tokens = ws.tokens;
    a.entry_bytes = L.entry_bytes;
    a.token_bytes = L.token_bytes;
    a.slot_bytes = L.slot_bytes;
    a.max_batch = L.max_batch;
    launched = launch_write_kv(stream, a);
  });
  if (!error.success()) return error;
  if (launched != cudaSuccess)
    return ffi::Error::Internal(std::string("BackendError: write: write kernel launch failed: ") +
                                cudaGetErrorString(launched));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGrowCuda, GrowCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()  // picks a device group's member
                                  .Attr<uint64_t>("manager_id")
                                  .Arg<I32Vec>()  // slots   [B]
                                  .Arg<I32Vec>()  // lengths [B]
                                  .Ret<I32Vec>()  // lengths [B], after mapping
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWriteCuda, WriteCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()  // picks a device group's member
                                  .Attr<uint64_t>("manager_id")
                                  .Attr<int64_t>("layer")
                                  .Arg<ffi::AnyBuffer>()  // k_new  [B, T, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()  // v_new  [B, T, Hkv, D]
                                  .Arg<I32Vec>()          // slots  [B]
                                  .Arg<I32Vec>()          // starts [B]
                                  .Arg<I32Vec>()          // counts [B]
                                  .Ret<I32Vec>()          // lengths [B] = starts + counts
);

}  // namespace vattn
