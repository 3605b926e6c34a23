// Python bindings: the handler registrations() dict and the Manager object.
// Thin: Python ints are unbounded, so integer arguments are converted here with
// a range check; everything else is the core's. jax_vattention/_core.pyi
// describes this module; keep the two in step.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>

#include "backends/host_backend.h"
#include "core/cache_manager.h"
#include "handlers/device_write_guard.h"
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

// A Python int (or any object with __index__) as int64: TypeError for other
// types, CacheValueError naming `name` for ints outside the int64 range.
int64_t to_int64(nb::handle value, const char* name) {
  nb::object index = nb::steal(PyNumber_Index(value.ptr()));
  if (!index.is_valid()) {
    PyErr_Clear();
    throw nb::type_error((std::string(name) + " must be an int, got " + Py_TYPE(value.ptr())->tp_name).c_str());
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow) {
    const size_t bits = nb::cast<size_t>(index.attr("bit_length")());
    const std::string shown = bits <= 256 ? nb::cast<std::string>(nb::str(index))
                                          : "a " + std::to_string(bits) + "-bit integer";
    throw Error(ErrorKind::kInvalidArgument,
                std::string(name) + "=" + shown + " does not fit in a signed 64-bit integer");
  }
  if (v == -1 && PyErr_Occurred()) throw nb::python_error();
  return v;
}

std::unique_ptr<MemoryBackend> make_backend(const std::string& name, int device_ordinal,
                                            UnbackedReads unbacked_reads) {
  if (name == "host") return std::make_unique<HostBackend>(unbacked_reads);
#ifdef VATTN_WITH_CUDA
  if (name == "cuda") return std::make_unique<CudaBackend>(device_ordinal, unbacked_reads);
#endif
  (void)device_ordinal;
  throw Error(ErrorKind::kInvalidArgument, "backend '" + name + "' is not available in this build");
}

// The Python-facing handle: owns the registry entry of one CacheManager and,
// when the host cannot store into the cache, its DeviceWriteGuard.
class Manager {
 public:
  Manager(const CacheLayout& layout, int64_t pool_bytes, bool deferred_reclaim, const std::string& backend,
          int device_ordinal, UnbackedReads unbacked_reads)
      : unbacked_reads_(unbacked_reads) {
    manager_ = std::make_shared<CacheManager>(layout, pool_bytes, deferred_reclaim,
                                              make_backend(backend, device_ordinal, unbacked_reads));
    if (manager_->backend().device_memory()) write_guard_ = std::make_shared<DeviceWriteGuard>(manager_);
    id_ = ManagerRegistry::instance().add(manager_, write_guard_);
  }
  ~Manager() { close(); }

  void close() {
    if (!manager_) return;
    ManagerRegistry::instance().remove(id_);
    manager_->close();     // waits for the device, so no kernel still reads the guard's tables
    write_guard_.reset();  // handlers still running hold their own reference
  }
  CacheManager& m() {
    if (!manager_ || manager_->closed()) throw Error(ErrorKind::kClosed, "the cache manager is closed");
    return *manager_;
  }
  uint64_t id() const { return id_; }
  bool closed() const { return !manager_ || manager_->closed(); }
  const CacheLayout& layout() const { return manager_->layout(); }
  UnbackedReads unbacked_reads() const { return unbacked_reads_; }  // readable after close too

  // {flag, row, slot, end} of the first write the device refused since the
  // last call, all zero if none (always on the host, which refuses eagerly).
  std::vector<int32_t> take_device_error() {
    m();
    if (!write_guard_) return {0, 0, 0, 0};
    const DeviceWriteGuard::RefusedWrite r = write_guard_->take_refused(nullptr);
    return {r.flag, r.row, r.slot, r.end};
  }

  std::pair<size_t, size_t> device_mem_info() {
    DeviceMemory* device = m().backend().device_memory();
    if (!device) throw Error(ErrorKind::kInvalidArgument, "device_mem_info needs the cuda backend");
    size_t free_bytes = 0, total_bytes = 0;
    device->memory_info(&free_bytes, &total_bytes);
    return {free_bytes, total_bytes};
  }

  // A DLPack tensor over reserved tensor `tensor`: [max_batch, max_seq, kv_heads, head_dim] per-layer,
  // [max_batch, max_seq, g, 2, kv_heads, head_dim] interleaved (CacheConfig.tensor_shape).
  // `host_device` is the DLPack device id of a host view: which of the process's CPU devices jax puts it on.
  nb::ndarray<> tensor_view(int64_t tensor, uint8_t dtype_code, uint8_t dtype_bits, nb::handle owner,
                            int32_t host_device) {
    CacheManager& mm = m();
    const CacheLayout& L = mm.layout();
    void* addr = reinterpret_cast<void*>(mm.tensor_base(tensor));
    const size_t mb = static_cast<size_t>(L.max_batch), seq = static_cast<size_t>(L.max_seq);
    const size_t h = static_cast<size_t>(L.kv_heads), d = static_cast<size_t>(L.head_dim);
    const size_t per_layer[4] = {mb, seq, h, d};
    const size_t interleaved[6] = {mb, seq, static_cast<size_t>(L.layers_per_group), 2, h, d};
    const bool grouped = L.interleaved();
    nb::dlpack::dtype dt{dtype_code, dtype_bits, 1};
    int device_type = nb::device::cpu::value, device_id = host_device;
    if (DeviceMemory* device = mm.backend().device_memory()) {  // device memory means the CUDA backend
      device_type = nb::device::cuda::value;
      device_id = device->device_ordinal();
    }
    // `owner` is released when jax no longer uses the memory (after the view is
    // deleted and computations using it finished); close() waits for it.
    return nb::ndarray<>(addr, grouped ? 6 : 4, grouped ? interleaved : per_layer, owner, nullptr, dt, device_type,
                         device_id);
  }

  nb::dict stats() {
    CacheStats s = manager_->stats();
    nb::dict d;
    d["reserved_bytes"] = s.reserved_bytes;
    d["page_bytes"] = s.page_bytes;
    d["pages_budget"] = s.pages_budget;
    d["pages_created"] = s.pages_created;
    d["pages_free"] = s.pages_free;
    d["pages_in_use"] = s.pages_in_use;
    d["pages_mapped"] = s.pages_mapped;
    d["pages_pinned"] = s.pages_pinned;
    d["pages_shared"] = s.pages_shared;
    d["pages_mapped_free_slots"] = s.pages_mapped_free_slots;
    d["pages_live"] = s.pages_live;
    d["mapped_bytes"] = s.pages_mapped * s.page_bytes;
    d["physical_bytes"] = s.pages_created * s.page_bytes;
    d["live_slots"] = s.live_slots;
    d["creates"] = s.creates;
    d["destroys"] = s.destroys;
    d["maps"] = s.maps;
    d["unmaps"] = s.unmaps;
    // Tuples, as jax_vattention.CacheStats holds them.
    d["slot_capacity"] = nb::tuple(nb::cast(s.slot_capacity));
    d["slot_allocated"] = nb::tuple(nb::cast(std::vector<bool>(s.slot_allocated.begin(), s.slot_allocated.end())));
    d["slot_shared_pages"] = nb::tuple(nb::cast(s.slot_shared_pages));
    return d;
  }

 private:
  std::shared_ptr<CacheManager> manager_;
  std::shared_ptr<DeviceWriteGuard> write_guard_;
  uint64_t id_ = 0;
  UnbackedReads unbacked_reads_;
};

void init_manager(Manager* self, nb::handle num_layers, nb::handle max_batch, nb::handle max_seq,
                  nb::handle kv_heads, nb::handle head_dim, nb::handle itemsize, nb::handle page_bytes,
                  nb::handle pool_bytes, bool deferred_reclaim, const std::string& backend, int device_ordinal,
                  const std::string& unbacked_reads, nb::handle layers_per_group) {
  const UnbackedReads mode = parse_unbacked_reads(unbacked_reads);  // named before anything is reserved
  CacheLayout L;
  L.num_layers = to_int64(num_layers, "num_layers");
  L.max_batch = to_int64(max_batch, "max_batch");
  L.requested_max_seq = to_int64(max_seq, "max_seq");
  L.kv_heads = to_int64(kv_heads, "kv_heads");
  L.head_dim = to_int64(head_dim, "head_dim");
  L.itemsize = to_int64(itemsize, "itemsize");
  L.page_bytes = to_int64(page_bytes, "page_bytes");
  L.layers_per_group = to_int64(layers_per_group, "layers_per_group");
  L.finalize();  // a layout that overflows is named before the pool size derived from it
  new (self) Manager(L, to_int64(pool_bytes, "pool_bytes"), deferred_reclaim, backend, device_ordinal, mode);
}

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
  m.def("_set_error_classes", [](nb::dict classes) { *error_classes = classes; }, nb::arg("classes"));
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
  // Device groups (one cache per device, tensor parallelism): an id whose FFI calls each device resolves to its
  // own cache by the XLA FFI device ordinal.
  m.def(
      "add_device_group",
      [](const std::vector<int32_t>& ordinals, const std::vector<uint64_t>& ids) {
        return ManagerRegistry::instance().add_group(ordinals, ids);
      },
      nb::arg("ordinals"), nb::arg("ids"));
  m.def("remove_device_group", [](uint64_t id) { ManagerRegistry::instance().remove(id); }, nb::arg("id"));
  m.def("cuda_compiled", [] {
#ifdef VATTN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  using G = nb::call_guard<nb::gil_scoped_release>;
  nb::class_<Manager>(m, "Manager")
      .def("__init__", &init_manager, nb::arg("num_layers"), nb::arg("max_batch"), nb::arg("max_seq"),
           nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("itemsize"), nb::arg("page_bytes"),
           nb::arg("pool_bytes"), nb::arg("deferred_reclaim"), nb::arg("backend"), nb::arg("device_ordinal"),
           nb::arg("unbacked_reads"), nb::arg("layers_per_group") = 1)
      .def_prop_ro("id", &Manager::id)
      .def_prop_ro("closed", &Manager::closed)
      .def_prop_ro("unbacked_reads", [](Manager& s) { return std::string(unbacked_reads_name(s.unbacked_reads())); })
      .def_prop_ro("max_seq", [](Manager& s) { return s.layout().max_seq; })
      .def_prop_ro("layers_per_group", [](Manager& s) { return s.layout().layers_per_group; })
      .def_prop_ro("entries_per_token", [](Manager& s) { return s.layout().entries_per_token; })
      .def_prop_ro("entry_bytes", [](Manager& s) { return s.layout().entry_bytes; })
      .def_prop_ro("token_bytes", [](Manager& s) { return s.layout().token_bytes; })
      .def_prop_ro("num_tensors", [](Manager& s) { return s.layout().num_tensors(); })
      .def_prop_ro("slot_bytes", [](Manager& s) { return s.layout().slot_bytes; })
      .def_prop_ro("tensor_bytes", [](Manager& s) { return s.layout().tensor_bytes; })
      .def_prop_ro("pages_per_slot", [](Manager& s) { return s.layout().pages_per_slot; })
      .def_prop_ro("granularity", [](Manager& s) { return s.m().backend().granularity(); })
      .def(
          "tensor_address", [](Manager& s, nb::handle tensor) { return s.m().tensor_base(to_int64(tensor, "tensor")); },
          nb::arg("tensor"))
      .def(
          "locate",
          [](Manager& s, nb::handle layer, nb::handle kv) {
            const EntryLocation at = s.layout().locate(to_int64(layer, "layer"), to_int64(kv, "kv"));
            return std::make_pair(at.tensor, at.offset);
          },
          nb::arg("layer"), nb::arg("kv"))
      .def(
          "entry_address",
          [](Manager& s, nb::handle layer, nb::handle kv) {
            return s.m().entry_address(to_int64(layer, "layer"), to_int64(kv, "kv"));
          },
          nb::arg("layer"), nb::arg("kv"))
      // Integer arguments are converted with the GIL held; the core call then
      // runs without it (it may wait on the device or on the manager's lock).
      .def(
          "allocate",
          [](Manager& s, nb::handle min_tokens) {
            const int64_t n = to_int64(min_tokens, "min_tokens");
            nb::gil_scoped_release release;
            return s.m().allocate(n);
          },
          nb::arg("min_tokens"))
      .def(
          "grow",
          [](Manager& s, nb::handle slot, nb::handle tokens) {
            const int64_t i = to_int64(slot, "slot"), n = to_int64(tokens, "tokens");
            nb::gil_scoped_release release;
            s.m().grow_one(i, n);
          },
          nb::arg("slot"), nb::arg("tokens"))
      .def(
          "free",
          [](Manager& s, nb::handle slot) {
            const int64_t i = to_int64(slot, "slot");
            nb::gil_scoped_release release;
            s.m().free(i);
          },
          nb::arg("slot"))
      .def(
          "trim",
          [](Manager& s, nb::handle max_pages, bool release_physical) {
            const int64_t n = to_int64(max_pages, "max_pages");
            nb::gil_scoped_release release;
            return s.m().trim(n, release_physical);
          },
          nb::arg("max_pages"), nb::arg("release_physical"))
      // Page sharing: handles are PageHandles (uint64) as Python ints, [page][tensor].
      .def(
          "pin_pages",
          [](Manager& s, nb::handle slot, nb::handle n_pages) {
            const int64_t i = to_int64(slot, "slot"), n = to_int64(n_pages, "n_pages");
            nb::gil_scoped_release release;
            return s.m().pin_pages(i, n);
          },
          nb::arg("slot"), nb::arg("n_pages"))
      .def(
          "unpin_pages",
          [](Manager& s, const std::vector<PageHandle>& handles) {
            nb::gil_scoped_release release;
            s.m().unpin_pages(handles);
          },
          nb::arg("handles"))
      .def(
          "map_shared",
          [](Manager& s, nb::handle slot, const std::vector<PageHandle>& handles) {
            const int64_t i = to_int64(slot, "slot");
            nb::gil_scoped_release release;
            s.m().map_shared(i, handles);
          },
          nb::arg("slot"), nb::arg("handles"))
      .def(
          "shared_pages", [](Manager& s, nb::handle slot) { return s.m().shared_pages(to_int64(slot, "slot")); },
          nb::arg("slot"))
      .def(
          "tensor_view",
          [](Manager& s, nb::handle tensor, uint8_t dtype_code, uint8_t dtype_bits, nb::handle owner,
             int32_t host_device) {
            return s.tensor_view(to_int64(tensor, "tensor"), dtype_code, dtype_bits, owner, host_device);
          },
          nb::arg("tensor"), nb::arg("dtype_code"), nb::arg("dtype_bits"),
          nb::arg("owner").none() = nb::none(), nb::arg("host_device") = 0, nb::rv_policy::reference)
      .def(
          "capacity", [](Manager& s, nb::handle slot) { return s.m().capacity(to_int64(slot, "slot")); },
          nb::arg("slot"))
      .def(
          "allocated", [](Manager& s, nb::handle slot) { return s.m().allocated(to_int64(slot, "slot")); },
          nb::arg("slot"))
      .def("stats", &Manager::stats)
      .def("close", &Manager::close, G())
      .def(
          "inject_failures", [](Manager& s, int creates, int maps) { s.m().backend().inject_failures(creates, maps); },
          nb::arg("creates"), nb::arg("maps"))
      .def("device_mem_info", &Manager::device_mem_info, G())
      .def("take_device_error", &Manager::take_device_error, G());
}
