/*
 * tree.c: how refx reaches trees, through jaxlib.
 *
 * Tree traversal is JAX's own C++ code: every algorithm is
 * "flatten, work on the flat list of leaves in C, unflatten".  That makes
 * refx agree with JAX on every node type (dicts with sorted keys,
 * namedtuples, dataclasses, None, custom nodes) and bounds its cost by
 * jax.tree_util's own.  Leaf predicates are C builtins (a Python lambda
 * would triple their cost).  Every call into jaxlib goes through
 * refx_call_jax, which contains two jaxlib defects (see there).
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
 * Functions in this file: refx_require_jax, refx_require_trees (and the
 * check that no Ref subclass is a pytree node), refx_call_jax and the
 * recursion-budget repair, refx_flatten/unflatten, refx_current_trace,
 * refx_check_hashable, refx_path_from_keypath, refx_leaf_path_repr,
 * refx_raise_at_leaf/at_path, refx_flatten_leaves, the dict cursor, the
 * LeafPredicate type and refx_make_pred, refx_init_tree_types.
 */
#include "refx.h"
#include <structmember.h>

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
 * Refs must be pytree leaves: that is how a shared Ref stays one object.
 * A Ref subclass registered as a pytree node (as Flax registers its
 * Variables) would make jaxlib flatten it into its value, so deref would
 * split one shared Ref into two, and tree_partition would see a node or a
 * leaf depending on whether it flattened with a leaf predicate.  Instead of
 * answering differently by call history, every call that walks a tree
 * refuses such a program.  Registrations cannot be undone, and JAX's own
 * registry dict (jax._src.tree_util._registry, handed over by _compat)
 * only grows, so one size comparison per call tells whether there is
 * anything new to look at.
 */
static int
check_registry(refx_state *st)
{
    PyObject *reg = st->pytree_registry;
    if (reg == NULL || PyDict_GET_SIZE(reg) == st->registry_seen) {
        return 0;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(reg, &pos, &k, &v)) {
        if (PyType_Check(k) &&
            PyType_IsSubtype((PyTypeObject *)k, st->Ref_Type)) {
            Py_XSETREF(st->registered_ref_type, Py_NewRef(k));
            break;
        }
    }
    st->registry_seen = PyDict_GET_SIZE(reg);
    return 0;
}

int
refx_require_trees(refx_state *st, const char *fname)
{
    if (refx_require_jax(st, fname) < 0 || check_registry(st) < 0) {
        return -1;
    }
    if (st->registered_ref_type != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "%s: the Ref subclass %.200s is registered as a JAX "
                     "pytree node; Refs must be pytree leaves (JAX would "
                     "flatten it into its value, and a shared Ref would "
                     "become copies).  Do not register Ref subclasses with "
                     "jax.tree_util; carry data on a Ref as metadata",
                     fname,
                     ((PyTypeObject *)st->registered_ref_type)->tp_name);
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

/*
 * Paths and the path cache.  Paths depend on the tree only through its
 * dict keys (and the key entries of custom nodes); equal treedefs have
 * equal keys by ==, not equal str(): {1: x}, {1.0: x} and {True: x} have
 * one treedef but the paths ('1',), ('1.0',), ('True',).  A path is
 * "canonical" when every dict key in it is an exact str or an exact int
 * (bools excluded): equal canonical keys have equal str(), so equal
 * treedefs of canonical trees have equal paths, and only those may share
 * a cache entry.  The leaf predicates note dicts with other keys
 * (noncanonical_seen), so a tree is known to be canonical before its
 * treedef is looked up.
 */
static inline int
is_canonical_key(PyObject *k)
{
    return PyUnicode_CheckExact(k) || PyLong_CheckExact(k);
}

/* Partitions are dicts keyed by tuples of str, spliced into paths */
static inline int
is_canonical_dict_key(PyObject *k)
{
    if (PyTuple_CheckExact(k)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(k); i++) {
            if (!is_canonical_key(PyTuple_GET_ITEM(k, i))) {
                return 0;
            }
        }
        return 1;
    }
    return is_canonical_key(k);
}

static int
append_str(PyObject *list, PyObject *o, int *canonical)
{
    if (!is_canonical_key(o)) {
        *canonical = 0;
    }
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
append_entry(refx_state *st, PyObject *parts, PyObject *entry, int *canonical)
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
        *canonical = 0; /* a key class of the user's: str(entry) */
        return append_str(parts, entry, canonical);
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
            r = append_str(parts, PyTuple_GET_ITEM(attr, i), canonical);
        }
    }
    else {
        r = append_str(parts, attr, canonical);
    }
    Py_DECREF(attr);
    return r;
}

/* The refx path (tuple of str) of a JAX key path; *canonical is cleared
 * if a key in it is not canonical (may be NULL). */
PyObject *
refx_path_from_keypath_ex(refx_state *st, PyObject *keypath, int *canonical)
{
    PyObject *parts = NULL, *seq = NULL, *res = NULL;
    int ignored = 1;
    if (canonical == NULL) {
        canonical = &ignored;
    }
    seq = PySequence_Fast(keypath, "key path must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    parts = PyList_New(0);
    if (parts == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (append_entry(st, parts, PySequence_Fast_GET_ITEM(seq, i),
                         canonical) < 0) {
            goto error;
        }
    }
    res = PyList_AsTuple(parts);
error:
    Py_XDECREF(parts);
    Py_XDECREF(seq);
    return res;
}

PyObject *
refx_path_from_keypath(refx_state *st, PyObject *keypath)
{
    return refx_path_from_keypath_ex(st, keypath, NULL);
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

/*
 * Every error about one position of a tree goes through these two, so
 * the path is always placed and formatted the same way.  `fmt` is a
 * PyUnicode_FromFormat format with "{path}" where the path's repr goes
 * (before any user-supplied %R/%S, so only our marker can be replaced).
 */
static void
raise_with_path(PyObject *exc, PyObject *path_repr, const char *fmt,
                va_list va)
{
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    if (msg == NULL) {
        return;
    }
    PyObject *marker = PyUnicode_FromString("{path}");
    PyObject *full =
        marker != NULL ? PyUnicode_Replace(msg, marker, path_repr, 1) : NULL;
    if (full != NULL) {
        PyErr_SetObject(exc, full);
        Py_DECREF(full);
    }
    Py_XDECREF(marker);
    Py_DECREF(msg);
}

/* Raise `exc` with `fmt`, "{path}" being the path of leaf i of `tree`
 * flattened with `pred` (computed again: the error path may be slow). */
void
refx_vraise_at_leaf(refx_state *st, PyObject *exc, PyObject *tree,
                    PyObject *pred, Py_ssize_t i, const char *fmt, va_list va)
{
    PyObject *path = refx_leaf_path_repr(st, tree, pred, i);
    if (path != NULL) {
        raise_with_path(exc, path, fmt, va);
        Py_DECREF(path);
    }
}

void
refx_raise_at_leaf(refx_state *st, PyObject *exc, PyObject *tree,
                   PyObject *pred, Py_ssize_t i, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    refx_vraise_at_leaf(st, exc, tree, pred, i, fmt, va);
    va_end(va);
}

/* Same, for a caller that holds the path (a tuple of str) itself. */
void
refx_vraise_at_path(PyObject *exc, PyObject *path, const char *fmt, va_list va)
{
    PyObject *r = PyObject_Repr(path);
    if (r != NULL) {
        raise_with_path(exc, r, fmt, va);
        Py_DECREF(r);
    }
}

void
refx_raise_at_path(PyObject *exc, PyObject *path, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    refx_vraise_at_path(exc, path, fmt, va);
    va_end(va);
}

/* The leaves of `tree` as `pred` (pred_deref or pred_refx) sees them.
 * Such a predicate costs ~25% of a flatten, and trees of Refs rarely hold
 * the nodes it makes leaves; so flatten without it and redo with it only
 * if the flatten functions of Value/Index (and NOTHING, for pred_refx)
 * bumped their counters.  The counters are monotonic: another thread
 * flattening meanwhile can only cause a needless redo, never a miss. */
PyObject *
refx_flatten_leaves(refx_state *st, PyObject *tree, PyObject *pred,
                    PyObject **treedef)
{
    uint64_t d = st->deref_nodes_seen, z = st->nothing_nodes_seen;
    PyObject *leaves = refx_flatten(st, tree, NULL, treedef);
    if (leaves == NULL ||
        (st->deref_nodes_seen == d &&
         (pred == st->pred_deref || st->nothing_nodes_seen == z))) {
        return leaves;
    }
    Py_DECREF(leaves);
    Py_CLEAR(*treedef);
    return refx_flatten(st, tree, pred, treedef);
}

/*
 * A dict cursor looks keys up in a dict that usually holds them in the
 * order they are asked for (a partition made by tree_partition, read in
 * leaf order): while they come in that order a lookup is one PyDict_Next
 * and a pointer test (paths made by tree_partition are the cached path
 * objects themselves); the first key out of order switches to plain
 * lookups for good.  Comparing keys may run Python code that mutates the
 * dict, so keys and values are owned across the comparison.
 */
void
refx_cursor_init(refx_dict_cursor *cur, PyObject *dict)
{
    cur->dict = dict;
    cur->pos = 0;
    cur->in_step = 1;
}

/* New reference to dict[key]; NULL with no error if absent. */
PyObject *
refx_cursor_get(refx_dict_cursor *cur, PyObject *key)
{
    PyObject *k, *v;
    if (cur->in_step && PyDict_Next(cur->dict, &cur->pos, &k, &v)) {
        if (k == key) {
            return Py_NewRef(v);
        }
        Py_INCREF(k);
        Py_INCREF(v);
        Py_INCREF(key);
        int eq = PyObject_RichCompareBool(k, key, Py_EQ);
        Py_DECREF(k);
        Py_DECREF(key);
        if (eq > 0) {
            return v;
        }
        Py_DECREF(v);
        if (eq < 0) {
            return NULL;
        }
    }
    cur->in_step = 0;
    return Py_XNewRef(PyDict_GetItemWithError(cur->dict, key));
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
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    PyObject *module; /* strong: the state lives in it */
    PyObject *user;   /* PRED_REFX_OR_USER: the user's is_leaf */
} PredObject;
#define PRED_CAST(op) ((PredObject *)(op))

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
        if (!r && PyDict_Check(x)) {
            /* a node whose keys become paths: note non-canonical keys (see
             * "Paths and the path cache"); no Python code runs here */
            Py_ssize_t pos = 0;
            PyObject *k, *v;
            while (PyDict_Next(x, &pos, &k, &v)) {
                if (!is_canonical_dict_key(k)) {
                    st->noncanonical_seen++;
                    break;
                }
            }
        }
    }
    return Py_NewRef(r ? Py_True : Py_False);
}

static int
pred_traverse(PyObject *op, visitproc visit, void *arg)
{
    PredObject *self = PRED_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->user);
    return 0;
}

static int
pred_clear(PyObject *op)
{
    PredObject *self = PRED_CAST(op);
    Py_CLEAR(self->module);
    Py_CLEAR(self->user);
    return 0;
}

static void
pred_dealloc(PyObject *op)
{
    PredObject *self = PRED_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    pred_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
pred_repr(PyObject *op)
{
    PredObject *self = PRED_CAST(op);
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

/* The LeafPredicate type and the two shared predicates. */
int
refx_init_tree_types(PyObject *module, refx_state *st)
{
    if (refx_add_type(module, &pred_spec, NULL, &st->Pred_Type, 0) < 0) {
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
