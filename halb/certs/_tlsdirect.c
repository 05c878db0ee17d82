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
#include <structmember.h>
#include <dlfcn.h>
#include <limits.h>
#include <string.h>

typedef struct ssl_st SSL;  /* opaque */

typedef int (*read_ex_t)(SSL *, void *, size_t, size_t *);
typedef int (*write_ex_t)(SSL *, const void *, size_t, size_t *);
typedef int (*pending_t)(const SSL *);
typedef void *(*get_ex_data_t)(const SSL *, int);

typedef struct bio_st BIO;  /* opaque */
typedef BIO *(*get_bio_t)(const SSL *);
typedef int (*bio_rw_t)(BIO *, void *, int);
typedef size_t (*bio_pending_t)(BIO *);

static read_ex_t p_read_ex;
static write_ex_t p_write_ex;
static pending_t p_pending;
static get_ex_data_t p_get_ex_data;
/* for StreamCore (below): the memory BIOs CPython attached to the connection */
static get_bio_t p_get_rbio, p_get_wbio;
static bio_rw_t p_bio_write, p_bio_read;
static bio_pending_t p_bio_pending;

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
    /* libcrypto's BIO functions come through libssl's own dependencies */
    get_bio_t gr = (get_bio_t)dlsym(h, "SSL_get_rbio"), gw = (get_bio_t)dlsym(h, "SSL_get_wbio");
    bio_rw_t bw = (bio_rw_t)dlsym(h, "BIO_write"), br = (bio_rw_t)dlsym(h, "BIO_read");
    bio_pending_t bp = (bio_pending_t)dlsym(h, "BIO_ctrl_pending");
    if (gr && gw && bw && br && bp)
        p_get_rbio = gr, p_get_wbio = gw, p_bio_write = bw, p_bio_read = br, p_bio_pending = bp;
    Py_RETURN_TRUE;
}

/* bind(sslsock, read, write) -> Direct or None */
/* The OpenSSL connection of CPython's _ssl._SSLSocket `sock`, or NULL when `sock` is not one
 * or the pointer read from it is not the connection CPython owns (module doc): bind() and
 * StreamCore's _bind_core take a connection only through this check. */
static SSL *checked_ssl(PyObject *sock) {
    if (p_read_ex == NULL || strcmp(Py_TYPE(sock)->tp_name, "_ssl._SSLSocket") != 0)
        return NULL;
    SSL *ssl = ((cpython_sslsocket *)sock)->ssl;
    if (ssl == NULL || p_get_ex_data(ssl, 0) != (void *)sock)  /* SSL_get_app_data: CPython's own object */
        return NULL;
    return ssl;
}

static PyObject *mod_bind(PyObject *m, PyObject *args) {
    PyObject *sock, *rd, *wr;
    if (!PyArg_ParseTuple(args, "OOO", &sock, &rd, &wr))
        return NULL;
    SSL *ssl = checked_ssl(sock);
    if (ssl == NULL)
        Py_RETURN_NONE;
    Direct *d = PyObject_New(Direct, &DirectType);
    if (d == NULL)
        return NULL;
    Py_INCREF(sock), Py_INCREF(rd), Py_INCREF(wr);
    d->sock = sock, d->ssl = ssl, d->fb_read = rd, d->fb_write = wr;
    return (PyObject *)d;
}

/* ------------------------------------------------------------------ StreamCore
 * The per-request half of halb/dataplane/tls_stream.py's TlsStream (its base class): the
 * raw connection's data_received and the application's write, once the handshake is done
 * and `_bind_core` has taken the OpenSSL connection (checked_ssl, as bind()). Incoming
 * ciphertext goes into CPython's incoming memory BIO, records come out of SSL_read_ex into
 * the application's data_received; written data goes through SSL_write_ex and the
 * outgoing BIO's bytes to the raw transport's write. Anything but success (a partial
 * record, close_notify, an alert, a failed write) and every state but "ready, not
 * closing, reading" goes to the Python methods (_data_slow, _write_slow), which redo the
 * step through CPython's ssl methods: errors are ssl.SSLObject's, as with Direct. */

typedef struct {
    PyObject_HEAD
    PyObject *app;         /* the application protocol */
    PyObject *app_data;    /* its bound data_received */
    PyObject *raw_write;   /* the raw transport's bound write */
    PyObject *sock;        /* the _ssl._SSLSocket owning `ssl` (NULL: not bound) */
    SSL *ssl;
    BIO *rbio, *wbio;
    char ready, closing, read_paused;
} StreamCore;

static PyObject *s_data_slow, *s_write_slow, *s_data_received;

static int core_traverse(StreamCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->app);
    Py_VISIT(self->app_data);
    Py_VISIT(self->raw_write);
    Py_VISIT(self->sock);
    return 0;
}

static int core_clear(StreamCore *self) {
    Py_CLEAR(self->app);
    Py_CLEAR(self->app_data);
    Py_CLEAR(self->raw_write);
    Py_CLEAR(self->sock);
    self->ssl = NULL;
    return 0;
}

static void core_dealloc(StreamCore *self) {
    PyObject_GC_UnTrack(self);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the outgoing BIO's bytes to the raw transport (0, or -1 with an exception) */
static int core_flush(StreamCore *self) {
    size_t n = p_bio_pending(self->wbio);
    if (n == 0)
        return 0;
    if (n > INT_MAX)
        n = INT_MAX;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out == NULL)
        return -1;
    int got = p_bio_read(self->wbio, PyBytes_AS_STRING(out), (int)n);
    if (got != (int)n) {  /* a memory BIO hands over what it reported; never expected */
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "TLS outgoing buffer read short");
        return -1;
    }
    PyObject *r = PyObject_CallOneArg(self->raw_write, out);
    Py_DECREF(out);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *core_data_received(StreamCore *self, PyObject *data) {
    if (self->sock == NULL || !self->ready || self->closing || self->read_paused || !PyBytes_CheckExact(data)
        || PyBytes_GET_SIZE(data) > INT_MAX)
        return PyObject_CallMethodOneArg((PyObject *)self, s_data_slow, data);
    int len = (int)PyBytes_GET_SIZE(data);
    if (len > 0 && p_bio_write(self->rbio, PyBytes_AS_STRING(data), len) != len)
        return PyObject_CallMethodOneArg((PyObject *)self, s_data_slow, data);  /* it writes again */
    char buf[RECORD_MAX];
    for (;;) {
        size_t n = 0;
        if (p_read_ex(self->ssl, buf, RECORD_MAX, &n) != 1 || n == 0) {
            /* a partial record, close_notify, an error: CPython's read classifies it */
            PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
            if (empty == NULL)
                return NULL;
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_data_slow, empty);
            Py_DECREF(empty);
            return r;
        }
        PyObject *chunk = PyBytes_FromStringAndSize(buf, (Py_ssize_t)n);
        if (chunk == NULL)
            return NULL;
        PyObject *app_data = self->app_data;
        Py_INCREF(app_data);  /* the application may replace itself (set_protocol) */
        PyObject *r = PyObject_CallOneArg(app_data, chunk);
        Py_DECREF(app_data);
        Py_DECREF(chunk);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        if (self->sock == NULL || self->closing || self->read_paused)
            break;
        if (p_bio_pending(self->rbio) == 0 && p_pending(self->ssl) == 0)
            break;
    }
    if (self->sock != NULL && !self->closing && core_flush(self) < 0)  /* a key update's answer */
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_write(StreamCore *self, PyObject *data) {
    if (self->sock == NULL || !self->ready || self->closing)
        return PyObject_CallMethodOneArg((PyObject *)self, s_write_slow, data);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyObject_CallMethodOneArg((PyObject *)self, s_write_slow, data);
    }
    if (view.len == 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    size_t n = 0;
    int ok = view.len <= INT_MAX && p_write_ex(self->ssl, view.buf, (size_t)view.len, &n) == 1
             && n == (size_t)view.len;
    PyBuffer_Release(&view);
    if (!ok)  /* nothing was written (no partial writes on this connection): CPython's write decides */
        return PyObject_CallMethodOneArg((PyObject *)self, s_write_slow, data);
    if (core_flush(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _bind_core(sslsock, app, raw_write) -> bool: take the connection for the fast path */
static PyObject *core_bind(StreamCore *self, PyObject *args) {
    PyObject *sock, *app, *raw_write;
    if (!PyArg_ParseTuple(args, "OOO", &sock, &app, &raw_write))
        return NULL;
    SSL *ssl = p_get_rbio != NULL ? checked_ssl(sock) : NULL;
    if (ssl == NULL)
        Py_RETURN_FALSE;
    BIO *rb = p_get_rbio(ssl), *wb = p_get_wbio(ssl);
    if (rb == NULL || wb == NULL)
        Py_RETURN_FALSE;
    PyObject *app_data = PyObject_GetAttr(app, s_data_received);
    if (app_data == NULL)
        return NULL;
    Py_INCREF(sock);
    Py_INCREF(raw_write);
    Py_INCREF(app);
    Py_XSETREF(self->sock, sock);
    Py_XSETREF(self->raw_write, raw_write);
    Py_XSETREF(self->app, app);
    Py_XSETREF(self->app_data, app_data);
    self->ssl = ssl, self->rbio = rb, self->wbio = wb;
    Py_RETURN_TRUE;
}

/* _set_app(app): a new application protocol (set_protocol) */
static PyObject *core_set_app(StreamCore *self, PyObject *app) {
    PyObject *app_data = PyObject_GetAttr(app, s_data_received);
    if (app_data == NULL)
        return NULL;
    Py_INCREF(app);
    Py_XSETREF(self->app, app);
    Py_XSETREF(self->app_data, app_data);
    Py_RETURN_NONE;
}

/* _unbind_core(): back to the Python paths (the connection is ending) */
static PyObject *core_unbind(StreamCore *self, PyObject *unused) {
    Py_CLEAR(self->sock);
    Py_CLEAR(self->raw_write);
    Py_CLEAR(self->app_data);
    self->ssl = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"data_received", (PyCFunction)core_data_received, METH_O, "ciphertext from the socket (module doc)"},
    {"write", (PyCFunction)core_write, METH_O, "plaintext from the application (module doc)"},
    {"_bind_core", (PyCFunction)core_bind, METH_VARARGS, "take the OpenSSL connection for the fast path"},
    {"_set_app", (PyCFunction)core_set_app, METH_O, "set the application protocol"},
    {"_unbind_core", (PyCFunction)core_unbind, METH_NOARGS, "leave the fast path"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"app", T_OBJECT, offsetof(StreamCore, app), READONLY, "the application protocol (_set_app sets it)"},
    {"ready", T_BOOL, offsetof(StreamCore, ready), 0, "handshake done, application connected"},
    {"closing", T_BOOL, offsetof(StreamCore, closing), 0, "close() or abort() called, or the connection lost"},
    {"read_paused", T_BOOL, offsetof(StreamCore, read_paused), 0, "the application paused reading"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StreamCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "halb.certs._tlsdirect.StreamCore",
    .tp_basicsize = sizeof(StreamCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_new = PyType_GenericNew,
    .tp_doc = "the per-request half of a TLS stream (halb/dataplane/tls_stream.py)",
};

static PyMethodDef mod_methods[] = {
    {"load", mod_load, METH_O, "resolve libssl's functions through the _ssl extension at PATH"},
    {"bind", mod_bind, METH_VARARGS, "a Direct for an _ssl._SSLSocket, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, .m_name = "_tlsdirect", .m_size = -1, .m_methods = mod_methods};

PyMODINIT_FUNC PyInit__tlsdirect(void) {
    if (PyType_Ready(&DirectType) < 0 || PyType_Ready(&StreamCoreType) < 0)
        return NULL;
    s_data_slow = PyUnicode_InternFromString("_data_slow");
    s_write_slow = PyUnicode_InternFromString("_write_slow");
    s_data_received = PyUnicode_InternFromString("data_received");
    if (!s_data_slow || !s_write_slow || !s_data_received)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&StreamCoreType);
    if (PyModule_AddObject(m, "StreamCore", (PyObject *)&StreamCoreType) < 0) {
        Py_DECREF(&StreamCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
