/* The fused step's check that a model's modules are still the ones its layer table was built
 * from (fused_step.py): over a thousand (dict, key, value) links a token, each `dict.get(key) is
 * value`. Python's C-level map over them costs ~0.1 ms a token; this loop a fraction of it.
 *
 * Loaded with ctypes.PyDLL (the GIL held, as the calls below need) and built like the kernels,
 * without Python's headers, which a machine with only Python and a C compiler may lack: the
 * few functions it calls are declared here from the stable ABI and resolved against the running
 * interpreter, as an extension module's are. */
#include <stddef.h>

typedef struct _object PyObject;
typedef ptrdiff_t Py_ssize_t;

extern PyObject *PyDict_GetItem(PyObject *dict, PyObject *key); /* borrowed; NULL when absent */
extern PyObject *PyTuple_GetItem(PyObject *tuple, Py_ssize_t i); /* borrowed */
extern Py_ssize_t PyTuple_Size(PyObject *tuple);

/* 1 when dicts[i].get(keys[i]) is values[i] for every i (an absent key reads as `none`), else
 * 0; -1 when the three are not tuples of one length. */
int mlm_links_current(PyObject *dicts, PyObject *keys, PyObject *values, PyObject *none) {
    Py_ssize_t n = PyTuple_Size(dicts);
    if (n < 0 || PyTuple_Size(keys) != n || PyTuple_Size(values) != n)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *found = PyDict_GetItem(PyTuple_GetItem(dicts, i), PyTuple_GetItem(keys, i));
        if ((found ? found : none) != PyTuple_GetItem(values, i))
            return 0;
    }
    return 1;
}
