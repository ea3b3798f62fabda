// The Python module samsvae._C. Importing it runs the TORCH_LIBRARY registrations of every
// kernel (torch.ops.samsvae.*); the module itself only exposes the CPU ISA selection:
//   cpu_isa() -> str, supported_isas() -> list[str], set_cpu_isa(name: str) -> None
#include <Python.h>

#include "common/cpu_dispatch.h"

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(samsvae::cpu::active_kernels().isa);
}

PyObject* py_supported_isas(PyObject*, PyObject*) {
  const std::vector<std::string> isas = samsvae::cpu::supported_isas();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(isas.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i)
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), PyUnicode_FromString(isas[i].c_str()));
  return out;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string err = samsvae::cpu::set_cpu_isa(name);
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Name of the ISA the CPU kernels run with."},
    {"supported_isas", py_supported_isas, METH_NOARGS,
     "ISAs compiled in and supported by this CPU, widest first."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Select the kernel ISA: 'auto', 'avx512', 'avx2' or 'baseline' (for tests and timing)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "samsvae._C",
                       "Compiled CPU kernels of samsvae (torch.ops.samsvae.*).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
