// The importable pyprune_ext._C module. It holds no functions: importing it
// loads this shared library, whose static initialisers register the ops with
// the dispatcher (torch.ops.pyprune.*). Kept apart from ops.cpp so that the
// CMake build for libtorch users needs no Python.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "pyprune_ext compiled ops (registered as torch.ops.pyprune.*)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
