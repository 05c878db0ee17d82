/*
 * halb.health._probe: optional C helper for the health prober's TCP checks.
 *
 * Why: a node checks every backend itself, so 10,000 backends every 30 s are 333 TCP
 * connects a second, all the time. In Python each one is a socket object (its __init__ is
 * Python code), setsockopt, connect_ex, an epoll register, a getsockopt and a close through
 * socket.py: about 25 us of interpreter time per check on top of ~20 us in the kernel.
 * Here a check is two calls: start() does socket + SO_LINGER 0 + connect + epoll_ctl, and
 * collect() does epoll_wait(0) + getsockopt(SO_ERROR) + close for every finished connect.
 *
 * The Python side (halb/health/connect_set.py) has the same interface in pure Python
 * (HALB_PROBE_ACCEL=0, or no compiler); tests/unit/test_connect_set.py runs both. Nothing
 * here decides anything: it reports errno values and the prober turns them into results.
 *
 * Sockets are closed with SO_LINGER {1, 0} (RST): a check never leaves TIME_WAIT behind.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define COLLECT_MAX 512

typedef struct {
    PyObject_HEAD
    int epfd;
} ConnectSet;

static int ConnectSet_init(ConnectSet *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":ConnectSet", kwlist)) return -1;
    if (self->epfd >= 0) close(self->epfd);
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *ConnectSet_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    ConnectSet *self = (ConnectSet *)type->tp_alloc(type, 0);
    if (self != NULL) self->epfd = -1;
    return (PyObject *)self;
}

static void ConnectSet_dealloc(ConnectSet *self) {
    if (self->epfd >= 0) close(self->epfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int closed_check(ConnectSet *self) {
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "ConnectSet is closed");
        return -1;
    }
    return 0;
}

static PyObject *ConnectSet_fileno(ConnectSet *self, PyObject *unused) {
    if (closed_check(self) < 0) return NULL;
    return PyLong_FromLong(self->epfd);
}

/* start(family, host, port) -> (fd, err)
 * fd >= 0: the connect is in flight and watched (err 0);
 * fd == -1: finished at once: err 0 connected (socket already closed), else the errno.
 * A host that is not an IP literal of `family`, or a bad port, raises ValueError. */
static PyObject *ConnectSet_start(ConnectSet *self, PyObject *args) {
    int family, port;
    const char *host;
    if (!PyArg_ParseTuple(args, "isi:start", &family, &host, &port)) return NULL;
    if (closed_check(self) < 0) return NULL;
    if (port <= 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "invalid port %d", port);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof(ss));
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) goto bad_host;
        len = sizeof(*a);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((unsigned short)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) goto bad_host;
        len = sizeof(*a);
    } else {
        PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
        return NULL;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Py_BuildValue("(ii)", -1, errno);
    struct linger lg = {1, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    int err = 0;
    if (connect(fd, (struct sockaddr *)&ss, len) == 0) {
        close(fd);  /* connected at once (possible on loopback): done, closed with RST */
        return Py_BuildValue("(ii)", -1, 0);
    }
    if (errno != EINPROGRESS) {
        err = errno;
        close(fd);
        return Py_BuildValue("(ii)", -1, err);
    }
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLOUT;
    ev.data.fd = fd;
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        err = errno;
        close(fd);
        return Py_BuildValue("(ii)", -1, err);
    }
    return Py_BuildValue("(ii)", fd, 0);

bad_host:
    PyErr_Format(PyExc_ValueError, "%s is not an IPv%c address", host, family == AF_INET ? '4' : '6');
    return NULL;
}

/* collect() -> [(fd, err), ...]: every watched connect that finished, its socket closed
 * (RST) and out of the set; err is its SO_ERROR (0: connected). Never blocks. */
static PyObject *ConnectSet_collect(ConnectSet *self, PyObject *unused) {
    if (closed_check(self) < 0) return NULL;
    struct epoll_event events[COLLECT_MAX];
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (;;) {
        int n = epoll_wait(self->epfd, events, COLLECT_MAX, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd, err = 0;
            socklen_t elen = sizeof(err);
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0) err = errno;
            close(fd);
            PyObject *item = Py_BuildValue("(ii)", fd, err);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
        if (n < COLLECT_MAX) break;
    }
    return out;
}

/* abort(fd): give up on a watched connect (timeout, target removed): close it with RST.
 * Only an fd that is in this set is closed (EPOLL_CTL_DEL must succeed): a stale number
 * that now belongs to some other file is left alone. */
static PyObject *ConnectSet_abort(ConnectSet *self, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (closed_check(self) < 0) return NULL;
    if (fd >= 0 && epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL) == 0) close(fd);
    Py_RETURN_NONE;
}

/* close(): the epoll set itself; connects still in flight stay open (abort them first). */
static PyObject *ConnectSet_close(ConnectSet *self, PyObject *unused) {
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef ConnectSet_methods[] = {
    {"fileno", (PyCFunction)ConnectSet_fileno, METH_NOARGS, "The epoll fd: readable when a connect finished."},
    {"start", (PyCFunction)ConnectSet_start, METH_VARARGS,
     "start(family, host, port) -> (fd, err): begin a non-blocking connect (fd -1: finished at once)."},
    {"collect", (PyCFunction)ConnectSet_collect, METH_NOARGS,
     "collect() -> [(fd, err)]: finished connects, their sockets closed (RST)."},
    {"abort", (PyCFunction)ConnectSet_abort, METH_O, "abort(fd): close an in-flight connect (RST)."},
    {"close", (PyCFunction)ConnectSet_close, METH_NOARGS, "Close the epoll set."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnectSetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "halb.health._probe.ConnectSet",
    .tp_basicsize = sizeof(ConnectSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Non-blocking TCP connects watched by one epoll set (the prober's TCP checks).",
    .tp_new = ConnectSet_new,
    .tp_init = (initproc)ConnectSet_init,
    .tp_dealloc = (destructor)ConnectSet_dealloc,
    .tp_methods = ConnectSet_methods,
};

static struct PyModuleDef probe_module = {
    PyModuleDef_HEAD_INIT, "halb.health._probe",
    "Optional C helper for the health prober's TCP connects (see halb/health/connect_set.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__probe(void) {
    if (PyType_Ready(&ConnectSetType) < 0) return NULL;
    PyObject *m = PyModule_Create(&probe_module);
    if (m == NULL) return NULL;
    Py_INCREF(&ConnectSetType);
    if (PyModule_AddObject(m, "ConnectSet", (PyObject *)&ConnectSetType) < 0) {
        Py_DECREF(&ConnectSetType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
