// Python bindings: the handler registrations() dict and the Manager object.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>

#include "backends/host_backend.h"
#include "core/cache_manager.h"
#include "handlers/handlers.h"
#include "handlers/registry.h"
#ifdef VATTN_WITH_CUDA
#include "backends/cuda_backend.h"
#endif

namespace nb = nanobind;
using namespace vattn;

namespace {

template <typename T>
nb::capsule encapsulate_ffi_call(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>, "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

std::unique_ptr<MemoryBackend> make_backend(const std::string& name, int device_ordinal) {
  if (name == "host") return std::make_unique<HostBackend>();
#ifdef VATTN_WITH_CUDA
  if (name == "cuda") return std::make_unique<CudaBackend>(device_ordinal);
#endif
  (void)device_ordinal;
  throw Error(ErrorKind::kInvalidArgument, "backend '" + name + "' is not available in this build");
}

// The Python-facing handle: owns the registry entry of one CacheManager.
class Manager {
 public:
  Manager(int64_t num_layers, int64_t max_batch, int64_t max_seq, int64_t kv_heads, int64_t head_dim,
          int64_t itemsize, int64_t page_bytes, int64_t pool_bytes, bool deferred_reclaim,
          const std::string& backend, int device_ordinal) {
    CacheLayout L;
    L.num_layers = num_layers, L.max_batch = max_batch, L.requested_max_seq = max_seq;
    L.kv_heads = kv_heads, L.head_dim = head_dim, L.itemsize = itemsize, L.page_bytes = page_bytes;
    manager_ = std::make_shared<CacheManager>(L, pool_bytes, deferred_reclaim, make_backend(backend, device_ordinal));
    id_ = ManagerRegistry::instance().add(manager_);
  }
  ~Manager() { close(); }

  void close() {
    if (!manager_) return;
    ManagerRegistry::instance().remove(id_);
    manager_->close();
  }
  CacheManager& m() {
    if (!manager_ || manager_->closed()) throw Error(ErrorKind::kClosed, "the cache manager is closed");
    return *manager_;
  }
  uint64_t id() const { return id_; }
  bool closed() const { return !manager_ || manager_->closed(); }
  const CacheLayout& layout() const { return manager_->layout(); }

  nb::dict stats() {
    CacheStats s = manager_->stats();
    nb::dict d;
    d["reserved_bytes"] = s.reserved_bytes;
    d["page_bytes"] = s.page_bytes;
    d["pages_budget"] = s.pages_budget;
    d["pages_created"] = s.pages_created;
    d["pages_free"] = s.pages_free;
    d["pages_mapped"] = s.pages_mapped;
    d["pages_mapped_free_slots"] = s.pages_mapped_free_slots;
    d["mapped_bytes"] = s.pages_mapped * s.page_bytes;
    d["physical_bytes"] = s.pages_created * s.page_bytes;
    d["live_slots"] = s.live_slots;
    d["creates"] = s.creates;
    d["destroys"] = s.destroys;
    d["maps"] = s.maps;
    d["unmaps"] = s.unmaps;
    d["slot_capacity"] = s.slot_capacity;
    d["slot_allocated"] = std::vector<bool>(s.slot_allocated.begin(), s.slot_allocated.end());
    return d;
  }

 private:
  std::shared_ptr<CacheManager> manager_;
  uint64_t id_ = 0;
};

nb::dict registrations() {
  nb::dict d;
  d["vattn_grow_cpu"] = encapsulate_ffi_call(kGrowCpu);
  d["vattn_write_cpu"] = encapsulate_ffi_call(kWriteCpu);
#ifdef VATTN_WITH_CUDA
  d["vattn_grow_cuda"] = encapsulate_ffi_call(kGrowCuda);
  d["vattn_write_cuda"] = encapsulate_ffi_call(kWriteCuda);
#endif
  return d;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "jax_vattention native core: VMM page manager, backends and XLA FFI handlers";

  // Error classes live in Python (jax_vattention.errors); Python hands them in.
  static nb::dict* error_classes = new nb::dict();  // leaked on purpose: used during exit
  m.def("_set_error_classes", [](nb::dict classes) { *error_classes = classes; });
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      nb::gil_scoped_acquire gil;
      nb::str key(e.python_name());
      PyObject* cls = error_classes->contains(key) ? (*error_classes)[key].ptr() : PyExc_RuntimeError;
      PyErr_SetString(cls, e.what());
    }
  });

  m.def("registrations", &registrations);
  m.def("cuda_compiled", [] {
#ifdef VATTN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  using G = nb::call_guard<nb::gil_scoped_release>;
  nb::class_<Manager>(m, "Manager")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const std::string&,
                    int>(),
           nb::arg("num_layers"), nb::arg("max_batch"), nb::arg("max_seq"), nb::arg("kv_heads"), nb::arg("head_dim"),
           nb::arg("itemsize"), nb::arg("page_bytes"), nb::arg("pool_bytes"), nb::arg("deferred_reclaim"),
           nb::arg("backend"), nb::arg("device_ordinal"))
      .def_prop_ro("id", &Manager::id)
      .def_prop_ro("closed", &Manager::closed)
      .def_prop_ro("max_seq", [](Manager& s) { return s.layout().max_seq; })
      .def_prop_ro("token_bytes", [](Manager& s) { return s.layout().token_bytes; })
      .def_prop_ro("slot_bytes", [](Manager& s) { return s.layout().slot_bytes; })
      .def_prop_ro("pages_per_slot", [](Manager& s) { return s.layout().pages_per_slot; })
      .def_prop_ro("granularity", [](Manager& s) { return s.m().backend().granularity(); })
      .def("tensor_address", [](Manager& s, int64_t layer, int64_t kv) { return s.m().tensor_base(layer, kv); })
      .def(
          "allocate", [](Manager& s, int64_t min_tokens) { return s.m().allocate(min_tokens); }, nb::arg("min_tokens"),
          G())
      .def("grow", [](Manager& s, int64_t slot, int64_t tokens) { s.m().grow_one(slot, tokens); }, G())
      .def("free", [](Manager& s, int64_t slot) { s.m().free(slot); }, G())
      .def(
          "trim", [](Manager& s, int64_t max_pages, bool release) { return s.m().trim(max_pages, release); },
          nb::arg("max_pages"), nb::arg("release_physical"), G())
      .def(
          "tensor_view",
          [](Manager& s, int64_t layer, int64_t kv, uint8_t dtype_code, uint8_t dtype_bits, nb::handle owner) {
            CacheManager& mm = s.m();
            const CacheLayout& L = mm.layout();
            void* addr = reinterpret_cast<void*>(mm.tensor_base(layer, kv));
            const size_t shape[4] = {static_cast<size_t>(L.max_batch), static_cast<size_t>(L.max_seq),
                                     static_cast<size_t>(L.kv_heads), static_cast<size_t>(L.head_dim)};
            nb::dlpack::dtype dt{dtype_code, dtype_bits, 1};
            int device_type = nb::device::cpu::value, device_id = 0;
#ifdef VATTN_WITH_CUDA
            if (auto* b = dynamic_cast<CudaBackend*>(&mm.backend())) {
              device_type = nb::device::cuda::value;
              device_id = b->device_ordinal();
            }
#endif
            // `owner` is released when jax no longer uses the memory (after the
            // view is deleted and computations using it finished); close() waits for it.
            return nb::ndarray<>(addr, 4, shape, owner, nullptr, dt, device_type, device_id);
          },
          nb::arg("layer"), nb::arg("kv"), nb::arg("dtype_code"), nb::arg("dtype_bits"), nb::arg("owner").none() = nb::none(),
          nb::rv_policy::reference)
      .def("capacity", [](Manager& s, int64_t slot) { return s.m().capacity(slot); })
      .def("allocated", [](Manager& s, int64_t slot) { return s.m().allocated(slot); })
      .def("stats", &Manager::stats)
      .def("close", &Manager::close, G())
      .def("inject_failures", [](Manager& s, int creates, int maps) { s.m().backend().inject_failures(creates, maps); })
#ifdef VATTN_WITH_CUDA
      .def("device_mem_info",
           [](Manager& s) {
             auto* b = dynamic_cast<CudaBackend*>(&s.m().backend());
             if (!b) throw Error(ErrorKind::kInvalidArgument, "device_mem_info needs the cuda backend");
             size_t free_b = 0, total_b = 0;
             b->mem_info(&free_b, &total_b);
             return std::make_pair(free_b, total_b);
           })
      .def("take_device_error",
           [](Manager& s) {
             auto* b = dynamic_cast<CudaBackend*>(&s.m().backend());
             std::vector<int32_t> out(4, 0);
             if (b) b->take_error(nullptr, out.data());
             return out;
           })
#endif
      ;
}
