/*
 * partition.c: Partition, filters, tree_partition, get_partition and
 * merge_partitions.
 *
 * Partition.  An immutable dict subclass mapping a path (tuple of str) to a
 * leaf or NOTHING, in leaf order.  Item assignment, deletion and the
 * mutating methods raise TypeError; equality is dict equality, so a
 * Partition equals a plain dict with the same items.  As a pytree node
 * (registered by refx/_compat.py with the C functions below) its children
 * are its values other than NOTHING, and its aux data is
 * (paths, positions of NOTHING), cached in the object (it is immutable):
 * flattening one at every training step costs one list of values, no key
 * work, and NOTHING entries cost JAX nothing at all (as custom nodes they
 * cost ~0.3 us each in every jit call: 201 of them in the optimiser state
 * of a depth-100 MLP, measured).  So partitioning a Partition sees only
 * its present entries, and merging such a split rebuilds the NOTHINGs.
 *
 * Filters.  A filter decides which partition a leaf goes to.  Besides any
 * callable f(leaf) -> bool, these are evaluated in C with no Python call:
 *   "name"            Ref/Value/Index whose collection == "name"
 *   a type            isinstance(leaf, type)
 *   (f1, f2, ...)     any of them
 *   ..., True, False  everything, everything, nothing
 *   Not(f), All(*fs), Any(*fs)
 * Filters are checked when the call starts (TypeError for anything else),
 * so a bad filter never leaves a half-built result.
 *
 * Paths and their cache.  tree_partition flattens the tree with
 * Ref/Value/Index/NOTHING as leaves, then needs the path of each leaf.
 * Paths depend only on the treedef, so they are computed once per treedef
 * (with jaxlib's flatten_with_path, checking that no two leaves share a
 * path) and cached in st->path_cache: treedef -> PathInfo, a tuple
 *
 *     (paths, template, hashes)
 *
 * where `paths` is the tuple of path tuples in leaf order, `template` a
 * dict {path: NOTHING} in that order and `hashes` a bytes object with
 * each path's hash.  A partition is then made by cloning the template (a
 * memcpy in CPython's dict_merge) and overwriting the entries of the
 * leaves it holds with their precomputed hashes: one dict store per leaf,
 * no string or tuple work.  The cache holds at most PATH_CACHE_MAX
 * treedefs and is emptied when full; a treedef that cannot be hashed
 * (custom node with unhashable aux data) is simply not cached.
 *
 * merge_partitions walks the partitions in lockstep (PyDict_Next; keys
 * made by tree_partition are the same objects, so comparing is a pointer
 * test), falling back to lookups when their orders differ, takes the one
 * non-NOTHING value at each path and unflattens with the treedef.  If the
 * treedef is in the path cache, the paths must be its paths (a treedef of
 * another tree with as many leaves is an error, not a wrong tree).
 *
 * Functions in this file: the Partition type and its pytree functions,
 * the filter types and refx_filter_validate/match, path_info_for,
 * tree_partition, get_partition, merge_partitions.
 */
#include "refx.h"

#define PATH_CACHE_MAX 512

/* ------------------------------------------------------------------ */
/* Partition                                                            */
/* ------------------------------------------------------------------ */

static PyObject *
partition_alloc(refx_state *st)
{
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *p = PyDict_Type.tp_new(st->Partition_Type, empty, NULL);
    Py_DECREF(empty);
    return p;
}

static PyObject *
partition_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    PyObject *arg = NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "Partition() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Partition", 0, 1, &arg)) {
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *self = PyDict_Type.tp_new(tp, empty, NULL);
    Py_DECREF(empty);
    if (self == NULL || arg == NULL) {
        return self;
    }
    int r;
    if (PyDict_Check(arg)) {
        r = PyDict_Merge(self, arg, 1);
    }
    else {
        PyObject *keys = PyObject_GetAttrString(arg, "keys");
        if (keys != NULL) {
            Py_DECREF(keys);
            r = PyDict_Merge(self, arg, 1);
        }
        else if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            r = PyDict_MergeFromSeq2(self, arg, 1);
        }
        else {
            r = -1;
        }
    }
    if (r < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

/* __init__ is a no-op: __new__ built the contents, and re-running
 * dict.__init__ would mutate an immutable mapping. */
static int
partition_init(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    (void)args;
    (void)kwds;
    return 0;
}

static int
partition_traverse(PartitionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->paths);
    Py_VISIT(self->aux);
    return PyDict_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int
partition_clear(PartitionObject *self)
{
    Py_CLEAR(self->paths);
    Py_CLEAR(self->aux);
    return PyDict_Type.tp_clear((PyObject *)self);
}

static void
partition_dealloc(PartitionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* dict's own trashcan skips subclasses: without ours, freeing nested
     * Partitions a million deep overflowed the stack */
    Py_TRASHCAN_BEGIN(self, partition_dealloc);
    Py_CLEAR(self->paths);
    Py_CLEAR(self->aux);
    PyDict_Type.tp_dealloc((PyObject *)self); /* frees via tp->tp_free */
    Py_DECREF(tp);
    Py_TRASHCAN_END;
}

static int
partition_readonly(void)
{
    PyErr_SetString(PyExc_TypeError,
                    "Partition is immutable; build a new one with "
                    "Partition({...}) or dict(partition)");
    return -1;
}

static int
partition_ass_subscript(PyObject *self, PyObject *key, PyObject *value)
{
    (void)self;
    (void)key;
    (void)value;
    return partition_readonly();
}

static PyObject *
partition_mutator(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    (void)args;
    (void)kwds;
    partition_readonly();
    return NULL;
}

static PyObject *
partition_ior(PyObject *self, PyObject *other)
{
    (void)self;
    (void)other;
    partition_readonly();
    return NULL;
}

static PyObject *
partition_repr(PyObject *self)
{
    PyObject *inner = PyDict_Type.tp_repr(self);
    if (inner == NULL) {
        return NULL;
    }
    PyObject *res = PyUnicode_FromFormat("Partition(%U)", inner);
    Py_DECREF(inner);
    return res;
}

static PyObject *
partition_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_Copy(self);
    if (d == NULL) {
        return NULL;
    }
    PyObject *res = Py_BuildValue("O(N)", Py_TYPE(self), d);
    return res;
}

#define MUTATOR(name)                                                         \
    {name, (PyCFunction)(void (*)(void))partition_mutator,                    \
     METH_VARARGS | METH_KEYWORDS,                                            \
     "Raises TypeError: Partition is immutable."}

static PyMethodDef partition_methods[] = {
    MUTATOR("update"),
    MUTATOR("clear"),
    MUTATOR("pop"),
    MUTATOR("popitem"),
    MUTATOR("setdefault"),
    {"__reduce__", (PyCFunction)partition_reduce, METH_NOARGS, NULL},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

static PyGetSetDef partition_getset[] = {
    REFX_TREESCOPE_GETSET,
    {NULL},
};

PyDoc_STRVAR(
    partition_doc,
    "Partition(mapping=(), /)\n"
    "--\n\n"
    "An immutable dict from paths (tuples of str) to leaves or NOTHING, in\n"
    "leaf order, as returned by tree_partition and get_partition.\n\n"
    "A registered pytree node: jax.grad, tree_map and optax see its values;\n"
    "NOTHING entries contribute no leaves.  Equal to a plain dict with the\n"
    "same items.");

static PyType_Slot partition_slots[] = {
    {Py_tp_doc, (void *)partition_doc},
    {Py_tp_new, partition_new},
    {Py_tp_init, partition_init},
    {Py_tp_dealloc, partition_dealloc},
    {Py_tp_traverse, partition_traverse},
    {Py_tp_clear, partition_clear},
    {Py_tp_repr, partition_repr},
    {Py_tp_methods, partition_methods},
    {Py_tp_getset, partition_getset},
    {Py_mp_ass_subscript, partition_ass_subscript},
    {Py_nb_inplace_or, partition_ior},
    {0, NULL},
};

static PyType_Spec partition_spec = {
    .name = "refx.Partition",
    .basicsize = sizeof(PartitionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = partition_slots,
};

/* the keys of p in order, as a tuple (cached while it is still valid) */
static PyObject *
partition_paths(PartitionObject *p)
{
    if (p->paths != NULL &&
        PyTuple_GET_SIZE(p->paths) == PyDict_GET_SIZE((PyObject *)p)) {
        return Py_NewRef(p->paths);
    }
    PyObject *keys = PyDict_Keys((PyObject *)p);
    if (keys == NULL) {
        return NULL;
    }
    PyObject *t = PyList_AsTuple(keys);
    Py_DECREF(keys);
    if (t != NULL) {
        Py_XSETREF(p->paths, Py_NewRef(t));
        Py_CLEAR(p->aux); /* built from the old paths */
    }
    return t;
}

/* (children, aux): the values other than NOTHING, and the cached
 * (paths, positions of NOTHING). */
static PyObject *
partition_flatten(PyObject *module, PyObject *p)
{
    refx_state *st = refx_get_state(module);
    if (!Partition_Check(st, p)) {
        PyErr_SetString(PyExc_TypeError,
                        "_partition_flatten expects a Partition");
        return NULL;
    }
    PartitionObject *part = (PartitionObject *)p;
    PyObject *paths = NULL, *children = NULL, *holes = NULL, *res = NULL;
    PyObject *cached = NULL; /* the cached positions of NOTHING */
    /* The cached paths and aux are checked against the dict as it is walked
     * (a pointer test per key, one per NOTHING): dict.__setitem__(p, ...)
     * and friends bypass immutability, and a stale aux let
     * _partition_flatten_with_keys read past the children (a crash). */
    for (int attempt = 0;; attempt++) {
        paths = partition_paths(part);
        if (paths == NULL) {
            return NULL;
        }
        int need_aux =
            part->aux == NULL || PyTuple_GET_ITEM(part->aux, 0) != paths;
        cached = need_aux ? NULL : Py_NewRef(PyTuple_GET_ITEM(part->aux, 1));
        Py_ssize_t n = PyTuple_GET_SIZE(paths), h = 0;
        children = PyList_New(0);
        if (children == NULL ||
            (need_aux && (holes = PyList_New(0)) == NULL)) {
            goto error;
        }
        Py_ssize_t pos = 0, i = 0;
        PyObject *k, *v;
        int stale = 0;
        while (!stale && PyDict_Next(p, &pos, &k, &v)) {
            if (i >= n || k != PyTuple_GET_ITEM(paths, i)) {
                stale = 1;
            }
            else if (v != st->nothing) {
                if (PyList_Append(children, v) < 0) {
                    goto error;
                }
            }
            else if (need_aux) {
                PyObject *idx = PyLong_FromSsize_t(i);
                if (idx == NULL || PyList_Append(holes, idx) < 0) {
                    Py_XDECREF(idx);
                    goto error;
                }
                Py_DECREF(idx);
            }
            else if (h < PyTuple_GET_SIZE(cached) &&
                     PyLong_AsSsize_t(PyTuple_GET_ITEM(cached, h)) == i) {
                h++;
            }
            else {
                stale = 1;
            }
            i++;
        }
        if (PyErr_Occurred()) {
            goto error;
        }
        if (!stale && (i != n || (cached && h != PyTuple_GET_SIZE(cached)))) {
            stale = 1;
        }
        if (!stale) {
            break;
        }
        if (attempt > 0) {
            /* the walk runs no Python code: the dict cannot change */
            REFX_BUG("Partition changed while it was flattened");
            goto error;
        }
        /* forget the caches and walk again */
        Py_CLEAR(part->paths);
        Py_CLEAR(part->aux);
        Py_CLEAR(paths);
        Py_CLEAR(children);
        Py_CLEAR(holes);
        Py_CLEAR(cached);
    }
    if (holes != NULL) {
        PyObject *ht = PyList_AsTuple(holes);
        if (ht == NULL) {
            goto error;
        }
        Py_XSETREF(part->aux, PyTuple_Pack(2, paths, ht));
        Py_DECREF(ht);
        if (part->aux == NULL) {
            goto error;
        }
    }
    res = PyTuple_Pack(2, children, part->aux);
error:
    Py_XDECREF(cached);
    Py_XDECREF(holes);
    Py_XDECREF(children);
    Py_XDECREF(paths);
    return res;
}

static PyObject *
partition_flatten_with_keys(PyObject *module, PyObject *p)
{
    refx_state *st = refx_get_state(module);
    PyObject *flat = NULL, *pairs = NULL, *res = NULL;
    if (refx_require_jax(st, "Partition") < 0) {
        return NULL;
    }
    flat = partition_flatten(module, p);
    if (flat == NULL) {
        return NULL;
    }
    PyObject *values = PyTuple_GET_ITEM(flat, 0);
    PyObject *aux = PyTuple_GET_ITEM(flat, 1);
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    PyObject *holes = PyTuple_GET_ITEM(aux, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(paths), nh = PyTuple_GET_SIZE(holes);
    pairs = PyList_New(0);
    if (pairs == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0, h = 0, c = 0; i < n; i++) {
        if (h < nh && PyLong_AsSsize_t(PyTuple_GET_ITEM(holes, h)) == i) {
            h++;
            continue;
        }
        if (c >= PyList_GET_SIZE(values)) {
            REFX_BUG("Partition aux data has too few positions of NOTHING");
            goto error;
        }
        PyObject *k =
            PyObject_CallOneArg(st->dict_key, PyTuple_GET_ITEM(paths, i));
        if (k == NULL) {
            goto error;
        }
        PyObject *pair = PyTuple_Pack(2, k, PyList_GET_ITEM(values, c++));
        Py_DECREF(k);
        if (pair == NULL || PyList_Append(pairs, pair) < 0) {
            Py_XDECREF(pair);
            goto error;
        }
        Py_DECREF(pair);
    }
    res = PyTuple_Pack(2, pairs, aux);
error:
    Py_XDECREF(pairs);
    Py_XDECREF(flat);
    return res;
}

static PyObject *
partition_unflatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *children = NULL, *p = NULL;
    PyObject *aux = nargs == 2 ? args[0] : NULL;
    if (aux == NULL || !PyTuple_Check(aux) || PyTuple_GET_SIZE(aux) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(aux, 0)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(aux, 1))) {
        PyErr_SetString(PyExc_TypeError,
                        "_partition_unflatten(aux, children): aux must be "
                        "(paths, positions of NOTHING)");
        return NULL;
    }
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    PyObject *holes = PyTuple_GET_ITEM(aux, 1);
    children = PySequence_Fast(args[1], "children must be a sequence");
    if (children == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(paths), nh = PyTuple_GET_SIZE(holes);
    if (PySequence_Fast_GET_SIZE(children) != n - nh) {
        PyErr_Format(PyExc_ValueError,
                     "Partition: %zd paths, %zd of them NOTHING, but %zd "
                     "children",
                     n, nh, PySequence_Fast_GET_SIZE(children));
        goto error;
    }
    p = partition_alloc(st);
    if (p == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0, h = 0, c = 0; i < n; i++) {
        PyObject *v;
        if (h < nh) {
            Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(holes, h));
            if (at == -1 && PyErr_Occurred()) {
                Py_CLEAR(p);
                goto error;
            }
            if (at == i) {
                h++;
                v = st->nothing;
            }
            else {
                v = c < n - nh ? PySequence_Fast_GET_ITEM(children, c++)
                               : NULL;
            }
        }
        else {
            v = PySequence_Fast_GET_ITEM(children, c++);
        }
        if (v == NULL) {
            PyErr_SetString(PyExc_ValueError,
                            "Partition: positions of NOTHING out of order");
            Py_CLEAR(p);
            goto error;
        }
        if (PyDict_SetItem(p, PyTuple_GET_ITEM(paths, i), v) < 0) {
            Py_CLEAR(p);
            goto error;
        }
    }
    if (PyDict_GET_SIZE(p) == n) {
        ((PartitionObject *)p)->paths = Py_NewRef(paths);
        ((PartitionObject *)p)->aux = Py_NewRef(aux);
    }
error:
    Py_XDECREF(children);
    return p;
}

/* ------------------------------------------------------------------ */
/* filters                                                              */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD PyObject *filters; /* tuple; one item for Not */
} FilterObject;

static const char filter_kinds[] =
    "a callable, a collection name (str), a type, a tuple of filters, "
    "Not/All/Any, ..., True or False";

int
refx_filter_validate(refx_state *st, PyObject *f, const char *fname,
                     Py_ssize_t pos)
{
    if (f == Py_Ellipsis || f == Py_True || f == Py_False ||
        PyUnicode_Check(f) || PyType_Check(f)) {
        return 0;
    }
    PyTypeObject *tp = Py_TYPE(f);
    if (tp == st->Not_Type || tp == st->All_Type || tp == st->Any_Type) {
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

/* 1 if leaf matches, 0 if not, -1 with an exception */
int
refx_filter_match(refx_state *st, PyObject *f, PyObject *leaf)
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
        if (Py_IS_TYPE(f, &PyType_Type)) {
            /* no __instancecheck__ to honour */
            return PyObject_TypeCheck(leaf, (PyTypeObject *)f);
        }
        return PyObject_IsInstance(leaf, f);
    }
    PyTypeObject *tp = Py_TYPE(f);
    int is_not = tp == st->Not_Type, is_all = tp == st->All_Type;
    if (PyTuple_Check(f) || is_not || is_all || tp == st->Any_Type) {
        PyObject *fs = PyTuple_Check(f) ? f : ((FilterObject *)f)->filters;
        if (Py_EnterRecursiveCall(" in a filter")) {
            return -1;
        }
        int r = is_all ? 1 : 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fs); i++) {
            int m = refx_filter_match(st, PyTuple_GET_ITEM(fs, i), leaf);
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
filter_call(FilterObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *leaf;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "a filter takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, _PyType_Name(Py_TYPE(self)), 1, 1, &leaf)) {
        return NULL;
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    int r = refx_filter_match(st, (PyObject *)self, leaf);
    if (r < 0) {
        return NULL;
    }
    return Py_NewRef(r ? Py_True : Py_False);
}

static PyObject *
filter_repr(FilterObject *self)
{
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
filter_hash(FilterObject *self)
{
    Py_hash_t h = PyObject_Hash(self->filters);
    if (h == -1) {
        return -1;
    }
    h ^= (Py_hash_t)(uintptr_t)Py_TYPE(self) >> 4;
    return h == -1 ? -2 : h;
}

static PyObject *
filter_get_filters(FilterObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->filters);
}

static int
filter_traverse(FilterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->filters);
    return 0;
}

static int
filter_clear(FilterObject *self)
{
    Py_CLEAR(self->filters);
    return 0;
}

static void
filter_dealloc(FilterObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    filter_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyGetSetDef filter_getset[] = {
    {"filters", (getter)filter_get_filters, NULL, "The combined filters.",
     NULL},
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

/* ------------------------------------------------------------------ */
/* paths of a treedef                                                   */
/* ------------------------------------------------------------------ */

/* PathInfo (paths, template, hashes) for this tree; see the essay. */
static PyObject *
path_info_for(refx_state *st, const char *fname, PyObject *tree,
              PyObject *pred, PyObject *treedef, Py_ssize_t n)
{
    PyObject *info = NULL, *res = NULL, *paths = NULL, *template = NULL;
    PyObject *hashes = NULL, *seen = NULL;
    int cacheable = 1;

    info = PyDict_GetItemWithError(st->path_cache, treedef);
    if (info != NULL) {
        return Py_NewRef(info);
    }
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            return NULL;
        }
        PyErr_Clear(); /* unhashable aux data: work without the cache */
        cacheable = 0;
    }

    PyObject *args[2] = {tree, pred};
    res = refx_call_jax(st->flatten_with_path, args, 2);
    if (res == NULL) {
        goto error;
    }
    PyObject *pairs = PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2
                          ? PyTuple_GET_ITEM(res, 0)
                          : NULL;
    if (pairs == NULL || !PyList_Check(pairs) || PyList_GET_SIZE(pairs) != n) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the tree changed while it was being partitioned "
                     "(a custom node flattened differently twice)",
                     fname);
        goto error;
    }
    paths = PyTuple_New(n);
    template = PyDict_New();
    hashes =
        PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Py_hash_t));
    seen = PyDict_New();
    if (paths == NULL || template == NULL || hashes == NULL || seen == NULL) {
        goto error;
    }
    Py_hash_t *hs = (Py_hash_t *)PyBytes_AS_STRING(hashes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            REFX_BUG("flatten_with_path returned a bad pair");
            goto error;
        }
        PyObject *path = refx_path_from_keypath(st, PyTuple_GET_ITEM(pair, 0));
        if (path == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(paths, i, path);
        Py_hash_t h = PyObject_Hash(path);
        if (h == -1) {
            goto error;
        }
        hs[i] = h;
        PyObject *pos = PyLong_FromSsize_t(i);
        if (pos == NULL) {
            goto error;
        }
        PyObject *prev = PyDict_SetDefault(seen, path, pos);
        Py_DECREF(pos);
        if (prev == NULL) {
            goto error;
        }
        if (prev != pos) {
            PyErr_Format(PyExc_ValueError,
                         "%s: leaves %S and %zd both map to path %R; paths "
                         "must be unique (do two keys of a node have the "
                         "same str()?)",
                         fname, prev, i, path);
            goto error;
        }
        if (PyDict_SetItem(template, path, st->nothing) < 0) {
            goto error;
        }
    }
    info = PyTuple_Pack(3, paths, template, hashes);
    if (info == NULL) {
        goto error;
    }
    if (cacheable) {
        if (PyDict_GET_SIZE(st->path_cache) >= PATH_CACHE_MAX) {
            PyDict_Clear(st->path_cache);
        }
        if (PyDict_SetItem(st->path_cache, treedef, info) < 0) {
            Py_CLEAR(info);
        }
    }
error:
    Py_XDECREF(res);
    Py_XDECREF(paths);
    Py_XDECREF(template);
    Py_XDECREF(hashes);
    Py_XDECREF(seen);
    return info;
}

/* A new, empty Partition filled from the template: all paths -> NOTHING. */
static PyObject *
partition_from_template(refx_state *st, PyObject *info)
{
    PyObject *p = partition_alloc(st);
    if (p == NULL) {
        return NULL;
    }
    if (PyDict_Update(p, PyTuple_GET_ITEM(info, 1)) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    ((PartitionObject *)p)->paths = Py_NewRef(PyTuple_GET_ITEM(info, 0));
    return p;
}

/* ------------------------------------------------------------------ */
/* tree_partition / get_partition                                       */
/* ------------------------------------------------------------------ */

/* Flatten for partitioning: Ref/Value/Index/NOTHING (and whatever is_leaf
 * accepts) are leaves.  *pred receives the predicate that describes the
 * result, for path computation. */
static PyObject *
partition_leaves(refx_state *st, PyObject *tree, PyObject *is_leaf,
                 PyObject **treedef, PyObject **pred)
{
    PyObject *leaves;
    *pred = refx_make_pred(st, is_leaf);
    if (*pred == NULL) {
        return NULL;
    }
    if (*pred != st->pred_refx || st->partition_hint) {
        leaves = refx_flatten(st, tree, *pred, treedef);
        if (leaves != NULL && *pred == st->pred_refx) {
            /* keep the hint only while trees do hold such nodes */
            int any = 0;
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(leaves) && !any; i++) {
                PyObject *x = PyList_GET_ITEM(leaves, i);
                any = x == st->nothing || Deref_Check(st, x);
            }
            st->partition_hint = any;
        }
        return leaves;
    }
    uint64_t d = st->deref_nodes_seen, z = st->nothing_nodes_seen;
    leaves = refx_flatten(st, tree, NULL, treedef);
    if (leaves == NULL ||
        (st->deref_nodes_seen == d && st->nothing_nodes_seen == z)) {
        return leaves;
    }
    Py_DECREF(leaves);
    Py_CLEAR(*treedef);
    st->partition_hint = 1;
    return refx_flatten(st, tree, *pred, treedef);
}

/* Shared body: nparts = nfilters + 1 partitions, or only the first when
 * `first_only`.  Returns a tuple of Partitions; *treedef_out set. */
static PyObject *
partition_impl(refx_state *st, const char *fname, PyObject *tree,
               PyObject *const *filters, Py_ssize_t nfilters,
               PyObject *is_leaf, int first_only, PyObject **treedef_out)
{
    PyObject *leaves = NULL, *treedef = NULL, *pred = NULL, *info = NULL;
    PyObject *parts = NULL, *res = NULL;
    if (refx_require_jax(st, fname) < 0) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nfilters; k++) {
        if (refx_filter_validate(st, filters[k], fname, k) < 0) {
            return NULL;
        }
    }
    leaves = partition_leaves(st, tree, is_leaf, &treedef, &pred);
    if (leaves == NULL) {
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    info = path_info_for(st, fname, tree, pred, treedef, n);
    if (info == NULL) {
        goto error;
    }
    PyObject *paths = PyTuple_GET_ITEM(info, 0);
    const Py_hash_t *hs =
        (const Py_hash_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(info, 2));
    Py_ssize_t nparts = first_only ? 1 : nfilters + 1;
    parts = PyTuple_New(nparts);
    if (parts == NULL) {
        goto error;
    }
    for (Py_ssize_t k = 0; k < nparts; k++) {
        PyObject *p = partition_from_template(st, info);
        if (p == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(parts, k, p);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        Py_ssize_t k = 0;
        for (; k < nfilters; k++) {
            int m = refx_filter_match(st, filters[k], leaf);
            if (m < 0) {
                goto error;
            }
            if (m) {
                break;
            }
        }
        if (k >= nparts) {
            continue; /* get_partition: not in the first */
        }
        if (refx_dict_setitem_known_hash(PyTuple_GET_ITEM(parts, k),
                                         PyTuple_GET_ITEM(paths, i), leaf,
                                         hs[i]) < 0) {
            goto error;
        }
    }
    res = Py_NewRef(parts);
    *treedef_out = Py_NewRef(treedef);
error:
    Py_XDECREF(parts);
    Py_XDECREF(info);
    Py_XDECREF(pred);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

static int
parse_is_leaf(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *fname, PyObject **is_leaf)
{
    *is_leaf = NULL;
    if (kwnames == NULL) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_Check(name) &&
            PyUnicode_CompareWithASCIIString(name, "is_leaf") == 0) {
            *is_leaf = args[nargs + i];
        }
        else {
            PyErr_Format(PyExc_TypeError,
                         "%s() got an unexpected keyword argument %R", fname,
                         name);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(
    tree_partition_doc,
    "tree_partition($module, tree, /, *filters, is_leaf=None)\n"
    "--\n\n"
    "Split the leaves of `tree` by filters into len(filters) + 1 "
    "Partitions.\n\n"
    "Returns ((partition_0, ..., rest), treedef).  Each Partition maps every\n"
    "path (tuple of str) of the tree, in leaf order, to the leaf if it "
    "belongs\n"
    "there and to NOTHING otherwise.  A leaf goes to the first filter that\n"
    "accepts it, else to the last partition.  Ref, Value, Index and NOTHING\n"
    "are always leaves; `is_leaf` may declare more.  A filter is a callable\n"
    "f(leaf) -> bool, a collection name (str), a type, a tuple of filters\n"
    "(any), Not/All/Any, ..., True or False.  merge_partitions(partitions,\n"
    "treedef) rebuilds the tree.");

static PyObject *
refx_tree_partition(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    refx_state *st = refx_get_state(module);
    PyObject *is_leaf, *treedef = NULL;
    Py_ssize_t npos = PyVectorcall_NARGS(nargs);
    if (parse_is_leaf(args, npos, kwnames, "tree_partition", &is_leaf) < 0) {
        return NULL;
    }
    if (npos < 1) {
        PyErr_SetString(PyExc_TypeError,
                        "tree_partition() missing required argument 'tree'");
        return NULL;
    }
    PyObject *parts = partition_impl(st, "tree_partition", args[0], args + 1,
                                     npos - 1, is_leaf, 0, &treedef);
    if (parts == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NN)", parts, treedef);
}

PyDoc_STRVAR(
    get_partition_doc,
    "get_partition($module, tree, filter, /, *, is_leaf=None)\n"
    "--\n\n"
    "The first partition of tree_partition(tree, filter): a Partition "
    "mapping\n"
    "every path to its leaf where `filter` accepts it, else to NOTHING.");

static PyObject *
refx_get_partition(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    refx_state *st = refx_get_state(module);
    PyObject *is_leaf, *treedef = NULL;
    Py_ssize_t npos = PyVectorcall_NARGS(nargs);
    if (parse_is_leaf(args, npos, kwnames, "get_partition", &is_leaf) < 0) {
        return NULL;
    }
    if (npos != 2) {
        PyErr_Format(PyExc_TypeError,
                     "get_partition() takes 2 positional arguments (tree, "
                     "filter) but %zd were given",
                     npos);
        return NULL;
    }
    PyObject *parts = partition_impl(st, "get_partition", args[0], args + 1, 1,
                                     is_leaf, 1, &treedef);
    if (parts == NULL) {
        return NULL;
    }
    Py_DECREF(treedef);
    PyObject *p = Py_NewRef(PyTuple_GET_ITEM(parts, 0));
    Py_DECREF(parts);
    return p;
}

/* ------------------------------------------------------------------ */
/* merge_partitions                                                     */
/* ------------------------------------------------------------------ */

static int
keys_equal(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    Py_INCREF(a);
    Py_INCREF(b);
    int r = PyObject_RichCompareBool(a, b, Py_EQ);
    Py_DECREF(a);
    Py_DECREF(b);
    return r;
}

/* A path of `a` that `b` lacks (borrowed), or NULL (maybe with error). */
static PyObject *
missing_path(PyObject *a, PyObject *b)
{
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(a, &pos, &k, &v)) {
        int r = PyDict_Contains(b, k);
        if (r < 0) {
            return NULL;
        }
        if (!r) {
            return k;
        }
    }
    return NULL;
}

PyDoc_STRVAR(
    merge_partitions_doc,
    "merge_partitions($module, partitions, treedef, /)\n"
    "--\n\n"
    "Rebuild a tree from the partitions and treedef of tree_partition.\n\n"
    "The partitions must have the same paths, and at each path exactly one\n"
    "of them must hold a value other than NOTHING; that value becomes the\n"
    "leaf.  Partitions may be any dicts (e.g. transformed by jax.tree_map).");

static PyObject *
refx_merge_partitions(PyObject *module, PyObject *const *args,
                      Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *seq = NULL, *leaves = NULL, *res = NULL, *num = NULL;
    PyObject *info = NULL;
    Py_ssize_t *pos = NULL;
    char *lockstep = NULL;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "merge_partitions() takes 2 arguments (partitions, "
                     "treedef) but %zd were given",
                     nargs);
        return NULL;
    }
    if (refx_require_jax(st, "merge_partitions") < 0) {
        return NULL;
    }
    PyObject *partitions = args[0], *treedef = args[1];
    if (PyDict_Check(partitions) || !PySequence_Check(partitions)) {
        PyErr_Format(PyExc_TypeError,
                     "merge_partitions: partitions must be a tuple or list "
                     "of dicts, not %.200s",
                     Py_TYPE(partitions)->tp_name);
        return NULL;
    }
    int ok = PyObject_IsInstance(treedef, st->treedef_type);
    if (ok <= 0) {
        if (ok == 0) {
            PyErr_Format(PyExc_TypeError,
                         "merge_partitions: treedef must be a PyTreeDef (as "
                         "returned by tree_partition), not %.200s",
                         Py_TYPE(treedef)->tp_name);
        }
        return NULL;
    }
    /* A tuple of our own, never the caller's list: comparing keys runs
     * Python code, which could empty the list and free the dicts. */
    seq = PySequence_Tuple(partitions);
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t np = PyTuple_GET_SIZE(seq);
    PyObject **parts = &PyTuple_GET_ITEM(seq, 0);
    if (np == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "merge_partitions: no partitions given");
        goto error;
    }
    for (Py_ssize_t k = 0; k < np; k++) {
        if (!PyDict_Check(parts[k])) {
            PyErr_Format(PyExc_TypeError,
                         "merge_partitions: partition %zd is a %.200s; "
                         "expected a dict (Partition)",
                         k, Py_TYPE(parts[k])->tp_name);
            goto error;
        }
    }
    Py_ssize_t n = PyDict_GET_SIZE(parts[0]);
    for (Py_ssize_t k = 1; k < np; k++) {
        if (PyDict_GET_SIZE(parts[k]) != n) {
            int more = PyDict_GET_SIZE(parts[k]) > n;
            PyObject *p = more ? missing_path(parts[k], parts[0])
                               : missing_path(parts[0], parts[k]);
            if (p == NULL && PyErr_Occurred()) {
                goto error;
            }
            PyErr_Format(PyExc_ValueError,
                         "merge_partitions: partition %zd has %zd paths but "
                         "partition 0 has %zd; path %R is only in partition "
                         "%zd",
                         k, PyDict_GET_SIZE(parts[k]), n,
                         p != NULL ? p : Py_None, more ? k : (Py_ssize_t)0);
            goto error;
        }
    }
    num = PyObject_GetAttr(treedef, st->str_num_leaves);
    if (num == NULL) {
        goto error;
    }
    Py_ssize_t nleaves = PyLong_AsSsize_t(num);
    if (nleaves == -1 && PyErr_Occurred()) {
        goto error;
    }
    if (nleaves != n) {
        PyErr_Format(PyExc_ValueError,
                     "merge_partitions: treedef has %zd leaves but the "
                     "partitions have %zd paths (is the treedef from another "
                     "tree?)",
                     nleaves, n);
        goto error;
    }
    /* A treedef that tree_partition made in this process is in the path
     * cache: then the partitions' paths must be its paths, which catches a
     * treedef of another tree with as many leaves.  (Paths made by
     * tree_partition are the cached objects: a pointer test per path.) */
    info = PyDict_GetItemWithError(st->path_cache, treedef);
    if (info == NULL && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            goto error;
        }
        PyErr_Clear(); /* unhashable aux data: nothing cached */
    }
    Py_XINCREF(info);
    PyObject *tdpaths = info != NULL ? PyTuple_GET_ITEM(info, 0) : NULL;
    leaves = PyList_New(n);
    pos = PyMem_Calloc((size_t)np, sizeof(Py_ssize_t));
    lockstep = PyMem_Malloc((size_t)np);
    if (leaves == NULL || pos == NULL || lockstep == NULL) {
        if (leaves != NULL) {
            PyErr_NoMemory();
        }
        goto error;
    }
    memset(lockstep, 1, (size_t)np);
    for (Py_ssize_t i = 0; i < n; i++) {
        /* the path of leaf i: the treedef's when known (then every
         * partition, the first included, is read by path), else the i-th
         * path of partition 0 */
        PyObject *path, *v0 = NULL, *found = NULL;
        Py_ssize_t found_k = -1;
        if (tdpaths != NULL) {
            path = Py_NewRef(PyTuple_GET_ITEM(tdpaths, i));
        }
        else {
            PyObject *k0;
            if (!PyDict_Next(parts[0], &pos[0], &k0, &v0)) {
                PyErr_SetString(PyExc_RuntimeError,
                                "merge_partitions: partition 0 changed size "
                                "during the call");
                goto error;
            }
            path = Py_NewRef(k0);
            v0 = Py_NewRef(v0);
        }
        for (Py_ssize_t k = 0; k < np; k++) {
            /* v is owned: comparing keys may run Python code that mutates
             * the partition and frees a borrowed value */
            PyObject *v = NULL;
            if (v0 != NULL && k == 0) {
                v = v0;
                v0 = NULL;
            }
            else {
                PyObject *key, *bv;
                if (lockstep[k] && PyDict_Next(parts[k], &pos[k], &key, &bv)) {
                    Py_INCREF(bv);
                    int eq = keys_equal(key, path);
                    if (eq < 0) {
                        Py_DECREF(bv);
                        goto fail_path;
                    }
                    if (eq) {
                        v = bv;
                    }
                    else {
                        Py_DECREF(bv);
                        lockstep[k] = 0; /* orders differ: look paths up */
                    }
                }
                if (v == NULL) {
                    v = Py_XNewRef(PyDict_GetItemWithError(parts[k], path));
                    if (v == NULL) {
                        if (PyErr_Occurred()) {
                            goto fail_path;
                        }
                        if (tdpaths != NULL) {
                            PyErr_Format(PyExc_ValueError,
                                         "merge_partitions: path %R of the "
                                         "treedef is not in partition %zd "
                                         "(are the treedef and the "
                                         "partitions from different trees?)",
                                         path, k);
                        }
                        else {
                            PyErr_Format(PyExc_ValueError,
                                         "merge_partitions: path %R is in "
                                         "partition 0 but not in partition "
                                         "%zd; partitions must have the same "
                                         "paths",
                                         path, k);
                        }
                        goto fail_path;
                    }
                }
            }
            if (v == st->nothing) {
                Py_DECREF(v);
                continue;
            }
            if (found != NULL) {
                PyErr_Format(PyExc_ValueError,
                             "merge_partitions: two values at path %R "
                             "(partitions %zd and %zd); each path must have "
                             "exactly one non-NOTHING value",
                             path, found_k, k);
                Py_DECREF(v);
                goto fail_path;
            }
            found = v;
            found_k = k;
        }
        if (found == NULL) {
            PyErr_Format(PyExc_ValueError,
                         "merge_partitions: no value at path %R (NOTHING in "
                         "all %zd partitions); each path must have exactly "
                         "one non-NOTHING value",
                         path, np);
            goto fail_path;
        }
        Py_DECREF(path);
        PyList_SET_ITEM(leaves, i, found);
        continue;
    fail_path:
        Py_XDECREF(found);
        Py_XDECREF(v0);
        Py_DECREF(path);
        goto error;
    }
    res = refx_unflatten(st, treedef, leaves);
error:
    Py_XDECREF(info);
    PyMem_Free(pos);
    PyMem_Free(lockstep);
    Py_XDECREF(num);
    Py_XDECREF(leaves);
    Py_XDECREF(seq);
    return res;
}

PyMethodDef refx_partition_functions[] = {
    {"tree_partition", (PyCFunction)(void (*)(void))refx_tree_partition,
     METH_FASTCALL | METH_KEYWORDS, tree_partition_doc},
    {"get_partition", (PyCFunction)(void (*)(void))refx_get_partition,
     METH_FASTCALL | METH_KEYWORDS, get_partition_doc},
    {"merge_partitions", (PyCFunction)(void (*)(void))refx_merge_partitions,
     METH_FASTCALL, merge_partitions_doc},
    {"_partition_flatten", (PyCFunction)partition_flatten, METH_O,
     "_partition_flatten($module, partition, /)\n--\n\n"
     "pytree flatten of Partition."},
    {"_partition_flatten_with_keys", (PyCFunction)partition_flatten_with_keys,
     METH_O,
     "_partition_flatten_with_keys($module, partition, /)\n--\n\n"
     "pytree flatten of Partition, with DictKey(path) keys."},
    {"_partition_unflatten", (PyCFunction)(void (*)(void))partition_unflatten,
     METH_FASTCALL,
     "_partition_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of Partition."},
    {NULL, NULL, 0, NULL},
};

int
refx_init_partition_types(PyObject *module, refx_state *st)
{
    struct {
        PyType_Spec *spec;
        PyObject *base;
        PyTypeObject **out;
    } types[] = {
        {&partition_spec, (PyObject *)&PyDict_Type, &st->Partition_Type},
        {&not_spec, NULL, &st->Not_Type},
        {&all_spec, NULL, &st->All_Type},
        {&any_spec, NULL, &st->Any_Type},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        PyObject *tp =
            PyType_FromModuleAndSpec(module, types[i].spec, types[i].base);
        if (tp == NULL) {
            return -1;
        }
        *types[i].out = (PyTypeObject *)tp;
        if (PyModule_AddType(module, (PyTypeObject *)tp) < 0) {
            return -1;
        }
    }
    return 0;
}
