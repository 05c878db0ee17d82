/*
 * halb.dataplane._tcprelay: TCP mode's per-connection byte relay, below Python.
 *
 * Why: with a new connection per request, halb's TCP mode on uvloop paid ~25 system calls
 * and a dozen Python objects (Protocol, Transport, handles) per connection; the kernel time
 * alone was 55-60 us per connection against HAProxy's ~42 us in total (docs/dataplane.md).
 * Here a connection costs accept4, socket, setsockopt(TCP_NODELAY), connect, two
 * epoll_ctl(ADD), the recv/send pairs of the payload, one shutdown and two closes; Python
 * only sees a connection three times: when it is accepted (to pick a backend), when the
 * backend connect ends, and when it is closed.
 *
 * Shape: a Relay owns an epoll instance. It has no thread and never blocks: the Python
 * event loop watches the epoll fd (an epoll fd is itself pollable) and calls run(), which
 * takes the ready events with epoll_wait(timeout 0), moves bytes, and returns completion
 * records for Python:
 *
 *     (token, CONNECTED, connect time in us)    backend connect succeeded
 *     (token, FAILED, errno)                    backend connect failed; socket closed
 *     (token, TIMEOUT, ETIMEDOUT)               connect_timeout passed (from expire())
 *     (token, CLOSED, 0)                        both sockets closed; the relay forgot it
 *
 * After FAILED/TIMEOUT the client socket stays open and registered (early bytes kept):
 * Python calls connect() again for the next backend, or close().
 *
 * Connection states:
 *
 *     add() -> WAIT --connect()--> CONNECTING --EPOLLOUT--> OPEN --both EOFs / error--> closed
 *               ^                      |
 *               +--FAILED / TIMEOUT----+
 *
 * Every socket is registered once, edge-triggered, for IN|OUT|RDHUP. Because an edge is
 * reported once, each side remembers what the kernel told it (readable, writable, peer
 * shut down) until a system call says otherwise (EAGAIN, a short read or write).
 *
 * Flow control: each direction holds at most one buffer (bufsize) of bytes that the other
 * side could not take; while it holds any, its source is not read, so the sender is
 * slowed by TCP itself. Idle connections hold no buffer at all: bytes are received into a
 * shared scratch buffer and copied into a per-direction buffer only when a send falls
 * short (or the backend is not connected yet). At most PUMP_BUDGET reads per connection
 * per run(): a connection that still has work is queued and served on the next run() (the
 * `backlog` attribute tells Python to call run() again), so one fast stream cannot hold
 * the event loop.
 *
 * Half-close: an EOF read from one side becomes shutdown(SHUT_WR) of the other once its
 * pending bytes are written; the connection closes when both directions have ended, or at
 * once on an error of either socket.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define PUMP_BUDGET 16 /* reads per connection per run(): 1 MiB with 64 KiB buffers */

enum { ST_WAIT = 1, ST_CONNECTING, ST_OPEN, ST_DEAD };
enum { R_CONNECTED = 1, R_FAILED, R_TIMEOUT, R_CLOSED };

typedef struct Conn Conn;

/* One socket of a connection; epoll_event.data.ptr points here. */
typedef struct {
    Conn *conn;
    int fd;
    unsigned readable : 1; /* the kernel reported input (or EOF/error) not read yet */
    unsigned writable : 1; /* the send buffer had room when we last looked */
    unsigned rdhup : 1;    /* the peer shut down its sending side (EPOLLRDHUP seen) */
    unsigned err : 1;      /* EPOLLERR seen: a read must report it, never infer an EOF */
    unsigned eof : 1;      /* we read this side's EOF */
    unsigned shut : 1;     /* we sent this side our EOF (shutdown SHUT_WR) */
} Side;

/* Bytes read from one side that the other side has not taken yet. */
typedef struct {
    char *buf; /* NULL while empty: only a backlogged direction holds memory */
    size_t off, len;
} Pending;

struct Conn {
    Side c, b;           /* client, backend */
    Pending up, down;    /* client -> backend, backend -> client */
    PyObject *token;     /* Python's object for this connection (returned in records) */
    int state;
    int cerr;            /* the client failed before the backend was connected */
    int active;          /* bytes moved since the last expire() */
    int in_again;        /* queued on Relay.again (freed only after it leaves the queue) */
    double t_connect, connect_deadline, last_active, idle_timeout;
    Conn *prev, *next;   /* Relay.head: every live connection */
    Conn *link;          /* Relay.again or Relay.dead */
};

typedef struct {
    PyObject_HEAD
    int epfd;
    Conn **byfd;      /* client fd -> connection */
    int nbyfd;
    Conn *head;       /* live connections */
    Conn *again;      /* ran out of PUMP_BUDGET: pump again on the next run() */
    Conn *dead;       /* closed during run(): freed when its events are no longer in use */
    int nagain;
    int in_run;
    Py_ssize_t count; /* live connections */
    PyObject *out;    /* records not yet returned */
    int out_failed;   /* a record could not be allocated */
    size_t bufsize;
    char *scratch;
} Relay;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void emit(Relay *r, PyObject *token, int kind, long value) {
    if (r->out == NULL && (r->out = PyList_New(0)) == NULL) {
        r->out_failed = 1;
        return;
    }
    PyObject *rec = Py_BuildValue("(Oil)", token, kind, value);
    if (rec == NULL || PyList_Append(r->out, rec) < 0) r->out_failed = 1;
    Py_XDECREF(rec);
}

/* The records collected so far (a new list each time), or NULL with MemoryError set. */
static PyObject *take_records(Relay *r) {
    if (r->out_failed) {
        r->out_failed = 0;
        Py_CLEAR(r->out);
        return PyErr_NoMemory();
    }
    PyObject *res = r->out;
    r->out = NULL;
    return res ? res : PyList_New(0);
}

static void side_reset(Side *s, Conn *c, int fd) {
    memset(s, 0, sizeof(*s));
    s->conn = c;
    s->fd = fd;
}

static void pending_free(Pending *p) {
    free(p->buf);
    p->buf = NULL;
    p->off = p->len = 0;
}

static void conn_free(Conn *c) {
    pending_free(&c->up);
    pending_free(&c->down);
    free(c);
}

/* Close both sockets and forget the connection; emits CLOSED when `record`. The memory is
 * freed later when events of the current run() or the again queue may still point at it. */
static void conn_close(Relay *r, Conn *c, int record) {
    if (c->state == ST_DEAD) return;
    if (c->c.fd >= 0) {
        if (c->c.fd < r->nbyfd) r->byfd[c->c.fd] = NULL;
        close(c->c.fd); /* closing removes it from the epoll set (no other reference) */
        c->c.fd = -1;
    }
    if (c->b.fd >= 0) {
        close(c->b.fd);
        c->b.fd = -1;
    }
    pending_free(&c->up);
    pending_free(&c->down);
    if (c->prev) c->prev->next = c->next; else r->head = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->state = ST_DEAD;
    r->count--;
    if (record) emit(r, c->token, R_CLOSED, 0);
    PyObject *token = c->token;
    c->token = NULL;
    if (c->in_again) {
        /* freed when the again queue is walked */
    } else if (r->in_run) {
        c->link = r->dead;
        r->dead = c;
    } else {
        conn_free(c);
    }
    Py_XDECREF(token);
}

/* Write what `p` holds to `dst`. 0, or the errno of a failed send. */
static int flush(Conn *c, Side *dst, Pending *p) {
    while (p->len) {
        if (!dst->writable) return 0;
        ssize_t n = send(dst->fd, p->buf + p->off, p->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                dst->writable = 0;
                return 0;
            }
            return errno;
        }
        c->active = 1;
        p->off += (size_t)n;
        p->len -= (size_t)n;
        if (p->len) dst->writable = 0; /* short write: the send buffer is full */
    }
    pending_free(p);
    return 0;
}

/* Move bytes src -> dst (through `p` when dst cannot take them). `can_send` is false while
 * the backend is not connected: then at most one buffer of early bytes is kept. Returns 0,
 * or an errno with *failed set to the side whose system call failed. `*budget` counts
 * down the reads this run() may still do for the connection. */
static int pump_dir(Relay *r, Conn *c, Side *src, Side *dst, Pending *p, int can_send, Side **failed,
                    int *budget) {
    for (;;) {
        if (p->len) {
            if (!can_send) return 0;
            int e = flush(c, dst, p);
            if (e) {
                *failed = dst;
                return e;
            }
            if (p->len) return 0; /* dst is full: leave src unread (flow control) */
        }
        if (src->eof || !src->readable) return 0;
        if (*budget <= 0) return 0; /* the caller queues the connection for the next run() */
        --*budget;
        ssize_t n = recv(src->fd, r->scratch, r->bufsize, 0);
        if (n == 0) {
            src->eof = 1;
            return 0;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                src->readable = 0;
                return 0;
            }
            *failed = src;
            return errno;
        }
        c->active = 1;
        size_t got = (size_t)n, sent = 0;
        /* A short read took everything queued; new bytes bring a new edge. After the peer's
         * FIN (RDHUP) with no error pending, the next read could only return 0: take the EOF
         * now and spare that system call. With an error pending, read again to get it. */
        int drained = got < r->bufsize && !src->err;
        if (drained && src->rdhup) src->eof = 1;
        if (can_send && dst->writable) {
            /* The last bytes before an EOF: MSG_MORE keeps them queued until the shutdown
             * (or close) that follows in this same pump, so data and FIN leave as one
             * segment instead of two (the peer's side of loopback runs on our CPU too). */
            int more = src->eof && !dst->shut ? MSG_MORE : 0;
            ssize_t s = send(dst->fd, r->scratch, got, MSG_NOSIGNAL | MSG_DONTWAIT | more);
            if (s < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                *failed = dst;
                return errno;
            }
            sent = s > 0 ? (size_t)s : 0;
            if (sent < got) dst->writable = 0;
        }
        if (sent < got) {
            if (p->buf == NULL && (p->buf = malloc(r->bufsize)) == NULL) {
                *failed = src;
                return ENOMEM;
            }
            memcpy(p->buf, r->scratch + sent, got - sent);
            p->off = 0;
            p->len = got - sent;
        }
        if (drained) {
            if (!src->eof) src->readable = 0;
            return 0;
        }
    }
}

static void queue_again(Relay *r, Conn *c) {
    if (c->in_again) return;
    c->in_again = 1;
    c->link = r->again;
    r->again = c;
    r->nagain++;
}

/* Do everything a connection can do now without blocking. */
static void pump(Relay *r, Conn *c) {
    int open = c->state == ST_OPEN;
    int budget = PUMP_BUDGET, e;
    Side *failed = NULL;
    if (open && c->cerr) { /* the client failed while we were connecting */
        conn_close(r, c, 1);
        return;
    }
    e = pump_dir(r, c, &c->c, &c->b, &c->up, open, &failed, &budget);
    if (!e && open) e = pump_dir(r, c, &c->b, &c->c, &c->down, 1, &failed, &budget);
    if (e) {
        if (!open) {
            /* Client reset before there is a backend: keep the attempt running (it is
             * accounted either way); connect() or the CONNECTED event closes it. */
            c->cerr = e;
            c->c.eof = 1;
            pending_free(&c->up);
            return;
        }
        if (failed == &c->b && c->down.len) { /* the backend failed: hand over what we have */
            c->c.writable = 1;
            flush(c, &c->c, &c->down);
        }
        conn_close(r, c, 1);
        return;
    }
    if (!open) return;
    if (c->c.eof && c->b.eof && !c->up.len && !c->down.len) {
        conn_close(r, c, 1); /* both directions ended and were delivered */
        return;
    }
    if (c->c.eof && !c->up.len && !c->b.shut) {
        shutdown(c->b.fd, SHUT_WR);
        c->b.shut = 1;
    }
    if (c->b.eof && !c->down.len && !c->c.shut) {
        shutdown(c->c.fd, SHUT_WR);
        c->c.shut = 1;
    }
    if (budget <= 0) queue_again(r, c);
}

/* The backend socket failed to connect (or timed out): close it, tell Python. */
static void connect_failed(Relay *r, Conn *c, int kind, int err) {
    close(c->b.fd);
    side_reset(&c->b, c, -1);
    c->state = ST_WAIT;
    emit(r, c->token, kind, err);
}

static int sock_error(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err ? err : ECONNREFUSED;
}

static void reap(Relay *r) {
    while (r->dead) {
        Conn *c = r->dead;
        r->dead = c->link;
        conn_free(c);
    }
}

/* ------------------------------------------------------------------ Python methods */

static Conn *lookup(Relay *r, int fd, PyObject *token) {
    if (fd < 0 || fd >= r->nbyfd) return NULL;
    Conn *c = r->byfd[fd];
    return (c && c->token == token) ? c : NULL;
}

static PyObject *Relay_run(Relay *r, PyObject *unused) {
    struct epoll_event evs[MAX_EVENTS];
    r->in_run = 1;
    /* connections that used up their budget last time */
    Conn *again = r->again;
    r->again = NULL;
    r->nagain = 0;
    while (again) {
        Conn *c = again;
        again = c->link;
        c->in_again = 0;
        if (c->state == ST_DEAD) conn_free(c);
        else pump(r, c);
    }
    int n = epoll_wait(r->epfd, evs, MAX_EVENTS, 0);
    int wait_errno = n < 0 ? errno : 0;
    for (int i = 0; i < n; i++) {
        Side *s = evs[i].data.ptr;
        Conn *c = s->conn;
        uint32_t m = evs[i].events;
        if (c->state == ST_DEAD) continue;
        if (s == &c->b && c->state == ST_CONNECTING) {
            if (m & (EPOLLERR | EPOLLHUP)) {
                connect_failed(r, c, R_FAILED, sock_error(s->fd));
                continue;
            }
            if (!(m & EPOLLOUT)) continue;
            /* EPOLLOUT without an error is a finished connect on Linux: no getsockopt */
            c->state = ST_OPEN;
            emit(r, c->token, R_CONNECTED, (long)((mono() - c->t_connect) * 1e6));
        }
        if (m & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->readable = 1;
        if (m & EPOLLRDHUP) s->rdhup = 1;
        if (m & EPOLLERR) s->err = 1;
        if (m & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->writable = 1;
        pump(r, c);
    }
    r->in_run = 0;
    reap(r);
    if (n < 0 && wait_errno != EINTR) {
        errno = wait_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return take_records(r);
}

static PyObject *Relay_add(Relay *r, PyObject *args) {
    int fd;
    PyObject *token;
    double idle;
    if (!PyArg_ParseTuple(args, "iOd:add", &fd, &token, &idle)) return NULL;
    if (fd < 0) return PyErr_Format(PyExc_ValueError, "bad fd %d", fd);
    if (fd >= r->nbyfd) {
        int n = r->nbyfd ? r->nbyfd : 1024;
        while (n <= fd) n *= 2;
        Conn **t = realloc(r->byfd, sizeof(Conn *) * (size_t)n);
        if (t == NULL) {
            close(fd);
            return PyErr_NoMemory();
        }
        memset(t + r->nbyfd, 0, sizeof(Conn *) * (size_t)(n - r->nbyfd));
        r->byfd = t;
        r->nbyfd = n;
    }
    if (r->byfd[fd]) return PyErr_Format(PyExc_ValueError, "fd %d is already relayed", fd);
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL) {
        close(fd);
        return PyErr_NoMemory();
    }
    side_reset(&c->c, c, fd);
    side_reset(&c->b, c, -1);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->c};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int e = errno;
        free(c);
        close(fd);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    c->state = ST_WAIT;
    c->token = Py_NewRef(token);
    c->idle_timeout = idle;
    c->last_active = mono();
    c->next = r->head;
    if (r->head) r->head->prev = c;
    r->head = c;
    r->byfd[fd] = c;
    r->count++;
    Py_RETURN_NONE;
}

static PyObject *Relay_connect(Relay *r, PyObject *args) {
    int fd, port;
    PyObject *token;
    const char *host;
    double timeout;
    if (!PyArg_ParseTuple(args, "iOsid:connect", &fd, &token, &host, &port, &timeout)) return NULL;
    Conn *c = lookup(r, fd, token);
    if (c == NULL) return PyErr_Format(PyExc_KeyError, "fd %d is not relayed for this token", fd);
    if (c->state != ST_WAIT) return PyErr_Format(PyExc_ValueError, "fd %d already has a backend", fd);
    if (c->cerr) { /* the client is gone: nothing to connect for */
        conn_close(r, c, 0);
        Py_RETURN_FALSE;
    }
    if (port <= 0 || port > 65535) return PyErr_Format(PyExc_ValueError, "bad port %d", port);
    struct sockaddr_storage ss;
    socklen_t slen;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        slen = sizeof(*a4);
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        slen = sizeof(*a6);
    } else {
        return PyErr_Format(PyExc_ValueError, "not a numeric address: %s", host);
    }
    int bfd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (bfd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    int one = 1;
    setsockopt(bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = connect(bfd, (struct sockaddr *)&ss, slen);
    if (rc < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(bfd);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->b};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, bfd, &ev) < 0) {
        int e = errno;
        close(bfd);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    side_reset(&c->b, c, bfd);
    c->t_connect = mono();
    c->connect_deadline = timeout > 0 ? c->t_connect + timeout : 0;
    c->state = ST_CONNECTING;
    if (rc == 0) { /* connected at once; the registration's EPOLLOUT makes run() deliver it */
        c->state = ST_OPEN;
        emit(r, c->token, R_CONNECTED, 0);
    }
    Py_RETURN_TRUE;
}

static PyObject *Relay_close_conn(Relay *r, PyObject *args) {
    int fd;
    PyObject *token;
    if (!PyArg_ParseTuple(args, "iO:close", &fd, &token)) return NULL;
    Conn *c = lookup(r, fd, token);
    if (c == NULL) Py_RETURN_FALSE;
    conn_close(r, c, 0);
    Py_RETURN_TRUE;
}

static PyObject *Relay_expire(Relay *r, PyObject *unused) {
    double now = mono();
    Conn *next;
    for (Conn *c = r->head; c; c = next) {
        next = c->next;
        if (c->state == ST_CONNECTING && c->connect_deadline && now >= c->connect_deadline) {
            connect_failed(r, c, R_TIMEOUT, ETIMEDOUT);
        } else if (c->active) {
            c->active = 0;
            c->last_active = now;
        } else if (c->state != ST_WAIT && c->idle_timeout > 0 && now - c->last_active > c->idle_timeout) {
            conn_close(r, c, 1);
        }
    }
    return take_records(r);
}

static PyObject *Relay_accept(Relay *r, PyObject *args) {
    int lfd, max_n, want_peer;
    if (!PyArg_ParseTuple(args, "iip:accept", &lfd, &max_n, &want_peer)) return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (int i = 0; i < max_n; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(lfd, want_peer ? (struct sockaddr *)&ss : NULL, want_peer ? &len : NULL,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (PyList_GET_SIZE(list) == 0) {
                Py_DECREF(list);
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            break; /* hand over what we have; the error comes back on the next call */
        }
        PyObject *peer = Py_None;
        char txt[INET6_ADDRSTRLEN];
        if (want_peer) {
            const void *src = ss.ss_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr
                                                         : (const void *)&((struct sockaddr_in *)&ss)->sin_addr;
            if (inet_ntop(ss.ss_family, src, txt, sizeof(txt)) == NULL) txt[0] = 0;
            peer = PyBytes_FromString(txt);
        } else {
            Py_INCREF(peer);
        }
        PyObject *item = peer ? Py_BuildValue("(iN)", fd, peer) : NULL;
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            close(fd);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static PyObject *Relay_fileno(Relay *r, PyObject *unused) {
    return PyLong_FromLong(r->epfd);
}

static void close_all(Relay *r) {
    while (r->head) conn_close(r, r->head, 0);
}

static PyObject *Relay_shutdown(Relay *r, PyObject *unused) {
    close_all(r);
    if (r->epfd >= 0) {
        close(r->epfd);
        r->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"bufsize", NULL};
    Py_ssize_t bufsize = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n:Relay", kwlist, &bufsize)) return NULL;
    if (bufsize < 1 || bufsize > (1 << 24)) return PyErr_Format(PyExc_ValueError, "bad bufsize %zd", bufsize);
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r == NULL) return NULL;
    r->epfd = -1;
    r->bufsize = (size_t)bufsize;
    r->scratch = malloc(r->bufsize);
    if (r->scratch == NULL) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

/* The relay holds its tokens (Python objects that usually point back at the owner of the
 * relay): tell the cyclic GC about them, so an engine dropped without stop() is still
 * collected (clearing closes its connections). */
static int Relay_traverse(Relay *r, visitproc visit, void *arg) {
    for (Conn *c = r->head; c; c = c->next) Py_VISIT(c->token);
    Py_VISIT(r->out);
    return 0;
}

static int Relay_clear(Relay *r) {
    close_all(r);
    Py_CLEAR(r->out);
    return 0;
}

static void Relay_dealloc(Relay *r) {
    PyObject_GC_UnTrack(r);
    close_all(r);
    reap(r);
    while (r->again) { /* every connection is closed by now: free the queued ones */
        Conn *c = r->again;
        r->again = c->link;
        conn_free(c);
    }
    if (r->epfd >= 0) close(r->epfd);
    free(r->byfd);
    free(r->scratch);
    Py_XDECREF(r->out);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_get_count(Relay *r, void *unused) { return PyLong_FromSsize_t(r->count); }
static PyObject *Relay_get_backlog(Relay *r, void *unused) { return PyLong_FromLong(r->nagain); }

static PyGetSetDef Relay_getset[] = {
    {"count", (getter)Relay_get_count, NULL, "live connections", NULL},
    {"backlog", (getter)Relay_get_backlog, NULL, "connections with work left for the next run()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "the epoll fd to watch for readability"},
    {"run", (PyCFunction)Relay_run, METH_NOARGS, "relay what is ready; returns [(token, kind, value)]"},
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(client_fd, token, idle_timeout): take over an accepted socket (closed by the relay from now on, "
     "also if add fails)"},
    {"connect", (PyCFunction)Relay_connect, METH_VARARGS,
     "connect(client_fd, token, host, port, timeout) -> False if the client is already gone (then closed, "
     "no record); raises OSError when the connect fails at once"},
    {"close", (PyCFunction)Relay_close_conn, METH_VARARGS, "close(client_fd, token): close both sockets, no record"},
    {"expire", (PyCFunction)Relay_expire, METH_NOARGS, "apply connect and idle timeouts; returns records"},
    {"accept", (PyCFunction)Relay_accept, METH_VARARGS,
     "accept(listen_fd, max_n, want_peer) -> [(fd, peer ip bytes or None)], non-blocking, close-on-exec"},
    {"shutdown", (PyCFunction)Relay_shutdown, METH_NOARGS, "close every connection and the epoll fd"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "halb.dataplane._tcprelay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Edge-triggered epoll byte relay driven by the caller's event loop (see the module comment).",
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tcprelay", "TCP mode's per-connection relay in C (see _tcprelay.c).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tcprelay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddIntConstant(m, "CONNECTED", R_CONNECTED) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", R_FAILED) < 0 ||
        PyModule_AddIntConstant(m, "TIMEOUT", R_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", R_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "BUFSIZE", 65536) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
