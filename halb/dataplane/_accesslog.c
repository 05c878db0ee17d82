/*
 * halb.dataplane._accesslog: formats access-log records as JSON lines in C.
 *
 * Why: formatting one line in Python (a %-format of 14 values, JSON escaping of the values a
 * client sent, the timestamp, the duration) cost ~3-5 us, as much as a third of what the
 * whole proxied request costs; the access log's target is >= 0.9x the speed without it.
 * This does the same work in one pass per record. halb/dataplane/access_log.py keeps a
 * pure-Python formatter with the same output (tests compare both) for builds without a C
 * compiler.
 *
 * Lines (below): add(...) / add_at(end, ...) format one record each; a record is 14 values
 *   (end: float, start: float (0: unknown, duration null), request_id: bytes|None, client: bytes,
 *    frontend: str|None, service: str|None, host: bytes|None, method: bytes, url: bytes,
 *    status: int, bytes: int, backend: str|None, attempts: int, tls: str|None)
 * Bytes values are written as JSON strings, each byte outside printable ASCII (and '"',
 * '\') escaped, a byte >= 0x80 as \u00XX (the Latin-1 character), so the line is always
 * valid JSON whatever a client sent. The url is cut at '?' (no query) and at MAX_PATH bytes,
 * the host at MAX_HOST. A service named "frontend:..." (a frontend's own runtime) is null.
 * end and start are time.monotonic() values; the line's time is end + wall_offset.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>

#define MAX_PATH 1024
#define MAX_HOST 256
#define MAX_OTHER 256

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

/* The most one record can take: nine strings of at most MAX_* bytes, each byte at most 6
   escaped ("\u00XX"), plus quotes, numbers and the field names. One grow() per record makes
   room for all of it, so the writers below never check. */
#define RECORD_LINE_MAX (6 * (8 * MAX_OTHER + MAX_PATH) + 18 + 512)

static int grow(Buf *b, Py_ssize_t need) {
    if (b->len + need <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + need) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline void lit(Buf *b, const char *s, Py_ssize_t n) {
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

#define LIT(b, s) lit((b), (s), (Py_ssize_t)(sizeof(s) - 1))
static const char HEX[] = "0123456789abcdef";
static unsigned char SAFE[256];  /* printable ASCII but '"' and '\\': copied as they are */

/* a JSON string from raw bytes (quotes included) */
static void jstr(Buf *b, const unsigned char *s, Py_ssize_t n) {
    char *o = b->p + b->len;
    *o++ = '"';
    Py_ssize_t i = 0;
    /* the usual case: a short value with nothing to escape, copied as it is scanned (a libc
       memcpy call per field cost more than the copy) */
    while (i < n && SAFE[s[i]]) {
        o[i] = (char)s[i];
        i++;
    }
    o += i;
    for (; i < n; i++) {
        unsigned char c = s[i];
        if (SAFE[c]) {
            *o++ = (char)c;
        } else if (c == '"' || c == '\\') {
            *o++ = '\\';
            *o++ = (char)c;
        } else {
            *o++ = '\\'; *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = HEX[c >> 4];
            *o++ = HEX[c & 15];
        }
    }
    *o++ = '"';
    b->len = o - b->p;
}

/* bytes or None -> JSON string or null, at most `max` bytes (cut at '?' when `query`) */
static int jbytes(Buf *b, PyObject *v, Py_ssize_t max, int query) {
    if (v == Py_None) {
        LIT(b, "null");
        return 0;
    }
    if (!PyBytes_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "access log record: expected bytes or None");
        return -1;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(v);
    Py_ssize_t n = PyBytes_GET_SIZE(v);
    if (query) {
        const void *q = memchr(s, '?', (size_t)n);
        if (q != NULL) n = (const unsigned char *)q - s;
    }
    if (n > max) n = max;
    jstr(b, s, n);
    return 0;
}

/* str or None -> JSON string or null */
static int jname(Buf *b, PyObject *v, int frontend_is_null) {
    if (v == Py_None) {
        LIT(b, "null");
        return 0;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) return -1;
    if (frontend_is_null && n >= 9 && memcmp(s, "frontend:", 9) == 0) {
        LIT(b, "null");
        return 0;
    }
    if (n > MAX_OTHER) n = MAX_OTHER;
    jstr(b, (const unsigned char *)s, n);
    return 0;
}

/* decimal digits of x (no snprintf: it cost more than the rest of a line) */
static void put_uint(Buf *b, unsigned long long x) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + x % 10);
        x /= 10;
    } while (x);
    while (n) b->p[b->len++] = tmp[--n];
}

static int num(Buf *b, PyObject *v) {
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < 0) {
        b->p[b->len++] = '-';
        x = -x;
    }
    put_uint(b, (unsigned long long)x);
    return 0;
}

static long long cached_sec = -1;
static char cached_txt[32];

/* One record as a JSON line at the end of `b`. `f` holds the 13 values after the end time
   (start, request_id, client, frontend, service, host, method, url, status, bytes, backend,
   attempts, tls: the RECORD layout of access_log.py without its first item). On an error the
   buffer is left as it was. */
static int format_record(Buf *b, double t1, PyObject *const *f, double wall_offset) {
    double t0 = PyFloat_AsDouble(f[0]);
    if (t0 == -1.0 && PyErr_Occurred()) return -1;
    if (grow(b, RECORD_LINE_MAX) < 0) return -1;
    Py_ssize_t mark = b->len;
    double t = t1 + wall_offset;
    double dur = t0 != 0.0 ? t1 - t0 : -1.0;
    long long sec = (long long)t;
    int ms = (int)((t - (double)sec) * 1000.0);
    if (ms < 0) ms = 0;
    if (ms > 999) ms = 999;
    if (sec != cached_sec) {
        time_t tt = (time_t)sec;
        struct tm tm;
        gmtime_r(&tt, &tm);
        strftime(cached_txt, sizeof cached_txt, "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = sec;
    }
    LIT(b, "{\"time\":\"");
    lit(b, cached_txt, 19);
    b->p[b->len++] = '.';
    b->p[b->len++] = (char)('0' + ms / 100);
    b->p[b->len++] = (char)('0' + ms / 10 % 10);
    b->p[b->len++] = (char)('0' + ms % 10);
    LIT(b, "Z\",\"request_id\":");
    if (f[1] == Py_None) {
        LIT(b, "\"\"");
    } else if (jbytes(b, f[1], MAX_OTHER, 0) < 0) goto fail;
    LIT(b, ",\"client\":");
    if (jbytes(b, f[2], MAX_OTHER, 0) < 0) goto fail;
    LIT(b, ",\"frontend\":");
    if (jname(b, f[3], 0) < 0) goto fail;
    LIT(b, ",\"service\":");
    if (jname(b, f[4], 1) < 0) goto fail;
    LIT(b, ",\"host\":");
    if (jbytes(b, f[5], MAX_HOST, 0) < 0) goto fail;
    LIT(b, ",\"method\":");
    if (jbytes(b, f[6], MAX_OTHER, 0) < 0) goto fail;
    LIT(b, ",\"path\":");
    if (jbytes(b, f[7], MAX_PATH, 1) < 0) goto fail;
    LIT(b, ",\"status\":");
    if (num(b, f[8]) < 0) goto fail;
    LIT(b, ",\"bytes\":");
    if (num(b, f[9]) < 0) goto fail;
    LIT(b, ",\"duration_ms\":");
    if (dur < 0) {
        LIT(b, "null");
    } else {  /* milliseconds with 3 decimals, from whole microseconds */
        unsigned long long us = (unsigned long long)(dur * 1e6 + 0.5);
        put_uint(b, us / 1000);
        b->p[b->len++] = '.';
        b->p[b->len++] = (char)('0' + us % 1000 / 100);
        b->p[b->len++] = (char)('0' + us % 100 / 10);
        b->p[b->len++] = (char)('0' + us % 10);
    }
    LIT(b, ",\"backend\":");
    if (jname(b, f[10], 0) < 0) goto fail;
    LIT(b, ",\"attempts\":");
    if (num(b, f[11]) < 0) goto fail;
    LIT(b, ",\"tls\":");
    if (jname(b, f[12], 0) < 0) goto fail;
    LIT(b, "}\n");
    return 0;
fail:
    b->len = mark;
    return -1;
}

/* ------------------------------------------------------------------ Lines
   The request path's side: add() formats one record at once into a buffer the object keeps
   (no tuple per request, no request objects held until a flush) and reads the end time from
   CLOCK_MONOTONIC itself, the clock of time.monotonic(); take() hands the lines over. */

typedef struct {
    PyObject_HEAD
    Buf buf;
    Py_ssize_t count;  /* lines in buf */
    double wall_offset;  /* time.time() - time.monotonic(), set by the owner (access_log.py) */
} Lines;

static void Lines_dealloc(Lines *self) {
    PyMem_Free(self->buf.p);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Lines_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Lines() takes no arguments");
        return NULL;
    }
    Lines *self = (Lines *)type->tp_alloc(type, 0);
    return (PyObject *)self;
}

static PyObject *added(Lines *self, double t1, PyObject *const *f) {
    if (format_record(&self->buf, t1, f, self->wall_offset) < 0) return NULL;
    self->count++;
    return PyLong_FromSsize_t(self->count);
}

PyDoc_STRVAR(Lines_add_doc, "add(start, request_id, client, frontend, service, host, method, url, status, bytes, "
             "backend, attempts, tls) -> lines pending: one record ending now (module doc).");

static PyObject *Lines_add(Lines *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "Lines.add takes the 13 values of a record after its end time");
        return NULL;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return added(self, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9, args);
}

PyDoc_STRVAR(Lines_add_at_doc, "add_at(end, start, ...) -> lines pending: add() with the end time given (tests).");

static PyObject *Lines_add_at(Lines *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "Lines.add_at takes a whole record (14 values)");
        return NULL;
    }
    double t1 = PyFloat_AsDouble(args[0]);
    if (t1 == -1.0 && PyErr_Occurred()) return NULL;
    return added(self, t1, args + 1);
}

PyDoc_STRVAR(Lines_take_doc, "take() -> (bytes, count): the pending lines, and how many; the buffer is emptied.");

static PyObject *Lines_take(Lines *self, PyObject *unused) {
    PyObject *data = PyBytes_FromStringAndSize(self->buf.p ? self->buf.p : "", self->buf.len);
    if (data == NULL) return NULL;
    PyObject *out = Py_BuildValue("(Nn)", data, self->count);
    if (out == NULL) return NULL;
    self->buf.len = 0;
    self->count = 0;
    if (self->buf.cap > 4 * 1024 * 1024) {  /* a burst grew it: give the memory back */
        PyMem_Free(self->buf.p);
        self->buf.p = NULL;
        self->buf.cap = 0;
    }
    return out;
}

static PyObject *Lines_len_get(Lines *self, void *closure) { return PyLong_FromSsize_t(self->count); }

static PyObject *Lines_offset_get(Lines *self, void *closure) { return PyFloat_FromDouble(self->wall_offset); }

static int Lines_offset_set(Lines *self, PyObject *v, void *closure) {
    double d = v ? PyFloat_AsDouble(v) : -1.0;
    if (v == NULL) {
        PyErr_SetString(PyExc_TypeError, "wall_offset cannot be deleted");
        return -1;
    }
    if (d == -1.0 && PyErr_Occurred()) return -1;
    self->wall_offset = d;
    return 0;
}

static PyMethodDef Lines_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Lines_add, METH_FASTCALL, Lines_add_doc},
    {"add_at", (PyCFunction)(void (*)(void))Lines_add_at, METH_FASTCALL, Lines_add_at_doc},
    {"take", (PyCFunction)Lines_take, METH_NOARGS, Lines_take_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lines_getset[] = {
    {"count", (getter)Lines_len_get, NULL, "lines pending", NULL},
    {"wall_offset", (getter)Lines_offset_get, (setter)Lines_offset_set, "time.time() - time.monotonic()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LinesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "halb.dataplane._accesslog.Lines",
    .tp_basicsize = sizeof(Lines),
    .tp_dealloc = (destructor)Lines_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Access-log lines formatted as requests end (module doc).",
    .tp_methods = Lines_methods,
    .tp_getset = Lines_getset,
    .tp_new = Lines_new,
};

static PyMethodDef methods[] = {
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_accesslog",
    .m_doc = "JSON lines of access-log records, formatted in C (halb/dataplane/access_log.py).",
    .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__accesslog(void) {
    for (int c = 0; c < 256; c++) SAFE[c] = c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
    if (PyType_Ready(&LinesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&LinesType);
    if (PyModule_AddObject(m, "Lines", (PyObject *)&LinesType) < 0) {
        Py_DECREF(&LinesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
