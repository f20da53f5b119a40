/*
 * module.c: refx._core's module state, its link to JAX, and the helpers
 * every algorithm shares.
 *
 * Link to JAX.  The C core never imports jax.  refx/_compat.py, the one
 * place that knows JAX's versions, calls `_install_jax(...)` once at
 * import with:
 *
 *   flatten            registry.flatten(tree, leaf_predicate) -> (leaves, treedef)
 *   flatten_with_path  registry.flatten_with_path(tree, pred) -> ([(keypath, leaf)], treedef)
 *   treedef_type       PyTreeDef, to check merge_partitions' argument
 *   *_key              the four key-path entry types
 *   trace_state        an object whose `.value` is a weakref to the current
 *                      JAX trace (JAX keeps one such weakref per trace)
 *   check_value        check_value(value, trace_weakref): raises ValueError
 *                      if value holds a tracer that the Ref's trace may not
 *                      hold; only called for values not of `plain_types`
 *   plain_types        types whose instances never hold tracers
 *
 * Tree traversal is JAX's own C++ code: every algorithm is
 * "flatten, work on the flat list of leaves in C, unflatten".  That makes
 * refx agree with JAX on every node type (dicts with sorted keys,
 * namedtuples, dataclasses, None, custom nodes) and bounds its cost by
 * jax.tree_util's own.  Leaf predicates are C builtins (a Python lambda
 * would triple their cost).
 *
 * Paths.  Partitions are keyed by paths: tuples of str, one per level,
 * derived from JAX key paths (sequence index -> str(i), dict key ->
 * str(key), attribute -> name, flattened index -> str(i)).  A dict key
 * that is itself a tuple of str (a Partition's key) is spliced in, so
 * partitioning a Partition yields the paths it already has.
 *
 * Error paths.  Hot loops only know a leaf's position.  When they fail,
 * refx_leaf_path_repr() flattens the tree again, with key paths, to name
 * the offending path; the error path may be slow, the hot path may not.
 *
 * Functions in this file: module state (traverse/clear/free), the JAX
 * hooks, refx_flatten/unflatten, path helpers, leaf predicates, the
 * pointer map, module exec.
 */
#include "refx.h"
#include <structmember.h>

/* ------------------------------------------------------------------ */
/* pointer map                                                          */
/* ------------------------------------------------------------------ */

void
refx_ptrmap_init(refx_ptrmap *m)
{
    m->entries = m->inline_entries;
    m->mask = REFX_PTRMAP_INLINE - 1;
    m->used = 0;
    memset(m->inline_entries, 0, sizeof(m->inline_entries));
}

void
refx_ptrmap_fini(refx_ptrmap *m)
{
    if (m->entries != m->inline_entries) {
        PyMem_Free(m->entries);
    }
    m->entries = m->inline_entries;
}

void
refx_ptrmap_release_objs(refx_ptrmap *m)
{
    for (Py_ssize_t i = 0; i <= m->mask; i++) {
        Py_CLEAR(m->entries[i].obj);
    }
}

static inline size_t
ptr_hash(void *p)
{
    /* objects are 16-byte aligned: drop the low bits, then mix */
    uint64_t x = (uint64_t)(uintptr_t)p >> 4;
    x *= 0x9E3779B97F4A7C15ull;
    return (size_t)(x ^ (x >> 29));
}

static int
ptrmap_grow(refx_ptrmap *m)
{
    Py_ssize_t newcap = (m->mask + 1) * 2;
    if (newcap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(refx_ptrmap_entry)) {
        PyErr_NoMemory();
        return -1;
    }
    refx_ptrmap_entry *ne = PyMem_Calloc((size_t)newcap, sizeof(*ne));
    if (ne == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t nmask = (size_t)newcap - 1;
    for (Py_ssize_t i = 0; i <= m->mask; i++) {
        refx_ptrmap_entry *e = &m->entries[i];
        if (e->key != NULL) {
            size_t j = ptr_hash(e->key) & nmask;
            while (ne[j].key != NULL) {
                j = (j + 1) & nmask;
            }
            ne[j] = *e;
        }
    }
    if (m->entries != m->inline_entries) {
        PyMem_Free(m->entries);
    }
    m->entries = ne;
    m->mask = (Py_ssize_t)nmask;
    return 0;
}

refx_ptrmap_entry *
refx_ptrmap_get(refx_ptrmap *m, void *key, int *found)
{
    /* keep the load factor under 1/2 */
    if ((m->used + 1) * 2 > m->mask + 1) {
        if (ptrmap_grow(m) < 0) {
            return NULL;
        }
    }
    size_t mask = (size_t)m->mask;
    size_t j = ptr_hash(key) & mask;
    for (;;) {
        refx_ptrmap_entry *e = &m->entries[j];
        if (e->key == key) {
            *found = 1;
            return e;
        }
        if (e->key == NULL) {
            e->key = key;
            e->value = -1;
            e->obj = NULL;
            m->used++;
            *found = 0;
            return e;
        }
        j = (j + 1) & mask;
    }
}

/* ------------------------------------------------------------------ */
/* JAX hooks                                                            */
/* ------------------------------------------------------------------ */

int
refx_require_jax(refx_state *st, const char *fname)
{
    if (st->flatten == NULL) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s: refx._core is not linked to JAX; import refx, "
                     "not refx._core",
                     fname);
        return -1;
    }
    return 0;
}

/*
 * Calling into jaxlib.  Two jaxlib (0.4.38 to 0.10) defects are contained
 * here, so every refx call that reaches jaxlib gets them fixed:
 *
 *  - When an exception escapes from inside a tree (a leaf predicate or a
 *    custom node's flatten raising at depth d), jaxlib unwinds its C++
 *    recursion without Py_LeaveRecursiveCall, and the thread loses d levels
 *    of its recursion budget for good; a few thousand failing calls later
 *    every Python call raises RecursionError.  After a failed call we put
 *    the thread's recursion counter back to its value before the call,
 *    which is what a balanced callee leaves behind.
 *  - Some errors, notably RecursionError for too-deep trees, arrive as
 *    "SystemError: ... returned a result with an exception set" with the
 *    real error as __cause__.  We raise the cause: a SystemError would say
 *    "bug in refx or JAX" when the tree is at fault.
 */
typedef struct {
    int py;
    int c;
} refx_depth;

static inline void
depth_save(refx_depth *d)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030E0000
    (void)ts; /* 3.14 checks the C stack itself: nothing to restore */
    d->py = d->c = 0;
#elif PY_VERSION_HEX >= 0x030C0000
    d->py = ts->py_recursion_remaining;
    d->c = ts->c_recursion_remaining;
#else
    d->py = ts->recursion_remaining;
    d->c = 0;
#endif
}

static inline void
depth_restore(const refx_depth *d)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030E0000
    (void)ts;
    (void)d;
#elif PY_VERSION_HEX >= 0x030C0000
    ts->py_recursion_remaining = d->py;
    ts->c_recursion_remaining = d->c;
#else
    ts->recursion_remaining = d->py;
#endif
}

void
refx_unwrap_jax_error(void)
{
    if (!PyErr_ExceptionMatches(PyExc_SystemError)) {
        return;
    }
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyErr_NormalizeException(&et, &ev, &etb);
    PyObject *cause = ev != NULL ? PyException_GetCause(ev) : NULL;
    if (cause != NULL && PyExceptionInstance_Check(cause) &&
        !PyErr_GivenExceptionMatches(cause, PyExc_SystemError)) {
        PyObject *ctb = PyException_GetTraceback(cause);
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(cause)), cause, ctb);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(etb);
        return;
    }
    Py_XDECREF(cause);
    PyErr_Restore(et, ev, etb);
}

PyObject *
refx_call_jax(PyObject *callable, PyObject *const *args, size_t nargsf)
{
    refx_depth d;
    depth_save(&d);
    PyObject *res = PyObject_Vectorcall(callable, args, nargsf, NULL);
    if (res == NULL) {
        depth_restore(&d);
        refx_unwrap_jax_error();
    }
    return res;
}

PyObject *
refx_flatten(refx_state *st, PyObject *tree, PyObject *pred,
             PyObject **treedef)
{
    PyObject *args[2] = {tree, pred};
    PyObject *res = refx_call_jax(st->flatten, args, pred == NULL ? 1 : 2);
    if (res == NULL) {
        return NULL;
    }
    if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 2 ||
        !PyList_CheckExact(PyTuple_GET_ITEM(res, 0))) {
        Py_DECREF(res);
        REFX_BUG("flatten did not return (list, treedef)");
        return NULL;
    }
    PyObject *leaves = Py_NewRef(PyTuple_GET_ITEM(res, 0));
    *treedef = Py_NewRef(PyTuple_GET_ITEM(res, 1));
    Py_DECREF(res);
    return leaves;
}

PyObject *
refx_unflatten(refx_state *st, PyObject *treedef, PyObject *leaves)
{
    PyObject *unflatten = PyObject_GetAttr(treedef, st->str_unflatten);
    if (unflatten == NULL) {
        return NULL;
    }
    PyObject *res = refx_call_jax(unflatten, &leaves, 1);
    Py_DECREF(unflatten);
    return res;
}

PyObject *
refx_current_trace(refx_state *st)
{
    return PyObject_GetAttr(st->trace_state, st->str_value);
}

int
refx_check_hashable(PyObject *o, const char *fname, const char *what)
{
    if (PyObject_Hash(o) == -1) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s: %s must be hashable, got unhashable %.200s",
                         fname, what, Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* paths                                                                */
/* ------------------------------------------------------------------ */

static int
append_str(PyObject *list, PyObject *o)
{
    PyObject *s = PyUnicode_CheckExact(o) ? Py_NewRef(o) : PyObject_Str(o);
    if (s == NULL) {
        return -1;
    }
    if (PyUnicode_CheckExact(s)) {
        /* paths repeat the same few names across a tree: share them */
        PyUnicode_InternInPlace(&s);
    }
    int r = PyList_Append(list, s);
    Py_DECREF(s);
    return r;
}

static int
append_entry(refx_state *st, PyObject *parts, PyObject *entry)
{
    PyObject *attr = NULL, *field;
    PyTypeObject *tp = Py_TYPE(entry);
    if ((PyObject *)tp == st->sequence_key) {
        field = st->str_idx;
    }
    else if ((PyObject *)tp == st->dict_key) {
        field = st->str_key;
    }
    else if ((PyObject *)tp == st->getattr_key) {
        field = st->str_name;
    }
    else if ((PyObject *)tp == st->flattened_index_key) {
        field = st->str_key;
    }
    else {
        return append_str(parts, entry);
    }
    attr = PyObject_GetAttr(entry, field);
    if (attr == NULL) {
        return -1;
    }
    int r;
    if ((PyObject *)tp == st->dict_key && PyTuple_Check(attr)) {
        /* a Partition's key: splice its parts in */
        r = 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(attr) && r == 0; i++) {
            r = append_str(parts, PyTuple_GET_ITEM(attr, i));
        }
    }
    else {
        r = append_str(parts, attr);
    }
    Py_DECREF(attr);
    return r;
}

PyObject *
refx_path_from_keypath(refx_state *st, PyObject *keypath)
{
    PyObject *parts = NULL, *seq = NULL, *res = NULL;
    seq = PySequence_Fast(keypath, "key path must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    parts = PyList_New(0);
    if (parts == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (append_entry(st, parts, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            goto error;
        }
    }
    res = PyList_AsTuple(parts);
error:
    Py_XDECREF(parts);
    Py_XDECREF(seq);
    return res;
}

/* repr of the path of the i-th leaf, e.g. "('a', '0')".  Never fails:
 * if the path cannot be computed it says "leaf i" (the original error is
 * what the caller is about to raise, not this one). */
PyObject *
refx_leaf_path_repr(refx_state *st, PyObject *tree, PyObject *pred,
                    Py_ssize_t i)
{
    PyObject *res = NULL, *path = NULL, *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyObject *args[2] = {tree, pred};
    res = refx_call_jax(st->flatten_with_path, args, pred == NULL ? 1 : 2);
    if (res != NULL && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2) {
        PyObject *pairs = PyTuple_GET_ITEM(res, 0);
        if (PyList_Check(pairs) && i < PyList_GET_SIZE(pairs)) {
            PyObject *pair = PyList_GET_ITEM(pairs, i);
            if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2) {
                PyObject *p =
                    refx_path_from_keypath(st, PyTuple_GET_ITEM(pair, 0));
                if (p != NULL) {
                    path = PyObject_Repr(p);
                    Py_DECREF(p);
                }
            }
        }
    }
    Py_XDECREF(res);
    if (path == NULL) {
        PyErr_Clear();
        path = PyUnicode_FromFormat("leaf %zd", i);
    }
    PyErr_Restore(et, ev, etb);
    return path;
}

/* ------------------------------------------------------------------ */
/* leaf predicates (called by jaxlib for every node)                    */
/* ------------------------------------------------------------------ */

/*
 * jaxlib calls a leaf predicate on every node it visits.  The predicates
 * are instances of a tiny C type with its own vectorcall, for two reasons:
 *
 *  - speed: no argument parsing, no recursion bookkeeping (a Python lambda
 *    costs ~3x more, measured in module.c's git history);
 *  - safety: when a tree is deeper than the recursion limit, jaxlib (0.10)
 *    records the RecursionError and keeps visiting nodes, calling the
 *    predicate with that exception still set.  Running Python code in
 *    that state corrupts the interpreter (seen: later unrelated calls fail
 *    with RecursionError).  So a predicate called with an exception set
 *    returns NULL at once and never runs user code; the error then reaches
 *    the caller as a plain RecursionError (see refx_unwrap_jax_error).
 *
 * jaxlib passes (x) to flatten's predicate and (keypath, x) to
 * flatten_with_path's: the node is always the last argument.
 */

enum { PRED_DEREF, PRED_REFX, PRED_REFX_OR_USER };

typedef struct {
    PyObject_HEAD vectorcallfunc vectorcall;
    int kind;
    PyObject *module; /* strong: the state lives in it */
    PyObject *user;   /* PRED_REFX_OR_USER: the user's is_leaf */
} PredObject;

static inline int
is_refx_leaf(refx_state *st, PyObject *x)
{
    return x == st->nothing || Ref_Check(st, x) || Deref_Check(st, x);
}

static PyObject *
pred_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                PyObject *kwnames)
{
    if (PyErr_Occurred()) {
        return NULL; /* see above: never run with an exception set */
    }
    PredObject *p = (PredObject *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a leaf predicate takes a node");
        return NULL;
    }
    refx_state *st = refx_get_state(p->module);
    PyObject *x = args[nargs - 1];
    int r;
    if (p->kind == PRED_DEREF) {
        r = Deref_Check(st, x);
    }
    else {
        r = is_refx_leaf(st, x);
        if (!r && p->kind == PRED_REFX_OR_USER) {
            PyObject *res = PyObject_CallOneArg(p->user, x);
            if (res == NULL) {
                return NULL;
            }
            r = PyObject_IsTrue(res);
            Py_DECREF(res);
            if (r < 0) {
                return NULL;
            }
        }
    }
    return Py_NewRef(r ? Py_True : Py_False);
}

static int
pred_traverse(PredObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->user);
    return 0;
}

static int
pred_clear(PredObject *self)
{
    Py_CLEAR(self->module);
    Py_CLEAR(self->user);
    return 0;
}

static void
pred_dealloc(PredObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    pred_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
pred_repr(PredObject *self)
{
    static const char *names[] = {"Value/Index", "Ref/Value/Index/NOTHING",
                                  "Ref/Value/Index/NOTHING or is_leaf"};
    return PyUnicode_FromFormat("<refx leaf predicate: %s>",
                                names[self->kind]);
}

static PyMemberDef pred_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(PredObject, vectorcall),
     READONLY, NULL},
    {NULL},
};

static PyType_Slot pred_slots[] = {
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, pred_traverse},
    {Py_tp_clear, pred_clear},
    {Py_tp_dealloc, pred_dealloc},
    {Py_tp_repr, pred_repr},
    {Py_tp_members, pred_members},
    {0, NULL},
};

static PyType_Spec pred_spec = {
    .name = "refx._core.LeafPredicate",
    .basicsize = sizeof(PredObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = pred_slots,
};

static PyObject *
pred_new(refx_state *st, PyObject *module, int kind, PyObject *user)
{
    PredObject *p = PyObject_GC_New(PredObject, st->Pred_Type);
    if (p == NULL) {
        return NULL;
    }
    p->vectorcall = pred_vectorcall;
    p->kind = kind;
    p->module = Py_NewRef(module);
    p->user = Py_XNewRef(user);
    PyObject_GC_Track(p);
    return (PyObject *)p;
}

/* Ref/Value/Index/NOTHING or whatever user_is_leaf accepts. */
PyObject *
refx_make_pred(refx_state *st, PyObject *user_is_leaf)
{
    if (user_is_leaf == NULL || user_is_leaf == Py_None) {
        return Py_NewRef(st->pred_refx);
    }
    if (!PyCallable_Check(user_is_leaf)) {
        PyErr_Format(PyExc_TypeError,
                     "is_leaf must be a callable or None, not %.200s",
                     Py_TYPE(user_is_leaf)->tp_name);
        return NULL;
    }
    PyObject *module = ((PredObject *)st->pred_refx)->module;
    return pred_new(st, module, PRED_REFX_OR_USER, user_is_leaf);
}

/* ------------------------------------------------------------------ */
/* _install_jax                                                         */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    install_jax_doc,
    "_install_jax($module, /, *, flatten, flatten_with_path, treedef_type,\n"
    "             sequence_key, dict_key, getattr_key, flattened_index_key,\n"
    "             trace_state, check_value, plain_types)\n"
    "--\n\n"
    "Link the C core to JAX.  Called once by refx._compat; not public.");

static PyObject *
install_jax(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"flatten",
                             "flatten_with_path",
                             "treedef_type",
                             "sequence_key",
                             "dict_key",
                             "getattr_key",
                             "flattened_index_key",
                             "trace_state",
                             "check_value",
                             "plain_types",
                             NULL};
    PyObject *o[10];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOOOOO:_install_jax",
                                     kwlist, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9])) {
        return NULL;
    }
    if (!PyTuple_Check(o[9])) {
        PyErr_SetString(PyExc_TypeError,
                        "_install_jax: plain_types must be a tuple");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    Py_XSETREF(st->flatten, Py_NewRef(o[0]));
    Py_XSETREF(st->flatten_with_path, Py_NewRef(o[1]));
    Py_XSETREF(st->treedef_type, Py_NewRef(o[2]));
    Py_XSETREF(st->sequence_key, Py_NewRef(o[3]));
    Py_XSETREF(st->dict_key, Py_NewRef(o[4]));
    Py_XSETREF(st->getattr_key, Py_NewRef(o[5]));
    Py_XSETREF(st->flattened_index_key, Py_NewRef(o[6]));
    Py_XSETREF(st->trace_state, Py_NewRef(o[7]));
    Py_XSETREF(st->check_value, Py_NewRef(o[8]));
    Py_XSETREF(st->plain_types, Py_NewRef(o[9]));
    Py_RETURN_NONE;
}

static PyObject *
debug_counters(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    return Py_BuildValue(
        "{sKsKsKsn}", "mark_retries", (unsigned long long)st->mark_retries,
        "deref_nodes_seen", (unsigned long long)st->deref_nodes_seen,
        "nothing_nodes_seen", (unsigned long long)st->nothing_nodes_seen,
        "path_cache_size", PyDict_GET_SIZE(st->path_cache));
}

static PyObject *
clear_path_cache(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyDict_Clear(refx_get_state(module)->path_cache);
    Py_RETURN_NONE;
}

static PyMethodDef module_functions[] = {
    {"_clear_path_cache", (PyCFunction)clear_path_cache, METH_NOARGS,
     "_clear_path_cache($module, /)\n--\n\n"
     "Forget the paths computed per treedef (tests, memory)."},
    {"_debug_counters", (PyCFunction)debug_counters, METH_NOARGS,
     "_debug_counters($module, /)\n--\n\nInternal counters, for tests."},
    {"_install_jax", (PyCFunction)(void (*)(void))install_jax,
     METH_VARARGS | METH_KEYWORDS, install_jax_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ */
/* module lifecycle                                                     */
/* ------------------------------------------------------------------ */

/* clang-format off */
#define STATE_OBJECTS(X) \
    X(Ref_Type) \
    X(Deref_Type) \
    X(Value_Type) \
    X(Index_Type) \
    X(Nothing_Type) \
    X(Partition_Type) \
    X(Not_Type) \
    X(All_Type) \
    X(Any_Type) \
    X(Pred_Type) \
    X(nothing) \
    X(flatten) \
    X(flatten_with_path) \
    X(treedef_type) \
    X(sequence_key) \
    X(dict_key) \
    X(getattr_key) \
    X(flattened_index_key) \
    X(trace_state) \
    X(check_value) \
    X(plain_types) \
    X(pred_deref) \
    X(pred_refx) \
    X(path_cache) \
    X(str_value) \
    X(str_unflatten) \
    X(str_num_leaves) \
    X(str_idx) \
    X(str_key) \
    X(str_name) \
    X(Static_Type) \
    X(Jit_Type) \
    X(jit_builder) \
    X(jit_array_type) \
    X(jit_describe)
/* clang-format on */

static int
module_traverse(PyObject *m, visitproc visit, void *arg)
{
    refx_state *st = refx_get_state(m);
    if (st == NULL) {
        return 0;
    }
#define VISIT(name) Py_VISIT(st->name);
    STATE_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
module_clear(PyObject *m)
{
    refx_state *st = refx_get_state(m);
    if (st == NULL) {
        return 0;
    }
#define CLEAR(name) Py_CLEAR(st->name);
    STATE_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void
module_free(void *m)
{
    module_clear((PyObject *)m);
}

static int
add_functions(PyObject *module, PyMethodDef *defs)
{
    return PyModule_AddFunctions(module, defs);
}

static int
module_exec(PyObject *module)
{
    refx_state *st = refx_get_state(module);
#define INTERN(name, s)                                                       \
    if ((st->name = PyUnicode_InternFromString(s)) == NULL)                   \
        return -1;
    INTERN(str_value, "value")
    INTERN(str_unflatten, "unflatten")
    INTERN(str_num_leaves, "num_leaves")
    INTERN(str_idx, "idx")
    INTERN(str_key, "key")
    INTERN(str_name, "name")
#undef INTERN
    if ((st->path_cache = PyDict_New()) == NULL) {
        return -1;
    }
    if (refx_init_ref_types(module, st) < 0 ||
        refx_init_partition_types(module, st) < 0) {
        return -1;
    }
    if (add_functions(module, module_functions) < 0 ||
        add_functions(module, refx_ref_functions) < 0 ||
        add_functions(module, refx_deref_functions) < 0 ||
        add_functions(module, refx_partition_functions) < 0 ||
        add_functions(module, refx_update_functions) < 0) {
        return -1;
    }
    if (refx_init_jit(module, st) < 0) { /* jit.c */
        return -1;
    }
    st->Pred_Type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &pred_spec, NULL);
    if (st->Pred_Type == NULL) {
        return -1;
    }
    st->pred_deref = pred_new(st, module, PRED_DEREF, NULL);
    st->pred_refx = pred_new(st, module, PRED_REFX, NULL);
    if (st->pred_deref == NULL || st->pred_refx == NULL ||
        PyModule_AddObjectRef(module, "_is_deref_leaf", st->pred_deref) < 0 ||
        PyModule_AddObjectRef(module, "_is_refx_leaf", st->pred_refx) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

PyModuleDef refx_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "refx._core",
    .m_doc = "The C core of refx: Ref, deref/reref, partitions and updates.",
    .m_size = sizeof(refx_state),
    .m_methods = NULL,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&refx_module);
}
