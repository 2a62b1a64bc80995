/* lbproxy.proxy._accept: the listener's accept loop in C (issue 27), for proxy/listener.py's
 * Acceptor; built with the compiled build (setup.py), absent from the pure one, where the
 * listener does the same in Python with the socket's own accept.
 *
 * accept(fd, most) takes up to `most` connections waiting on the listening socket `fd`
 * (non-blocking) and returns (taken, error):
 *   taken  a list of (descriptor, peer) for each connection taken, the descriptor
 *          close-on-exec, peer as socket.accept() gives it: ("a.b.c.d", port) for IPv4,
 *          ("::1", port, flowinfo, scope_id) for IPv6;
 *   error  0 when the socket had no more waiting (EAGAIN) or `most` were taken, else the
 *          errno of the accept that failed (the listener decides: skip it, or pause).
 *
 * Why C: in Python, finding that no more connections wait costs an exception, a
 * BlockingIOError with its message, made at the end of every readiness callback: about 5 us
 * each (more than the accept system call), and mypyc adds a traceback to every exception it
 * catches. Taking one connection per callback instead, which avoids it, costs a turn of the
 * loop (an epoll_wait) per connection when many arrive together: measured, more CPU per
 * WebSocket connection than the exception (bench/CONNECT.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

/* The peer as socket.accept() gives it; NULL (with an exception) if out of memory. */
static PyObject *peer_of(const struct sockaddr_storage *addr) {
    char host[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                             (unsigned int)ntohl(a->sin6_flowinfo),
                             (unsigned int)a->sin6_scope_id);
    }
    Py_RETURN_NONE; /* a family the listener never opens */
}

static PyObject *accept_some(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "accept() takes (fd, most)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    long most = PyLong_AsLong(args[1]);
    if ((fd == -1 || most == -1) && PyErr_Occurred())
        return NULL;
    PyObject *taken = PyList_New(0);
    if (taken == NULL)
        return NULL;
    int error = 0;
    while (PyList_GET_SIZE(taken) < most) {
        struct sockaddr_storage addr;
        socklen_t len = sizeof addr;
        int conn = accept4((int)fd, (struct sockaddr *)&addr, &len, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                error = errno;
            break;
        }
        PyObject *peer = peer_of(&addr);
        PyObject *item = peer != NULL ? Py_BuildValue("(iN)", conn, peer) : NULL;
        if (item == NULL || PyList_Append(taken, item) < 0) {
            Py_XDECREF(item);
            close(conn);
            goto fail;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(Ni)", taken, error);
fail:
    /* Out of memory: what was taken cannot be handed over; close it rather than leak it. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(taken); i++)
        close((int)PyLong_AsLong(PyTuple_GET_ITEM(PyList_GET_ITEM(taken, i), 0)));
    Py_DECREF(taken);
    return NULL;
}

static PyMethodDef methods[] = {
    {"accept", (PyCFunction)(void (*)(void))accept_some, METH_FASTCALL,
     "(taken, error): up to `most` connections waiting on the listening socket `fd`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accept", "The listener's accept loop in C (see the source).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__accept(void) { return PyModule_Create(&module); }
