// XLA FFI handlers for the CUDA platform.
//
// grow copies slots/lengths [B] to the host and synchronizes the stream, then
// maps pages; mapping is a host-side driver call, so it completes before any
// later kernel on the stream runs. The sync is one small D2H copy per decode
// step, the same price XLA pays to test a while loop's condition.
//
// write never leaves the GPU: a kernel checks each row against a device table
// of writable capacity and reports violations through an error word instead of
// storing into unmapped memory. The next grow (or Manager.check_device_errors)
// raises that error.
#include <string>
#include <vector>

#include "../backends/cuda_backend.h"
#include "common.h"
#include "handlers.h"
#include "write_kernel.h"

namespace vattn {
namespace {

CudaBackend& cuda_backend_of(CacheManager& m) {
  auto* b = dynamic_cast<CudaBackend*>(&m.backend());
  if (!b)
    throw Error(ErrorKind::kInvalidArgument, std::string("this cache lives on the ") + m.backend().name() +
                                                 " backend but the computation runs on a CUDA device");
  return *b;
}

void raise_device_error(const int32_t err[4]) {
  if (!err[0]) return;
  throw Error(ErrorKind::kInvalidArgument,
              "an earlier write was refused on the device: row " + std::to_string(err[1]) + " slot " +
                  std::to_string(err[2]) + " would end at token " + std::to_string(err[3]) +
                  ", past the slot's backed capacity (or the slot is not allocated); nothing was written for it");
}

CudaBackend::Tables sync_tables(CacheManager& m, CudaBackend& backend, CUstream stream) {
  std::vector<int32_t> capacity;
  if (backend.tables_version() != m.capacity_version() || backend.tables_version() == 0) {
    const uint64_t version = m.writable_capacity(&capacity);
    return backend.tables(stream, capacity, version);
  }
  return backend.tables(stream, capacity, backend.tables_version());
}

ffi::Error GrowCuda(CUstream stream, uint64_t manager_id, I32Vec slots,
                    I32Vec lengths, I32Out out) {
  return guarded("grow", [&] {
    auto m = ManagerRegistry::instance().find(manager_id);
    CudaBackend& backend = cuda_backend_of(*m);
    const CudaDriver& cu = backend.driver();
    const int64_t n = static_cast<int64_t>(slots.element_count());
    require(static_cast<int64_t>(lengths.element_count()) == n, "slots and lengths must have the same shape [B]");
    std::vector<int32_t> hs(n), hl(n);
    const size_t bytes = n * sizeof(int32_t);
    cu.check(cu.cuMemcpyDtoHAsync(hs.data(), reinterpret_cast<CUdeviceptr>(slots.typed_data()), bytes, stream),
             "cuMemcpyDtoHAsync(slots)");
    cu.check(cu.cuMemcpyDtoHAsync(hl.data(), reinterpret_cast<CUdeviceptr>(lengths.typed_data()), bytes, stream),
             "cuMemcpyDtoHAsync(lengths)");
    int32_t err[4];
    backend.take_error(stream, err);  // synchronizes the stream
    raise_device_error(err);
    m->grow(hs.data(), hl.data(), n);
    sync_tables(*m, backend, stream);
    cu.check(cu.cuMemcpyDtoDAsync(reinterpret_cast<CUdeviceptr>(out->typed_data()),
                                  reinterpret_cast<CUdeviceptr>(lengths.typed_data()), bytes, stream),
             "cuMemcpyDtoDAsync(lengths)");
  });
}

ffi::Error WriteCuda(CUstream stream, uint64_t manager_id, int64_t layer, ffi::AnyBuffer k_new,
                     ffi::AnyBuffer v_new, I32Vec slots, I32Vec starts,
                     I32Vec counts, I32Out out) {
  return guarded("write", [&] {
    auto m = ManagerRegistry::instance().find(manager_id);
    CudaBackend& backend = cuda_backend_of(*m);
    const CacheLayout& L = m->layout();
    const WriteShape ws = check_write_args(L, layer, k_new, v_new, slots.element_count(), starts.element_count(),
                                           counts.element_count());
    const CudaBackend::Tables t = sync_tables(*m, backend, stream);
    WriteKernelArgs a;
    a.k_new = k_new.untyped_data();
    a.v_new = v_new.untyped_data();
    a.slots = slots.typed_data();
    a.starts = starts.typed_data();
    a.counts = counts.typed_data();
    a.out_lengths = out->typed_data();
    a.capacity = reinterpret_cast<const int32_t*>(t.capacity);
    a.error = reinterpret_cast<int32_t*>(t.error);
    a.k_base = reinterpret_cast<void*>(m->tensor_base(layer, 0));
    a.v_base = reinterpret_cast<void*>(m->tensor_base(layer, 1));
    a.batch = ws.batch;
    a.tokens = ws.tokens;
    a.token_bytes = L.token_bytes;
    a.slot_bytes = L.slot_bytes;
    a.max_batch = L.max_batch;
    if (ws.tokens == 0) {  // nothing to copy; lengths are the starts
      backend.driver().check(backend.driver().cuMemcpyDtoDAsync(reinterpret_cast<CUdeviceptr>(a.out_lengths),
                                                                reinterpret_cast<CUdeviceptr>(a.starts),
                                                                ws.batch * sizeof(int32_t), stream),
                             "cuMemcpyDtoDAsync(starts)");
      return;
    }
    const char* launch_error = launch_write_kv(stream, a);
    if (*launch_error) throw Error(ErrorKind::kBackend, std::string("write kernel launch failed: ") + launch_error);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGrowCuda, GrowCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Attr<uint64_t>("manager_id")
                                  .Arg<I32Vec>()  // slots   [B]
                                  .Arg<I32Vec>()  // lengths [B]
                                  .Ret<I32Vec>()  // lengths [B], after mapping
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWriteCuda, WriteCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Attr<uint64_t>("manager_id")
                                  .Attr<int64_t>("layer")
                                  .Arg<ffi::AnyBuffer>()            // k_new  [B, T, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()            // v_new  [B, T, Hkv, D]
                                  .Arg<I32Vec>()  // slots  [B]
                                  .Arg<I32Vec>()  // starts [B]
                                  .Arg<I32Vec>()  // counts [B]
                                  .Ret<I32Vec>()  // lengths [B] = starts + counts
);

}  // namespace vattn
