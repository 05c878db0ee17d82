/*
 * halb.dataplane._fasthttp: optional C fast path for the HTTP proxy's hottest work.
 *
 * Why: on small requests halb spends most of its user time in Python callbacks driven by
 * llhttp (on_message_begin, on_url, on_header per header, on_headers_complete, ...) and in
 * the response-head scan. Both functions here do one pass over a complete head in C.
 *
 * Safety rule: these functions accept only a strict subset of what llhttp (httptools)
 * accepts, and return None for everything else, so the caller falls back to the full
 * llhttp path, which is the authority on framing and errors. Anything unusual -- a body,
 * Transfer-Encoding, Upgrade, obs-fold, bytes outside printable ASCII, duplicate framing or
 * identity headers, unknown Connection tokens -- is left to llhttp. tests/unit/
 * test_fasthttp.py checks, on generated and mutated heads, that whenever the fast path
 * accepts a head, the llhttp path gives the same result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static unsigned char TCHAR[256];  /* RFC 9110 token characters */
static unsigned char VCHAR[256];  /* field value / reason characters we accept: HTAB, 0x20-0x7e */
static unsigned char UCHAR[256];  /* request-target characters we accept: 0x21-0x7e */

static void init_tables(void) {
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        VCHAR[c] = (c == '\t') || (c >= 0x20 && c <= 0x7e);
        UCHAR[c] = (c >= 0x21 && c <= 0x7e);
    }
    for (const char *p = extra; *p; p++) TCHAR[(unsigned char)*p] = 1;
}

/* case-insensitive compare of n bytes against a lowercase literal */
static int ieq(const char *p, const char *lit, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z') c += 32;
        if (c != (unsigned char)lit[i]) return 0;
    }
    return 1;
}

#define IS(lit) (nlen == (Py_ssize_t)(sizeof(lit) - 1) && ieq(name, lit, nlen))

enum {
    H_OTHER, H_FALLBACK, H_DROP, H_HOST, H_CONNECTION, H_XFF, H_RID, H_IDEM, H_COOKIE,
    H_CONTENT_LENGTH,
};

/* Request header names the proxy treats specially (mirrors REQ_SPECIAL in http_proxy.py).
 * Names llhttp itself interprets for framing or connection state and that this fast path
 * does not model fall back: content-length, transfer-encoding, upgrade, proxy-connection. */
static int req_kind(const char *name, Py_ssize_t nlen) {
    switch (nlen) {
    case 2: if (IS("te")) return H_DROP; break;
    case 4: if (IS("host")) return H_HOST; break;
    case 6: if (IS("cookie")) return H_COOKIE; break;
    case 7: if (IS("trailer")) return H_DROP; if (IS("upgrade")) return H_FALLBACK; break;
    case 10: if (IS("connection")) return H_CONNECTION; if (IS("keep-alive")) return H_DROP; break;
    case 12: if (IS("x-request-id")) return H_RID; break;
    case 14: if (IS("content-length")) return H_FALLBACK; break;
    case 15:
        if (IS("x-forwarded-for")) return H_XFF;
        if (IS("idempotency-key")) return H_IDEM;
        break;
    case 16:
        if (IS("proxy-connection")) return H_FALLBACK;
        if (IS("x-forwarded-host")) return H_DROP;
        break;
    case 17:
        if (IS("transfer-encoding")) return H_FALLBACK;
        if (IS("x-forwarded-proto")) return H_DROP;
        break;
    case 19: if (IS("proxy-authorization")) return H_DROP; break;
    }
    return H_OTHER;
}

/* Response header names (mirrors RESP_SPECIAL): hop-by-hop lines are dropped, framing
 * other than a single Content-Length falls back. */
static int resp_kind(const char *name, Py_ssize_t nlen) {
    switch (nlen) {
    case 7: if (IS("trailer")) return H_DROP; if (IS("upgrade")) return H_DROP; break;
    case 10: if (IS("connection")) return H_CONNECTION; if (IS("keep-alive")) return H_DROP; break;
    case 14: if (IS("content-length")) return H_CONTENT_LENGTH; break;
    case 16: if (IS("proxy-connection")) return H_FALLBACK; break;
    case 17: if (IS("transfer-encoding")) return H_FALLBACK; break;
    case 18: if (IS("proxy-authenticate")) return H_DROP; break;
    }
    return H_OTHER;
}

#define F_CLOSE 1
#define F_KEEP_ALIVE 2

/* Connection header tokens -> flags; -1 for a token other than close/keep-alive (those
 * name further hop-by-hop headers, or ask for an upgrade: the llhttp path handles them). */
static int connection_flags(const char *v, Py_ssize_t n) {
    int flags = 0;
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t s = i;
        while (i < n && v[i] != ',') i++;
        Py_ssize_t e = i;
        while (s < e && (v[s] == ' ' || v[s] == '\t')) s++;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        Py_ssize_t t = e - s;
        if (t == 5 && ieq(v + s, "close", 5)) flags |= F_CLOSE;
        else if (t == 10 && ieq(v + s, "keep-alive", 10)) flags |= F_KEEP_ALIVE;
        else if (t != 0) return -1;
        i++;  /* past the comma (or past the end) */
    }
    return flags;
}

/* llhttp_should_keep_alive for a message whose length is known */
static int keep_alive(int http10, int flags) {
    if (!http10) return !(flags & F_CLOSE);
    return (flags & F_KEEP_ALIVE) != 0;
}

static int valid_rid(const char *v, Py_ssize_t n) {
    if (n < 1 || n > 128) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c < 0x21 || c > 0x7e) return 0;
    }
    return 1;
}

/* One header line at p (within [p, end)): name ':' OWS value CRLF, value non-empty and not
 * ending in whitespace. Returns the pointer past CRLF or NULL when outside the subset. */
static const char *header_line(const char *p, const char *end, const char **name, Py_ssize_t *nlen,
                               const char **val, Py_ssize_t *vlen) {
    const char *q = p;
    while (q < end && TCHAR[(unsigned char)*q]) q++;
    if (q == p || q >= end || *q != ':') return NULL;
    *name = p;
    *nlen = q - p;
    q++;
    while (q < end && (*q == ' ' || *q == '\t')) q++;
    const char *v = q;
    while (q < end && VCHAR[(unsigned char)*q]) q++;
    if (q + 1 >= end || q[0] != '\r' || q[1] != '\n') return NULL;
    if (q == v || q[-1] == ' ' || q[-1] == '\t') return NULL;
    *val = v;
    *vlen = q - v;
    return q + 2;
}

static const char *find_head_end(const char *p, Py_ssize_t n) {
    /* memmem is a GNU extension; a simple loop over '\r' hits is as fast for short heads */
    const char *end = p + n;
    const char *q = p;
    while (q + 3 < end) {
        const char *r = memchr(q, '\r', (size_t)(end - q - 3));
        if (r == NULL) return NULL;
        if (r[1] == '\n' && r[2] == '\r' && r[3] == '\n') return r;
        q = r + 1;
    }
    return NULL;
}

static PyObject *bytes_or_none(const char *p, Py_ssize_t n) {
    if (p == NULL) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(p, n);
}

static int method_known(const char *m, Py_ssize_t n) {
    switch (n) {
    case 3: return memcmp(m, "GET", 3) == 0 || memcmp(m, "PUT", 3) == 0;
    case 4: return memcmp(m, "HEAD", 4) == 0 || memcmp(m, "POST", 4) == 0;
    case 5: return memcmp(m, "PATCH", 5) == 0 || memcmp(m, "TRACE", 5) == 0;
    case 6: return memcmp(m, "DELETE", 6) == 0;
    case 7: return memcmp(m, "OPTIONS", 7) == 0;
    }
    return 0;
}

#define STACK_OUT 8192

/* Where to build an output head: the caller's stack buffer (STACK_OUT bytes) when it fits,
 * else the heap (the caller frees it when it is not stackbuf). NULL when out of memory. */
static char *scratch(char *stackbuf, Py_ssize_t need) {
    return need <= STACK_OUT ? stackbuf : PyMem_Malloc((size_t)need);
}

PyDoc_STRVAR(parse_request_doc,
"parse_request(data, max_head, hash_header[, max_headers]) -> tuple | None\n\n"
"data must be exactly one complete request head with no body (no Content-Length or\n"
"Transfer-Encoding) in the strict subset, origin-form, with exactly one Host line when\n"
"HTTP/1.1 and at most max_headers header lines; otherwise None (use llhttp, which\n"
"answers what RFC 9112 refuses). hash_header is a lowercase header name or None. Returns (method, url, http10, keep_alive, hdrs, host, xff,\n"
"rid, idem, cookie, hash_value): hdrs are the forwarded header lines as the llhttp path\n"
"builds them (\"Name: value\\r\\n\" each, hop-by-hop and proxy-set headers removed).");

static PyObject *parse_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 3 && nargs != 4) || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "parse_request(data: bytes, max_head: int, hash_header: bytes | None, max_headers: int = -1)");
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t max_headers = -1;  /* -1: no count limit */
    if (nargs == 4) {
        max_headers = PyLong_AsSsize_t(args[3]);
        if (max_headers == -1 && PyErr_Occurred()) return NULL;
    }
    const char *hh = NULL;
    Py_ssize_t hhlen = 0;
    if (args[2] != Py_None) {
        if (!PyBytes_Check(args[2])) {
            PyErr_SetString(PyExc_TypeError, "hash_header must be bytes or None");
            return NULL;
        }
        hh = PyBytes_AS_STRING(args[2]);
        hhlen = PyBytes_GET_SIZE(args[2]);
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (n > max_head) Py_RETURN_NONE;
    const char *he = find_head_end(data, n);
    if (he == NULL || he + 4 != data + n) Py_RETURN_NONE;  /* incomplete, or bytes follow */
    const char *end = he + 2;  /* the header lines end here (before the blank line) */

    /* request line: METHOD SP origin-form SP HTTP/1.x CRLF */
    const char *p = data;
    const char *q = p;
    while (q < end && *q >= 'A' && *q <= 'Z') q++;
    if (q >= end || *q != ' ' || !method_known(p, q - p)) Py_RETURN_NONE;
    const char *method = p;
    Py_ssize_t mlen = q - p;
    p = q + 1;
    if (p >= end || *p != '/') Py_RETURN_NONE;
    q = p;
    while (q < end && UCHAR[(unsigned char)*q]) q++;
    if (end - q < 11 || *q != ' ' || memcmp(q + 1, "HTTP/1.", 7) != 0 || q[9] != '\r' || q[10] != '\n')
        Py_RETURN_NONE;
    const char *url = p;
    Py_ssize_t ulen = q - p;
    int http10;
    if (q[8] == '1') http10 = 0;
    else if (q[8] == '0') http10 = 1;
    else Py_RETURN_NONE;
    p = q + 11;

    char stackbuf[STACK_OUT];
    char *out = scratch(stackbuf, (end - p) * 2 + 16);  /* a line grows by at most one byte; generous */
    if (out == NULL) return PyErr_NoMemory();
    Py_ssize_t olen = 0;
    const char *host = NULL, *xff = NULL, *rid = NULL, *cookie = NULL, *hval = NULL;
    Py_ssize_t host_n = 0, xff_n = 0, rid_n = 0, cookie_n = 0, hval_n = 0;
    int idem = 0, flags = 0;
    Py_ssize_t count = 0;
    PyObject *result = NULL;

    while (p < end) {
        const char *name, *val;
        Py_ssize_t nlen, vlen;
        p = header_line(p, end, &name, &nlen, &val, &vlen);
        if (p == NULL) goto fallback;
        if (++count > max_headers && max_headers >= 0) goto fallback;  /* llhttp path answers 431 */
        int kind = req_kind(name, nlen);
        switch (kind) {
        case H_FALLBACK: goto fallback;
        case H_DROP: continue;
        case H_HOST:
            if (host != NULL) goto fallback;  /* two Host lines: let llhttp's path decide */
            host = val; host_n = vlen;
            memcpy(out + olen, "Host: ", 6); olen += 6;
            memcpy(out + olen, val, (size_t)vlen); olen += vlen;
            out[olen++] = '\r'; out[olen++] = '\n';
            continue;
        case H_CONNECTION: {
            int f = connection_flags(val, vlen);
            if (f < 0) goto fallback;
            flags |= f;
            continue;
        }
        case H_XFF:
            if (xff != NULL) goto fallback;
            xff = val; xff_n = vlen;
            continue;
        case H_RID:
            if (valid_rid(val, vlen)) { rid = val; rid_n = vlen; }
            else { rid = NULL; rid_n = 0; }
            continue;
        case H_COOKIE:
            if (cookie != NULL) goto fallback;
            cookie = val; cookie_n = vlen;
            break;  /* forwarded */
        case H_IDEM:
            idem = 1;
            break;  /* forwarded */
        default:
            if (hh != NULL && nlen == hhlen && ieq(name, hh, nlen)) { hval = val; hval_n = vlen; }
            break;
        }
        memcpy(out + olen, name, (size_t)nlen); olen += nlen;
        out[olen++] = ':'; out[olen++] = ' ';
        memcpy(out + olen, val, (size_t)vlen); olen += vlen;
        out[olen++] = '\r'; out[olen++] = '\n';
    }
    if (host == NULL && !http10) goto fallback;  /* RFC 9112 3.2: 400, answered by the llhttp path */
    result = PyTuple_New(11);
    if (result == NULL) goto done;
    PyObject *m = NULL;
    if (mlen == 3 && method[0] == 'G') {
        static PyObject *GET = NULL;
        if (GET == NULL) GET = PyBytes_FromStringAndSize("GET", 3);  /* interned for the process */
        m = GET;
        Py_XINCREF(m);
    } else {
        m = PyBytes_FromStringAndSize(method, mlen);
    }
    PyTuple_SET_ITEM(result, 0, m);
    PyTuple_SET_ITEM(result, 1, PyBytes_FromStringAndSize(url, ulen));
    PyTuple_SET_ITEM(result, 2, Py_NewRef(http10 ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 3, Py_NewRef(keep_alive(http10, flags) ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 4, PyBytes_FromStringAndSize(out, olen));
    PyTuple_SET_ITEM(result, 5, bytes_or_none(host, host_n));
    PyTuple_SET_ITEM(result, 6, bytes_or_none(xff, xff_n));
    PyTuple_SET_ITEM(result, 7, bytes_or_none(rid, rid_n));
    PyTuple_SET_ITEM(result, 8, Py_NewRef(idem ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 9, bytes_or_none(cookie, cookie_n));
    PyTuple_SET_ITEM(result, 10, bytes_or_none(hval, hval_n));
    for (Py_ssize_t i = 0; i < 11; i++) {
        if (PyTuple_GET_ITEM(result, i) == NULL) { Py_CLEAR(result); break; }
    }
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    if (out != stackbuf) PyMem_Free(out);
    return result;
}

PyDoc_STRVAR(parse_response_doc,
"parse_response(data, max_head) -> tuple | None\n\n"
"data must start with a complete final response head (not 1xx, 204 or 304) in the strict\n"
"subset, framed by exactly one Content-Length; otherwise None (use llhttp). Returns (status, head, content_length,\n"
"keep_alive, head_len): head is what the client gets, as scan_response_head builds it\n"
"(status line as HTTP/1.1, hop-by-hop lines removed, Content-Length kept); head_len is\n"
"where the body starts in data.");

static PyObject *parse_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data: bytes, max_head: int)");
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *he = find_head_end(data, n < max_head ? n : max_head);
    if (he == NULL) Py_RETURN_NONE;
    const char *end = he + 2;
    /* status line: HTTP/1.x SP 3DIGIT SP reason CRLF */
    if (end - data < 15 || memcmp(data, "HTTP/1.", 7) != 0 || (data[7] != '0' && data[7] != '1') || data[8] != ' ')
        Py_RETURN_NONE;
    int http10 = data[7] == '0';
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (data[i] < '0' || data[i] > '9') Py_RETURN_NONE;
        status = status * 10 + (data[i] - '0');
    }
    if (data[9] == '0' || data[12] != ' ') Py_RETURN_NONE;
    /* 1xx, 204 and 304 carry no body whatever their headers say: llhttp frames them */
    if (status < 200 || status == 204 || status == 304) Py_RETURN_NONE;
    const char *p = data + 13;
    while (p < end && VCHAR[(unsigned char)*p]) p++;
    if (p + 1 >= end || p[0] != '\r' || p[1] != '\n') Py_RETURN_NONE;
    p += 2;
    const char *status_end = p;

    /* one pass: validate, find framing, copy the lines the client gets into `out` */
    Py_ssize_t head_len = (he + 4) - data;
    char stackbuf[STACK_OUT];
    char *out = scratch(stackbuf, head_len);
    if (out == NULL) return PyErr_NoMemory();
    Py_ssize_t olen = status_end - data;
    memcpy(out, data, (size_t)olen);
    out[7] = '1';  /* the client gets HTTP/1.1 */
    long long cl = -1;
    int flags = 0;
    PyObject *head = NULL;
    const char *q = p;
    while (q < end) {
        const char *name, *val, *line = q;
        Py_ssize_t nlen, vlen;
        q = header_line(q, end, &name, &nlen, &val, &vlen);
        if (q == NULL) goto fallback;
        switch (resp_kind(name, nlen)) {
        case H_FALLBACK: goto fallback;
        case H_DROP: continue;
        case H_CONNECTION: {
            int f = connection_flags(val, vlen);
            if (f < 0) goto fallback;
            flags |= f;
            continue;  /* hop-by-hop: dropped */
        }
        case H_CONTENT_LENGTH:
            if (cl >= 0 || vlen > 15) goto fallback;
            cl = 0;
            for (Py_ssize_t i = 0; i < vlen; i++) {
                if (val[i] < '0' || val[i] > '9') goto fallback;
                cl = cl * 10 + (val[i] - '0');
            }
            break;  /* kept */
        }
        memcpy(out + olen, line, (size_t)(q - line));
        olen += q - line;
    }
    if (cl < 0) goto fallback;
    out[olen++] = '\r';
    out[olen++] = '\n';
    head = PyBytes_FromStringAndSize(out, olen);
fallback:  /* also the success path: head is NULL only when declined or out of memory */
    if (out != stackbuf) PyMem_Free(out);
    if (head == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *t = PyTuple_New(5);
    if (t == NULL) { Py_DECREF(head); return NULL; }
    PyTuple_SET_ITEM(t, 0, PyLong_FromLong(status));
    PyTuple_SET_ITEM(t, 1, head);
    PyTuple_SET_ITEM(t, 2, PyLong_FromLongLong(cl));
    PyTuple_SET_ITEM(t, 3, Py_NewRef(keep_alive(http10, flags) ? Py_True : Py_False));
    PyTuple_SET_ITEM(t, 4, PyLong_FromSsize_t(head_len));
    if (PyTuple_GET_ITEM(t, 0) == NULL || PyTuple_GET_ITEM(t, 2) == NULL || PyTuple_GET_ITEM(t, 4) == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL, parse_request_doc},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL, parse_response_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fasthttp",
    "Optional C fast path for complete, simple HTTP/1.1 heads (llhttp handles the rest).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fasthttp(void) {
    init_tables();
    return PyModule_Create(&module);
}
