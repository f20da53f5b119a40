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

PyObject *
refx_flatten(refx_state *st, PyObject *tree, PyObject *pred,
             PyObject **treedef)
{
    PyObject *args[2] = {tree, pred};
    PyObject *res = PyObject_Vectorcall(st->flatten, args,
                                        pred == NULL ? 1 : 2, NULL);
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
    return PyObject_CallMethodOneArg(treedef, st->str_unflatten, leaves);
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
    res = PyObject_Vectorcall(st->flatten_with_path, args,
                              pred == NULL ? 1 : 2, NULL);
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

/* jaxlib passes (x) to flatten's predicate and (keypath, x) to
 * flatten_with_path's: the node is always the last argument. */
static PyObject *
pred_deref(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "predicate takes a node");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    return Py_NewRef(Deref_Check(st, args[nargs - 1]) ? Py_True : Py_False);
}

static inline int
is_refx_leaf(refx_state *st, PyObject *x)
{
    return x == st->nothing || Ref_Check(st, x) || Deref_Check(st, x);
}

static PyObject *
pred_refx(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "predicate takes a node");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    return Py_NewRef(is_refx_leaf(st, args[nargs - 1]) ? Py_True : Py_False);
}

/* self is (module, user_is_leaf) */
static PyObject *
pred_refx_or_user(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "predicate takes a node");
        return NULL;
    }
    refx_state *st = refx_get_state(PyTuple_GET_ITEM(self, 0));
    PyObject *x = args[nargs - 1];
    if (is_refx_leaf(st, x)) {
        Py_RETURN_TRUE;
    }
    PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(self, 1), x);
    if (r == NULL) {
        return NULL;
    }
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (t < 0) {
        return NULL;
    }
    return Py_NewRef(t ? Py_True : Py_False);
}

static PyMethodDef pred_refx_or_user_def = {
    "_is_leaf", (PyCFunction)(void (*)(void))pred_refx_or_user,
    METH_FASTCALL, NULL};

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
    /* multi-phase modules are not in the PyState table: reach the module
     * through one of its types (borrowed) */
    PyObject *module = PyType_GetModule(st->Ref_Type);
    if (module == NULL) {
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, module, user_is_leaf);
    if (self == NULL) {
        return NULL;
    }
    PyObject *f = PyCFunction_New(&pred_refx_or_user_def, self);
    Py_DECREF(self);
    return f;
}

/* ------------------------------------------------------------------ */
/* _install_jax                                                         */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(install_jax_doc,
"_install_jax($module, /, *, flatten, flatten_with_path, treedef_type,\n"
"             sequence_key, dict_key, getattr_key, flattened_index_key,\n"
"             trace_state, check_value, plain_types)\n"
"--\n\n"
"Link the C core to JAX.  Called once by refx._compat; not public.");

static PyObject *
install_jax(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"flatten",      "flatten_with_path",
                             "treedef_type", "sequence_key",
                             "dict_key",     "getattr_key",
                             "flattened_index_key", "trace_state",
                             "check_value",  "plain_types", NULL};
    PyObject *o[10];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOOOOO:_install_jax",
                                     kwlist, &o[0], &o[1], &o[2], &o[3],
                                     &o[4], &o[5], &o[6], &o[7], &o[8],
                                     &o[9])) {
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
    return Py_BuildValue("{sKsKsKsn}", "mark_retries",
                         (unsigned long long)st->mark_retries, "deref_nodes_seen",
                         (unsigned long long)st->deref_nodes_seen,
                         "nothing_nodes_seen",
                         (unsigned long long)st->nothing_nodes_seen,
                         "path_cache_size", PyDict_GET_SIZE(st->path_cache));
}

static PyMethodDef module_functions[] = {
    {"_debug_counters", (PyCFunction)debug_counters, METH_NOARGS,
     "_debug_counters($module, /)\n--\n\nInternal counters, for tests."},
    {"_install_jax", (PyCFunction)(void (*)(void))install_jax,
     METH_VARARGS | METH_KEYWORDS, install_jax_doc},
    {"_is_deref_leaf", (PyCFunction)(void (*)(void))pred_deref, METH_FASTCALL,
     "_is_deref_leaf($module, node, /)\n--\n\n"
     "Leaf predicate: True for Value and Index nodes."},
    {"_is_refx_leaf", (PyCFunction)(void (*)(void))pred_refx, METH_FASTCALL,
     "_is_refx_leaf($module, node, /)\n--\n\n"
     "Leaf predicate: True for Ref, Value, Index and NOTHING."},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ */
/* module lifecycle                                                     */
/* ------------------------------------------------------------------ */

#define STATE_OBJECTS(X)                                                   \
    X(Ref_Type) X(Deref_Type) X(Value_Type) X(Index_Type) X(Nothing_Type)  \
    X(Partition_Type) X(Not_Type) X(All_Type) X(Any_Type) X(nothing)       \
    X(flatten) X(flatten_with_path) X(treedef_type) X(sequence_key)        \
    X(dict_key) X(getattr_key) X(flattened_index_key) X(trace_state)       \
    X(check_value) X(plain_types) X(pred_deref) X(pred_refx) X(path_cache) \
    X(str_value) X(str_unflatten) X(str_num_leaves) X(str_idx) X(str_key)  \
    X(str_name)

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
#define INTERN(name, s)                                  \
    if ((st->name = PyUnicode_InternFromString(s)) == NULL) \
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
    st->pred_deref = PyObject_GetAttrString(module, "_is_deref_leaf");
    st->pred_refx = PyObject_GetAttrString(module, "_is_refx_leaf");
    if (st->pred_deref == NULL || st->pred_refx == NULL) {
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
