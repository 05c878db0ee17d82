/* halb.certs._tlsdirect: the per-record calls of a TLS connection (SSL_read_ex,
 * SSL_write_ex, SSL_pending) made straight on the OpenSSL connection that CPython's
 * ssl.SSLObject owns, for uvloop's SSL protocol (halb/certs/tls.py, DirectSSLObject).
 *
 * Why: uvloop calls the SSLObject's read/write/pending once per record. CPython's _ssl
 * methods around them cost ~2,000 instructions per keep-alive request beyond OpenSSL's
 * own work (docs/benchmarks.md, "HTTPS: where the time goes"): argument tuples, the GIL
 * released and taken back around every call (OpenSSL on memory BIOs never blocks), and
 * `read(262144)` allocating a 256 KiB bytes object per record to shrink it to the record's
 * size. Here a record is read into a 16 KiB stack buffer (a TLS record carries at most
 * 16 KiB of plaintext; more pending data is read by uvloop's loop, which asks pending())
 * and copied into a bytes object of its size, with the GIL held.
 *
 * Only the success path is ours: when OpenSSL reports anything but success (want-read,
 * close_notify, an alert, a protocol error) the call is repeated through CPython's own
 * method, which re-runs the same OpenSSL call from the same state and raises or returns
 * exactly what ssl.SSLObject would. No OpenSSL headers are needed: the five functions are
 * looked up in the libssl that CPython's _ssl module itself is linked with (dlopen of
 * _ssl's file with RTLD_NOLOAD, then dlsym through its dependencies), so the SSL pointer is
 * always handled by the library that created it. `bind` checks the pointer it takes from
 * CPython's _ssl._SSLSocket (layout: PyObject_HEAD, Socket, SSL*, stable since 3.x) by
 * asking OpenSSL for the connection's app data, which CPython sets to the _SSLSocket
 * itself; on any mismatch it returns None and the caller keeps CPython's methods.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>

typedef struct ssl_st SSL;  /* opaque */

typedef int (*read_ex_t)(SSL *, void *, size_t, size_t *);
typedef int (*write_ex_t)(SSL *, const void *, size_t, size_t *);
typedef int (*pending_t)(const SSL *);
typedef void *(*get_ex_data_t)(const SSL *, int);

static read_ex_t p_read_ex;
static write_ex_t p_write_ex;
static pending_t p_pending;
static get_ex_data_t p_get_ex_data;

#define RECORD_MAX 16384  /* TLS plaintext per record (RFC 8446 5.1, RFC 5246 6.2.1) */

/* CPython's PySSLSocket, as far as we read it. */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} cpython_sslsocket;

typedef struct {
    PyObject_HEAD
    PyObject *sock;      /* the _ssl._SSLSocket (owns the SSL) */
    SSL *ssl;
    PyObject *fb_read;   /* CPython's bound methods: every non-success path */
    PyObject *fb_write;
} Direct;

static void direct_dealloc(Direct *self) {
    Py_XDECREF(self->sock);
    Py_XDECREF(self->fb_read);
    Py_XDECREF(self->fb_write);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* read(len[, buffer]) -> bytes (or the count read into buffer, via CPython) */
static PyObject *direct_read(Direct *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyLong_CheckExact(args[0]))
        return PyObject_Vectorcall(self->fb_read, args, nargs, NULL);
    Py_ssize_t want = PyLong_AsSsize_t(args[0]);
    if (want <= 0)
        return PyObject_Vectorcall(self->fb_read, args, nargs, NULL);
    char buf[RECORD_MAX];
    size_t n = 0;
    if (p_read_ex(self->ssl, buf, (size_t)(want < RECORD_MAX ? want : RECORD_MAX), &n) != 1 || n == 0)
        return PyObject_Vectorcall(self->fb_read, args, nargs, NULL);
    return PyBytes_FromStringAndSize(buf, (Py_ssize_t)n);
}

/* write(data) -> int */
static PyObject *direct_write(Direct *self, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyObject_CallOneArg(self->fb_write, data);
    }
    size_t n = 0;
    int ok = view.len > 0 && view.len <= INT_MAX && p_write_ex(self->ssl, view.buf, (size_t)view.len, &n) == 1;
    PyBuffer_Release(&view);
    if (!ok)
        return PyObject_CallOneArg(self->fb_write, data);
    return PyLong_FromSize_t(n);
}

static PyObject *direct_pending(Direct *self, PyObject *unused) {
    return PyLong_FromLong(p_pending(self->ssl));
}

static PyMethodDef direct_methods[] = {
    {"read", (PyCFunction)(void (*)(void))direct_read, METH_FASTCALL, "SSL_read_ex into a new bytes"},
    {"write", (PyCFunction)direct_write, METH_O, "SSL_write_ex"},
    {"pending", (PyCFunction)direct_pending, METH_NOARGS, "SSL_pending"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DirectType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "halb.certs._tlsdirect.Direct",
    .tp_basicsize = sizeof(Direct),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)direct_dealloc,
    .tp_methods = direct_methods,
    .tp_doc = "per-record OpenSSL calls on one CPython SSL connection",
};

/* load(path of the _ssl extension) -> bool: find libssl's functions through _ssl's own links */
static PyObject *mod_load(PyObject *m, PyObject *arg) {
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL)
        return NULL;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        Py_RETURN_FALSE;
    read_ex_t r = (read_ex_t)dlsym(h, "SSL_read_ex");
    write_ex_t w = (write_ex_t)dlsym(h, "SSL_write_ex");
    pending_t p = (pending_t)dlsym(h, "SSL_pending");
    get_ex_data_t g = (get_ex_data_t)dlsym(h, "SSL_get_ex_data");
    /* the handle stays open: the library is loaded for as long as the process runs anyway */
    if (!r || !w || !p || !g)
        Py_RETURN_FALSE;
    p_read_ex = r, p_write_ex = w, p_pending = p, p_get_ex_data = g;
    Py_RETURN_TRUE;
}

/* bind(sslsock, read, write) -> Direct or None */
static PyObject *mod_bind(PyObject *m, PyObject *args) {
    PyObject *sock, *rd, *wr;
    if (!PyArg_ParseTuple(args, "OOO", &sock, &rd, &wr))
        return NULL;
    if (p_read_ex == NULL || strcmp(Py_TYPE(sock)->tp_name, "_ssl._SSLSocket") != 0)
        Py_RETURN_NONE;
    SSL *ssl = ((cpython_sslsocket *)sock)->ssl;
    if (ssl == NULL || p_get_ex_data(ssl, 0) != (void *)sock)  /* SSL_get_app_data: CPython's own object */
        Py_RETURN_NONE;
    Direct *d = PyObject_New(Direct, &DirectType);
    if (d == NULL)
        return NULL;
    Py_INCREF(sock), Py_INCREF(rd), Py_INCREF(wr);
    d->sock = sock, d->ssl = ssl, d->fb_read = rd, d->fb_write = wr;
    return (PyObject *)d;
}

static PyMethodDef mod_methods[] = {
    {"load", mod_load, METH_O, "resolve libssl's functions through the _ssl extension at PATH"},
    {"bind", mod_bind, METH_VARARGS, "a Direct for an _ssl._SSLSocket, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, .m_name = "_tlsdirect", .m_size = -1, .m_methods = mod_methods};

PyMODINIT_FUNC PyInit__tlsdirect(void) {
    if (PyType_Ready(&DirectType) < 0)
        return NULL;
    return PyModule_Create(&moddef);
}
