/*
 * halb.dataplane._accesslog: formats a batch of access-log records as JSON lines in C.
 *
 * Why: formatting one line in Python (a %-format of 14 values, JSON escaping of the values a
 * client sent, the timestamp, the duration) cost ~3-5 us, as much as a third of what the
 * whole proxied request costs; the access log's target is >= 0.9x the speed without it.
 * This does the same work in one pass per batch. halb/dataplane/access_log.py keeps a
 * pure-Python formatter with the same output (tests compare both) for builds without a C
 * compiler.
 *
 * format_lines(records, wall_offset) -> bytes: each record a 14-tuple
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

static void lit(Buf *b, const char *s, Py_ssize_t n) {  /* caller made room */
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

#define LIT(b, s) lit((b), (s), (Py_ssize_t)(sizeof(s) - 1))
static const char HEX[] = "0123456789abcdef";
static unsigned char SAFE[256];  /* printable ASCII but '"' and '\\': copied as they are */

/* a JSON string from raw bytes (quotes included) */
static int jstr(Buf *b, const unsigned char *s, Py_ssize_t n) {
    if (grow(b, 6 * n + 2) < 0) return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    Py_ssize_t i = 0;
    while (i < n && SAFE[s[i]]) i++;  /* the usual case: nothing to escape */
    memcpy(o, s, (size_t)i);
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
    return 0;
}

/* bytes or None -> JSON string or null, at most `max` bytes (cut at '?' when `query`) */
static int jbytes(Buf *b, PyObject *v, Py_ssize_t max, int query) {
    if (v == Py_None) {
        if (grow(b, 4) < 0) return -1;
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
    return jstr(b, s, n);
}

/* str or None -> JSON string or null */
static int jname(Buf *b, PyObject *v, int frontend_is_null) {
    if (v == Py_None) {
        if (grow(b, 4) < 0) return -1;
        LIT(b, "null");
        return 0;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == NULL) return -1;
    if (frontend_is_null && n >= 9 && memcmp(s, "frontend:", 9) == 0) {
        if (grow(b, 4) < 0) return -1;
        LIT(b, "null");
        return 0;
    }
    if (n > MAX_OTHER) n = MAX_OTHER;
    return jstr(b, (const unsigned char *)s, n);
}

/* decimal digits of x (no snprintf: it cost more than the rest of a line) */
static void put_uint(Buf *b, unsigned long long x) {  /* caller made room for 20 bytes */
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
    if (grow(b, 24) < 0) return -1;
    if (x < 0) {
        b->p[b->len++] = '-';
        x = -x;
    }
    put_uint(b, (unsigned long long)x);
    return 0;
}

static long long cached_sec = -1;
static char cached_txt[32];

PyDoc_STRVAR(format_lines_doc, "format_lines(records, wall_offset) -> bytes: JSON lines of access-log records (module doc).");

static PyObject *format_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "format_lines(records, wall_offset)");
        return NULL;
    }
    PyObject *records = args[0];
    double wall_offset = PyFloat_AsDouble(args[1]);
    if (wall_offset == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "format_lines: a list of records");
        return NULL;
    }
    Buf b = {NULL, 0, 0};
    Py_ssize_t count = PyList_GET_SIZE(records);
    if (grow(&b, count * 320 + 64) < 0) return NULL;  /* a typical line is ~260 bytes: no realloc copies */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(records, i);
        if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 14) {
            PyErr_SetString(PyExc_TypeError, "format_lines: each record is a 14-tuple");
            goto fail;
        }
        double t1 = PyFloat_AsDouble(PyTuple_GET_ITEM(r, 0));
        double t0 = PyFloat_AsDouble(PyTuple_GET_ITEM(r, 1));
        if (PyErr_Occurred()) goto fail;
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
        if (grow(&b, 64) < 0) goto fail;
        LIT(&b, "{\"time\":\"");
        lit(&b, cached_txt, 19);
        b.p[b.len++] = '.';
        b.p[b.len++] = (char)('0' + ms / 100);
        b.p[b.len++] = (char)('0' + ms / 10 % 10);
        b.p[b.len++] = (char)('0' + ms % 10);
        LIT(&b, "Z\",\"request_id\":");
        PyObject *rid = PyTuple_GET_ITEM(r, 2);
        if (rid == Py_None) {
            if (grow(&b, 2) < 0) goto fail;
            LIT(&b, "\"\"");
        } else if (jbytes(&b, rid, MAX_OTHER, 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"client\":");
        if (jbytes(&b, PyTuple_GET_ITEM(r, 3), MAX_OTHER, 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"frontend\":");
        if (jname(&b, PyTuple_GET_ITEM(r, 4), 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"service\":");
        if (jname(&b, PyTuple_GET_ITEM(r, 5), 1) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"host\":");
        if (jbytes(&b, PyTuple_GET_ITEM(r, 6), MAX_HOST, 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"method\":");
        if (jbytes(&b, PyTuple_GET_ITEM(r, 7), MAX_OTHER, 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"path\":");
        if (jbytes(&b, PyTuple_GET_ITEM(r, 8), MAX_PATH, 1) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"status\":");
        if (num(&b, PyTuple_GET_ITEM(r, 9)) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"bytes\":");
        if (num(&b, PyTuple_GET_ITEM(r, 10)) < 0) goto fail;
        if (grow(&b, 48) < 0) goto fail;
        LIT(&b, ",\"duration_ms\":");
        if (dur < 0) {
            LIT(&b, "null");
        } else {  /* milliseconds with 3 decimals, from whole microseconds */
            unsigned long long us = (unsigned long long)(dur * 1e6 + 0.5);
            put_uint(&b, us / 1000);
            b.p[b.len++] = '.';
            b.p[b.len++] = (char)('0' + us % 1000 / 100);
            b.p[b.len++] = (char)('0' + us % 100 / 10);
            b.p[b.len++] = (char)('0' + us % 10);
        }
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"backend\":");
        if (jname(&b, PyTuple_GET_ITEM(r, 11), 0) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"attempts\":");
        if (num(&b, PyTuple_GET_ITEM(r, 12)) < 0) goto fail;
        if (grow(&b, 16) < 0) goto fail;
        LIT(&b, ",\"tls\":");
        if (jname(&b, PyTuple_GET_ITEM(r, 13), 0) < 0) goto fail;
        if (grow(&b, 2) < 0) goto fail;
        LIT(&b, "}\n");
    }
    PyObject *out = PyBytes_FromStringAndSize(b.p ? b.p : "", b.len);
    PyMem_Free(b.p);
    return out;
fail:
    PyMem_Free(b.p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"format_lines", (PyCFunction)(void (*)(void))format_lines, METH_FASTCALL, format_lines_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accesslog",
    "JSON lines of access-log records, formatted in C (halb/dataplane/access_log.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__accesslog(void) {
    for (int c = 0; c < 256; c++) SAFE[c] = c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
    return PyModule_Create(&module);
}
