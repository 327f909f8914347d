/* _buffer.c - gives Tensor the buffer protocol on every Python version (a pure-Python class
 * can only do so from 3.12 on). Tensor subclasses BufferBase and answers _buffer_info() with
 * (address, readonly, format, itemsize, shape, strides in bytes); this type turns that into a
 * Py_buffer, so memoryview(t), bytes(t) and other libraries read CPU tensors without a copy. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int getbuffer(PyObject *self, Py_buffer *view, int flags) {
    PyObject *info = PyObject_CallMethod(self, "_buffer_info", NULL);
    if (!info)
        return -1;
    unsigned long long addr;
    int readonly;
    const char *format;
    Py_ssize_t itemsize;
    PyObject *shape, *strides;
    if (!PyArg_ParseTuple(info, "KpsnO!O!", &addr, &readonly, &format, &itemsize, &PyTuple_Type,
                          &shape, &PyTuple_Type, &strides)) {
        Py_DECREF(info);
        return -1;
    }
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    if (PyTuple_GET_SIZE(strides) != ndim) {
        Py_DECREF(info);
        PyErr_SetString(PyExc_BufferError, "shape and strides differ in length");
        return -1;
    }
    if (readonly && (flags & PyBUF_WRITABLE)) {
        Py_DECREF(info);
        PyErr_SetString(PyExc_BufferError, "tensor is read-only");
        return -1;
    }
    /* shape, strides and the format string live in one block owned by the view */
    size_t fmt_len = strlen(format) + 1;
    Py_ssize_t *dims = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(2 * ndim + 1) + fmt_len);
    if (!dims) {
        Py_DECREF(info);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t len = itemsize, contiguous_stride = itemsize;
    int contiguous = 1;
    for (Py_ssize_t i = ndim - 1; i >= 0; i--) {
        dims[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, i));
        dims[ndim + i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(strides, i));
        if (dims[i] != 1 && dims[ndim + i] != contiguous_stride)
            contiguous = 0;
        contiguous_stride *= dims[i];
        len *= dims[i];
    }
    char *fmt = (char *)(dims + 2 * ndim + 1);
    memcpy(fmt, format, fmt_len);
    Py_DECREF(info);
    if (PyErr_Occurred()) {
        PyMem_Free(dims);
        return -1;
    }
    if (!contiguous && (flags & PyBUF_STRIDES) != PyBUF_STRIDES) {
        PyMem_Free(dims);
        PyErr_SetString(PyExc_BufferError, "tensor is not contiguous; call .contiguous() first");
        return -1;
    }
    view->buf = (void *)(uintptr_t)addr;
    view->obj = Py_NewRef(self);
    view->len = len;
    view->readonly = readonly;
    view->itemsize = itemsize;
    view->format = (flags & PyBUF_FORMAT) ? fmt : NULL;
    view->ndim = (int)ndim;
    view->shape = (flags & PyBUF_ND) == PyBUF_ND ? dims : NULL;
    view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? dims + ndim : NULL;
    view->suboffsets = NULL;
    view->internal = dims;
    return 0;
}

static void releasebuffer(PyObject *self, Py_buffer *view) { PyMem_Free(view->internal); }

static PyBufferProcs buffer_procs = {getbuffer, releasebuffer};

static PyTypeObject BufferBase = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "inference_pio._buffer.BufferBase",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base class giving CPU tensors the buffer protocol.",
    .tp_as_buffer = &buffer_procs,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_buffer", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__buffer(void) {
    if (PyType_Ready(&BufferBase) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&BufferBase);
    if (PyModule_AddObject(m, "BufferBase", (PyObject *)&BufferBase) < 0) {
        Py_DECREF(&BufferBase);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
