/* lbproxy.wire._headscan: one C pass over an HTTP/1.1 head that is valid in the common way
 * (issue 27), for wire/http1.py's parsers; built with the compiled build (setup.py), absent
 * from the pure one, where http1.py does the same work in Python.
 *
 * scan(buffer, start, end) takes a head, buffer[start:end] (bytes or a bytearray), without
 * its final CRLFCRLF and returns (lines, specials):
 *   lines     the head split at CRLF, as bytes.split(b"\r\n") would;
 *   specials  (kind, line number, value without its leading and trailing SP/HTAB) for each
 *             field line whose name, lower-cased, is a key of the table given to
 *             configure() (http1._SPECIAL: framing, Host, hop-by-hop, X-Forwarded-*...).
 * or None when anything is unusual: a byte no head may hold (what http1._HEAD_DELETE lists
 * but CR and LF), a CR not followed by LF or an LF not after a CR, a field line without a
 * colon, an empty name or a name byte that is not a token character (obs-fold and
 * whitespace before the colon among them). None means "let the Python parser look": it
 * answers those with the same 400/502 and reason as it always did, so this scanner never
 * decides to refuse anything, and what it accepts the Python path accepts alike
 * (tests/unit/test_headscan.py compares both on random and mutated heads).
 *
 * Why C: the Python path costs a bytes object and a method call per line and per name
 * (split, partition, a dict lookup, strip): about half of lbproxy's own CPU per proxied
 * request (bench/ISSUE27.md). Here the names are compared in place; the only objects made
 * are the lines and the few special values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_SPECIALS 64
#define MAX_NAME 64

static unsigned char value_ok[256]; /* RFC 9110 5.5 field-value bytes, SP and HTAB */
static unsigned char tchar[256];    /* RFC 9110 5.6.2 token characters */

static int n_special = 0;
static char special_name[MAX_SPECIALS][MAX_NAME];
static Py_ssize_t special_len[MAX_SPECIALS];
static long special_kind[MAX_SPECIALS];

static void init_classes(void) {
    for (int c = 0; c < 256; c++) {
        value_ok[c] = (c >= 0x20 && c < 0x7f) || c >= 0x80 || c == '\t';
        tchar[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
    }
}

/* configure(table): the special names (lower case bytes) and their kinds (int). */
static PyObject *configure(PyObject *self, PyObject *table) {
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes a dict of bytes to int");
        return NULL;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    int n = 0;
    while (PyDict_Next(table, &pos, &key, &value)) {
        if (!PyBytes_Check(key) || !PyLong_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "configure() takes a dict of bytes to int");
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        if (n >= MAX_SPECIALS || len == 0 || len >= MAX_NAME) {
            PyErr_SetString(PyExc_ValueError, "too many special names, or one too long");
            return NULL;
        }
        long kind = PyLong_AsLong(value);
        if (kind == -1 && PyErr_Occurred())
            return NULL;
        memcpy(special_name[n], PyBytes_AS_STRING(key), (size_t)len);
        special_len[n] = len;
        special_kind[n] = kind;
        n++;
    }
    n_special = n;
    Py_RETURN_NONE;
}

static long kind_of(const unsigned char *name, Py_ssize_t len) {
    if (len >= MAX_NAME)
        return 0;
    char lower[MAX_NAME];
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = name[i];
        lower[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    for (int k = 0; k < n_special; k++) {
        if (special_len[k] == len && memcmp(special_name[k], lower, (size_t)len) == 0)
            return special_kind[k];
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t from, to, size;
    const char *data;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan() takes (buffer, start, end)");
        return NULL;
    }
    if (PyBytes_Check(args[0])) {
        data = PyBytes_AS_STRING(args[0]);
        size = PyBytes_GET_SIZE(args[0]);
    } else if (PyByteArray_Check(args[0])) {
        data = PyByteArray_AS_STRING(args[0]);
        size = PyByteArray_GET_SIZE(args[0]);
    } else {
        PyErr_SetString(PyExc_TypeError, "scan() takes bytes or a bytearray");
        return NULL;
    }
    from = PyLong_AsSsize_t(args[1]);
    to = PyLong_AsSsize_t(args[2]);
    if ((from == -1 || to == -1) && PyErr_Occurred())
        return NULL;
    if (from < 0 || to < from || to > size) {
        PyErr_SetString(PyExc_ValueError, "scan(): start and end out of the buffer");
        return NULL;
    }
    /* Nothing below calls back into Python code that could resize a bytearray. */
    const unsigned char *p = (const unsigned char *)data + from;
    Py_ssize_t n = to - from;
    PyObject *lines = PyList_New(0);
    PyObject *specials = PyList_New(0);
    if (lines == NULL || specials == NULL)
        goto fail;
    Py_ssize_t start = 0, number = 0;
    for (;;) {
        /* One line: [start, end). The first is the request or status line. */
        Py_ssize_t i = start, colon = -1;
        if (number > 0) {
            while (i < n && tchar[p[i]])
                i++;
            if (i == start || i >= n || p[i] != ':')
                goto unusual;
            colon = i++;
        }
        while (i < n && value_ok[p[i]])
            i++;
        Py_ssize_t end = i;
        if (i < n) {
            if (p[i] != '\r' || i + 1 >= n || p[i + 1] != '\n')
                goto unusual; /* a CTL, NUL, bare CR or bare LF */
        }
        PyObject *line = PyBytes_FromStringAndSize((const char *)p + start, end - start);
        if (line == NULL)
            goto fail;
        int r = PyList_Append(lines, line);
        Py_DECREF(line);
        if (r < 0)
            goto fail;
        if (colon >= 0) {
            long kind = kind_of(p + start, colon - start);
            if (kind) {
                Py_ssize_t a = colon + 1, b = end;
                while (a < b && (p[a] == ' ' || p[a] == '\t'))
                    a++;
                while (b > a && (p[b - 1] == ' ' || p[b - 1] == '\t'))
                    b--;
                PyObject *t = PyTuple_New(3);
                if (t == NULL)
                    goto fail;
                PyObject *k = PyLong_FromLong(kind), *num = PyLong_FromSsize_t(number);
                PyObject *v = PyBytes_FromStringAndSize((const char *)p + a, b - a);
                if (k == NULL || num == NULL || v == NULL) {
                    Py_XDECREF(k);
                    Py_XDECREF(num);
                    Py_XDECREF(v);
                    Py_DECREF(t);
                    goto fail;
                }
                PyTuple_SET_ITEM(t, 0, k);
                PyTuple_SET_ITEM(t, 1, num);
                PyTuple_SET_ITEM(t, 2, v);
                r = PyList_Append(specials, t);
                Py_DECREF(t);
                if (r < 0)
                    goto fail;
            }
        }
        if (end >= n)
            break;
        start = end + 2;
        number++;
    }
    PyObject *result = PyTuple_Pack(2, lines, specials);
    Py_DECREF(lines);
    Py_DECREF(specials);
    return result;
unusual:
    Py_DECREF(lines);
    Py_DECREF(specials);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(lines);
    Py_XDECREF(specials);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_O, "The special field names (lower case) and their kinds."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "(lines, specials) of buffer[start:end], a head valid in the common way, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_headscan", "One C pass over an HTTP/1.1 head (see the source).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__headscan(void) {
    init_classes();
    return PyModule_Create(&module);
}
