// The Python module toolcall/kernels.py loads: the ops of ops.h and the
// thread count. Arrays cross as mlx.core.array (nanobind domain "mlx").
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "common.h"
#include "ops.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_toolcall_native, m) {
  m.doc() = "toolcall's AVX2 CPU kernels as MLX primitives (see toolcall/kernels.py)";
  m.def("rms_norm", &tcn::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("swiglu", &tcn::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rope", &tcn::rope, "x"_a, "offset"_a, "dims"_a, "base"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("attention", &tcn::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "mask_mode"_a, "mask"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none());
  m.def("cross_entropy", &tcn::cross_entropy, "logits"_a, "targets"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("threads", &tcn::threads, "Threads the kernels use.");
  m.def("set_threads", &tcn::set_threads, "n"_a, "Set the threads the kernels use (fixed work split: results do not depend on it).");
}
