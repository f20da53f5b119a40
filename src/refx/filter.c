/*
 * filter.c: the filters of tree_partition and get_partition.
 *
 * Filters.  A filter decides which partition a leaf goes to.  Besides any
 * callable f(leaf) -> bool, these are evaluated in C with no Python call:
 *   "name"            Ref/Value/Index whose collection == "name"
 *   a type            isinstance(leaf, type); it also matches the
 *                     Values/Indexes deref'ed from Refs of its subclasses
 *   (f1, f2, ...)     any of them
 *   ..., True, False  everything, everything, nothing
 *   Not(f), All(*fs), Any(*fs)
 * Filters are checked when the call starts (TypeError for anything else),
 * so a bad filter never leaves a half-built result.
 *
 * Path filters see where a leaf is: its path, the tuple of str that keys a
 * partition (tree_partition has it at hand for every leaf: it comes from
 * the path cache).
 *   PathContains(*parts)  the path holds `parts` as a run of consecutive
 *                         elements (PathContains("enc"), PathContains(
 *                         "blocks", "0")); evaluated in C
 *   PathFilter(fn)        fn(path, leaf) -> bool
 * Where no path is known (calling a filter on a bare leaf) a path filter
 * is a TypeError; filter objects may also be called as f(path, leaf).
 *
 * Functions in this file: refx_filter_validate, refx_filter_match_at (and
 * refx_filter_match, without a path), the Not/All/Any and PathContains/
 * PathFilter types, refx_init_filter_types.
 */
#include "refx.h"

/* ------------------------------------------------------------------ */
/* filters                                                              */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *filters; /* tuple; one item for Not */
} FilterObject;
#define FILTER_CAST(op) ((FilterObject *)(op))

static const char filter_kinds[] =
    "a callable, a collection name (str), a type, a tuple of filters, "
    "Not/All/Any, PathContains/PathFilter, ..., True or False";

int
refx_filter_validate(refx_state *st, PyObject *f, const char *fname,
                     Py_ssize_t pos)
{
    if (f == Py_Ellipsis || f == Py_True || f == Py_False ||
        PyUnicode_Check(f) || PyType_Check(f)) {
        return 0;
    }
    PyTypeObject *tp = Py_TYPE(f);
    if (tp == st->Not_Type || tp == st->All_Type || tp == st->Any_Type ||
        tp == st->PathContains_Type || tp == st->PathFilter_Type) {
        return 0; /* validated at construction */
    }
    if (PyTuple_Check(f)) {
        if (Py_EnterRecursiveCall(" in a filter")) {
            return -1;
        }
        int r = 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f) && r == 0; i++) {
            r = refx_filter_validate(st, PyTuple_GET_ITEM(f, i), fname, pos);
        }
        Py_LeaveRecursiveCall();
        return r;
    }
    if (PyCallable_Check(f)) {
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s: filter %zd is %R (%.200s); expected %s",
                 fname, pos, f, tp->tp_name, filter_kinds);
    return -1;
}

/* PathContains: `parts` (a tuple of str) is a run of `path` */
static int
path_contains(PyObject *path, PyObject *parts)
{
    Py_ssize_t n = PyTuple_GET_SIZE(path), m = PyTuple_GET_SIZE(parts);
    for (Py_ssize_t i = 0; i + m <= n; i++) {
        Py_ssize_t j = 0;
        while (j < m) {
            PyObject *a = PyTuple_GET_ITEM(path, i + j);
            PyObject *b = PyTuple_GET_ITEM(parts, j);
            if (a != b &&
                (!PyUnicode_Check(a) || PyUnicode_Compare(a, b) != 0)) {
                break;
            }
            j++;
        }
        if (j == m) {
            return 1;
        }
    }
    return 0;
}

static int
no_path(PyObject *f)
{
    PyErr_Format(PyExc_TypeError,
                 "%s is a path filter: it needs the leaf's path, which only "
                 "tree_partition and get_partition (and what is built on "
                 "them) know; call it as f(path, leaf) to test it",
                 _PyType_Name(Py_TYPE(f)));
    return -1;
}

/* 1 if the leaf at `path` (a tuple of str, or NULL when unknown) matches,
 * 0 if not, -1 with an exception */
int
refx_filter_match_at(refx_state *st, PyObject *f, PyObject *path,
                     PyObject *leaf)
{
    if (f == Py_Ellipsis || f == Py_True) {
        return 1;
    }
    if (f == Py_False) {
        return 0;
    }
    if (PyUnicode_Check(f)) {
        PyObject *c = refx_collection_of(st, leaf);
        if (c == NULL) {
            return 0;
        }
        if (c == f) {
            return 1;
        }
        if (PyUnicode_CheckExact(c) && PyUnicode_CheckExact(f)) {
            return PyUnicode_Compare(c, f) == 0;
        }
        Py_INCREF(c);
        int r = PyObject_RichCompareBool(c, f, Py_EQ);
        Py_DECREF(c);
        return r;
    }
    if (PyType_Check(f)) {
        if (Deref_Check(st, leaf)) {
            /* a class matches what was deref'ed from Refs of its subclasses
             * (Param, or a mixin or ABC of theirs), besides Values/Indexes
             * themselves (refx.Value, refx.Deref) */
            PyTypeObject *rt = refx_deref_ref_type(st, (DerefObject *)leaf);
            int m = Py_IS_TYPE(f, &PyType_Type)
                        ? PyType_IsSubtype(rt, (PyTypeObject *)f)
                        : PyObject_IsSubclass((PyObject *)rt, f);
            if (m != 0) {
                return m;
            }
        }
        if (Py_IS_TYPE(f, &PyType_Type)) {
            /* no __instancecheck__ to honour */
            return PyObject_TypeCheck(leaf, (PyTypeObject *)f);
        }
        return PyObject_IsInstance(leaf, f);
    }
    PyTypeObject *tp = Py_TYPE(f);
    if (tp == st->PathContains_Type) {
        return path != NULL ? path_contains(path, ((FilterObject *)f)->filters)
                            : no_path(f);
    }
    if (tp == st->PathFilter_Type) {
        if (path == NULL) {
            return no_path(f);
        }
        PyObject *args[2] = {path, leaf};
        PyObject *res = PyObject_Vectorcall(
            PyTuple_GET_ITEM(((FilterObject *)f)->filters, 0), args, 2, NULL);
        if (res == NULL) {
            return -1;
        }
        int r = PyObject_IsTrue(res);
        Py_DECREF(res);
        return r;
    }
    int is_not = tp == st->Not_Type, is_all = tp == st->All_Type;
    if (PyTuple_Check(f) || is_not || is_all || tp == st->Any_Type) {
        PyObject *fs = PyTuple_Check(f) ? f : ((FilterObject *)f)->filters;
        if (Py_EnterRecursiveCall(" in a filter")) {
            return -1;
        }
        int r = is_all ? 1 : 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fs); i++) {
            int m =
                refx_filter_match_at(st, PyTuple_GET_ITEM(fs, i), path, leaf);
            if (m < 0) {
                r = -1;
                break;
            }
            if (is_all && !m) {
                r = 0;
                break;
            }
            if (!is_all && m) {
                r = 1;
                break;
            }
        }
        Py_LeaveRecursiveCall();
        if (is_not && r >= 0) {
            r = !r;
        }
        return r;
    }
    PyObject *res = PyObject_CallOneArg(f, leaf);
    if (res == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(res);
    Py_DECREF(res);
    return r;
}

int
refx_filter_match(refx_state *st, PyObject *f, PyObject *leaf)
{
    return refx_filter_match_at(st, f, NULL, leaf);
}

static PyObject *
filter_new_impl(PyTypeObject *tp, PyObject *args, PyObject *kwds,
                const char *name, int exactly_one)
{
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_Format(PyExc_TypeError, "%s() takes no keyword arguments", name);
        return NULL;
    }
    if (exactly_one && PyTuple_GET_SIZE(args) != 1) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes exactly one filter (%zd given)", name,
                     PyTuple_GET_SIZE(args));
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); i++) {
        if (refx_filter_validate(st, PyTuple_GET_ITEM(args, i), name, i) < 0) {
            return NULL;
        }
    }
    FilterObject *self = (FilterObject *)tp->tp_alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    self->filters = Py_NewRef(args);
    return (PyObject *)self;
}

static PyObject *
not_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    return filter_new_impl(tp, args, kwds, "Not", 1);
}

static PyObject *
all_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    return filter_new_impl(tp, args, kwds, "All", 0);
}

static PyObject *
any_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    return filter_new_impl(tp, args, kwds, "Any", 0);
}

static PyObject *
path_contains_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) ||
        PyTuple_GET_SIZE(args) == 0) {
        PyErr_SetString(PyExc_TypeError,
                        "PathContains(*parts) takes one or more path parts "
                        "(str), no keywords");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); i++) {
        PyObject *p = PyTuple_GET_ITEM(args, i);
        if (!PyUnicode_Check(p)) {
            PyErr_Format(PyExc_TypeError,
                         "PathContains: path parts are str (a path is a "
                         "tuple of str: '0' for index 0), got %R",
                         p);
            return NULL;
        }
    }
    FilterObject *self = (FilterObject *)tp->tp_alloc(tp, 0);
    if (self != NULL) {
        self->filters = Py_NewRef(args);
    }
    return (PyObject *)self;
}

static PyObject *
path_filter_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) ||
        PyTuple_GET_SIZE(args) != 1 ||
        !PyCallable_Check(PyTuple_GET_ITEM(args, 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "PathFilter(fn) takes one callable fn(path, leaf) -> "
                        "bool");
        return NULL;
    }
    FilterObject *self = (FilterObject *)tp->tp_alloc(tp, 0);
    if (self != NULL) {
        self->filters = Py_NewRef(args);
    }
    return (PyObject *)self;
}

/* f(leaf), or f(path, leaf) to test a path filter */
static PyObject *
filter_call(PyObject *op, PyObject *args, PyObject *kwds)
{
    FilterObject *self = FILTER_CAST(op);
    PyObject *leaf, *path = NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "a filter takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, _PyType_Name(Py_TYPE(self)), 1, 2, &leaf,
                           &path)) {
        return NULL;
    }
    if (path != NULL) { /* (path, leaf) */
        PyObject *t = leaf;
        leaf = path;
        path = t;
        if (!PyTuple_Check(path)) {
            PyErr_Format(PyExc_TypeError,
                         "%s(path, leaf): path must be a tuple of str, not "
                         "%.200s",
                         _PyType_Name(Py_TYPE(self)), Py_TYPE(path)->tp_name);
            return NULL;
        }
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    int r = refx_filter_match_at(st, (PyObject *)self, path, leaf);
    if (r < 0) {
        return NULL;
    }
    return Py_NewRef(r ? Py_True : Py_False);
}

static PyObject *
filter_repr(PyObject *op)
{
    FilterObject *self = FILTER_CAST(op);
    PyObject *inner;
    if (PyTuple_GET_SIZE(self->filters) == 1) {
        inner = PyObject_Repr(PyTuple_GET_ITEM(self->filters, 0));
    }
    else {
        inner = PyObject_Repr(self->filters);
        if (inner != NULL && PyTuple_GET_SIZE(self->filters) > 1) {
            /* drop the tuple's parentheses */
            PyObject *s =
                PyUnicode_Substring(inner, 1, PyUnicode_GET_LENGTH(inner) - 1);
            Py_SETREF(inner, s);
        }
        else if (inner != NULL) {
            Py_SETREF(inner, PyUnicode_FromString(""));
        }
    }
    if (inner == NULL) {
        return NULL;
    }
    PyObject *res =
        PyUnicode_FromFormat("%s(%U)", _PyType_Name(Py_TYPE(self)), inner);
    Py_DECREF(inner);
    return res;
}

static PyObject *
filter_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(a) != Py_TYPE(b)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    return PyObject_RichCompare(((FilterObject *)a)->filters,
                                ((FilterObject *)b)->filters, op);
}

static Py_hash_t
filter_hash(PyObject *op)
{
    FilterObject *self = FILTER_CAST(op);
    Py_hash_t h = PyObject_Hash(self->filters);
    if (h == -1) {
        return -1;
    }
    h ^= (Py_hash_t)(uintptr_t)Py_TYPE(self) >> 4;
    return h == -1 ? -2 : h;
}

static PyObject *
filter_get_filters(PyObject *op, void *Py_UNUSED(closure))
{
    FilterObject *self = FILTER_CAST(op);
    return Py_NewRef(self->filters);
}

static int
filter_traverse(PyObject *op, visitproc visit, void *arg)
{
    FilterObject *self = FILTER_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->filters);
    return 0;
}

static int
filter_clear(PyObject *op)
{
    FilterObject *self = FILTER_CAST(op);
    Py_CLEAR(self->filters);
    return 0;
}

static void
filter_dealloc(PyObject *op)
{
    FilterObject *self = FILTER_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    filter_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyGetSetDef filter_getset[] = {
    {"filters", filter_get_filters, NULL, "The combined filters.", NULL},
    {NULL},
};

#define FILTER_SPEC(cname, pyname, newfunc, doc)                              \
    static PyType_Slot cname##_slots[] = {                                    \
        {Py_tp_doc, (void *)(doc)},                                           \
        {Py_tp_new, newfunc},                                                 \
        {Py_tp_call, filter_call},                                            \
        {Py_tp_repr, filter_repr},                                            \
        {Py_tp_richcompare, filter_richcompare},                              \
        {Py_tp_hash, filter_hash},                                            \
        {Py_tp_traverse, filter_traverse},                                    \
        {Py_tp_clear, filter_clear},                                          \
        {Py_tp_dealloc, filter_dealloc},                                      \
        {Py_tp_getset, filter_getset},                                        \
        {0, NULL},                                                            \
    };                                                                        \
    static PyType_Spec cname##_spec = {                                       \
        .name = "refx." pyname,                                               \
        .basicsize = sizeof(FilterObject),                                    \
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |                    \
                 Py_TPFLAGS_IMMUTABLETYPE,                                    \
        .slots = cname##_slots,                                               \
    };

FILTER_SPEC(not, "Not", not_new,
            "Not(filter, /)\n--\n\n"
            "Filter matching the leaves `filter` does not match.")
FILTER_SPEC(all, "All", all_new,
            "All(*filters)\n--\n\n"
            "Filter matching the leaves every one of `filters` matches "
            "(All() matches everything).")
FILTER_SPEC(any, "Any", any_new,
            "Any(*filters)\n--\n\n"
            "Filter matching the leaves any of `filters` matches "
            "(Any() matches nothing).")
FILTER_SPEC(path_contains, "PathContains", path_contains_new,
            "PathContains(*parts)\n--\n\n"
            "Filter matching the leaves whose path holds `parts` as a run of\n"
            "consecutive elements: PathContains('enc') matches ('enc', 'w'),\n"
            "PathContains('blocks', '0') matches ('blocks', '0', 'linear', "
            "'w').\n"
            "Evaluated in C; usable wherever a filter is.")
FILTER_SPEC(path_filter, "PathFilter", path_filter_new,
            "PathFilter(fn, /)\n--\n\n"
            "Filter matching the leaves for which fn(path, leaf) is true;\n"
            "`path` is the leaf's path, a tuple of str.")

int
refx_init_filter_types(PyObject *module, refx_state *st)
{
    if (refx_add_type(module, &not_spec, NULL, &st->Not_Type, 1) < 0 ||
        refx_add_type(module, &all_spec, NULL, &st->All_Type, 1) < 0 ||
        refx_add_type(module, &any_spec, NULL, &st->Any_Type, 1) < 0 ||
        refx_add_type(module, &path_contains_spec, NULL,
                      &st->PathContains_Type, 1) < 0 ||
        refx_add_type(module, &path_filter_spec, NULL, &st->PathFilter_Type,
                      1) < 0) {
        return -1;
    }
    return 0;
}
