// Python bindings of the C++ core (engine._core). No torch ABI: numpy arrays in and out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

namespace py = pybind11;
using selfeval::AppendResult;
using selfeval::BlockManager;

namespace {

py::array_t<int64_t> to_array(std::vector<int64_t>&& v) {
  auto* heap = new std::vector<int64_t>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(heap->size())}, heap->data(), owner);
}

py::tuple to_python(AppendResult&& r) {
  py::array_t<int32_t> cow({static_cast<py::ssize_t>(r.cow.size()), py::ssize_t{2}});
  auto c = cow.mutable_unchecked<2>();
  for (size_t i = 0; i < r.cow.size(); ++i) {
    c(i, 0) = r.cow[i].first;
    c(i, 1) = r.cow[i].second;
  }
  return py::make_tuple(to_array(std::move(r.slots)), cow);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "selfeval-engine C++ core: paged KV block manager with prefix caching";

  // C++ errors surface as the engine's own exception types (engine.errors).
  py::module_ errors = py::module_::import("engine.errors");
  static py::object out_of_blocks = errors.attr("OutOfBlocksError");
  static py::object sequence_error = errors.attr("SequenceIdError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const selfeval::OutOfBlocksError& e) {
      PyErr_SetString(out_of_blocks.ptr(), e.what());
    } catch (const selfeval::SequenceIdError& e) {
      PyErr_SetString(sequence_error.ptr(), e.what());
    }
  });

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t, uint64_t>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("hash_mask") = ~uint64_t{0})
      .def("allocate_prefix", &BlockManager::allocate_prefix, py::arg("seq_id"), py::arg("tokens"),
           py::arg("namespace") = 0,
           "Create seq_id over the cached full blocks that start tokens (at least one token left to "
           "compute); returns the cached token count.")
      .def("cache_blocks", &BlockManager::cache_blocks, py::arg("seq_id"), py::arg("tokens"),
           "Register seq_id's next full blocks (tokens from num_hashed_tokens on); returns blocks hashed.")
      .def("num_hashed_tokens", &BlockManager::num_hashed_tokens, py::arg("seq_id"))
      .def("is_cached", &BlockManager::is_cached, py::arg("block"))
      .def("evictable_blocks",
           [](const BlockManager& bm) {
             auto v = bm.evictable_blocks();
             return py::array_t<int32_t>(static_cast<py::ssize_t>(v.size()), v.data());
           },
           "Cached blocks no sequence holds, least recently freed first (evicted in that order).")
      .def("allocate",
           [](BlockManager& bm, int64_t seq_id, int64_t n) { return to_array(bm.allocate(seq_id, n)); },
           py::arg("seq_id"), py::arg("num_tokens"),
           "Create seq_id with num_tokens slots; returns the slots (int64).")
      .def("append",
           [](BlockManager& bm, int64_t seq_id, int64_t n) { return to_python(bm.append(seq_id, n)); },
           py::arg("seq_id"), py::arg("num_tokens"),
           "Grow seq_id; returns (slots int64[n], cow int32[k, 2] of (src, dst) block copies).")
      .def("append_many",
           [](BlockManager& bm, const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) {
             return to_python(bm.append_many(ids, counts));
           },
           py::arg("seq_ids"), py::arg("counts"),
           "Grow several sequences at once, all or nothing; slots concatenated in order.")
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("truncate", &BlockManager::truncate, py::arg("seq_id"), py::arg("length"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("blocks_needed", &BlockManager::blocks_needed, py::arg("seq_id"), py::arg("num_tokens"))
      .def("blocks_needed_many", &BlockManager::blocks_needed_many, py::arg("seq_ids"), py::arg("num_tokens"),
           "The sum of blocks_needed(seq_id, num_tokens) over seq_ids, each counted as if alone.")
      .def("length", &BlockManager::length, py::arg("seq_id"))
      .def("lengths",
           [](const BlockManager& bm, const std::vector<int64_t>& ids) {
             py::array_t<int64_t> out(static_cast<py::ssize_t>(ids.size()));
             auto o = out.mutable_unchecked<1>();
             for (size_t i = 0; i < ids.size(); ++i) o(i) = bm.length(ids[i]);
             return out;
           },
           py::arg("seq_ids"))
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("block_ids",
           [](const BlockManager& bm, int64_t seq_id) {
             const auto& b = bm.block_ids(seq_id);
             return py::array_t<int32_t>(static_cast<py::ssize_t>(b.size()), b.data());
           },
           py::arg("seq_id"))
      .def("block_tables",
           [](const BlockManager& bm, const std::vector<int64_t>& ids, int64_t width) {
             if (width < 0) width = bm.max_blocks(ids);
             py::array_t<int32_t> out({static_cast<py::ssize_t>(ids.size()),
                                       static_cast<py::ssize_t>(width)});
             bm.fill_block_tables(ids, width, out.mutable_data());
             return out;
           },
           py::arg("seq_ids"), py::arg("width") = -1,
           "Packed int32 [len(seq_ids), width] block tables, padded with 0.")
      .def("begin", &BlockManager::begin,
           "Start a transaction: rollback() undoes every change after this, commit() keeps them.")
      .def("commit", &BlockManager::commit)
      .def("rollback",
           [](BlockManager& bm) {
             auto v = bm.rollback();
             return py::array_t<int32_t>(static_cast<py::ssize_t>(v.size()), v.data());
           },
           "Undo the transaction; returns the blocks whose KV may have been overwritten in it.")
      .def_property_readonly("in_transaction", &BlockManager::in_transaction)
      .def("sequence_ids", &BlockManager::sequence_ids)
      .def("__contains__", &BlockManager::contains)
      .def("__len__", &BlockManager::num_sequences)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def_property_readonly("num_evictable_blocks", &BlockManager::num_evictable_blocks)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size);
}
