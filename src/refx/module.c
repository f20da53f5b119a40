/*
 * module.c: refx._core's module state and lifecycle, and its link to JAX.
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
 * How refx reaches trees through those hooks is tree.c's business.
 *
 * Module state.  Every object the state holds is listed once in
 * STATE_OBJECTS, which drives both traverse and clear.
 *
 * Functions in this file: _install_jax, the debug helpers, module state
 * (traverse/clear/free), module exec.
 */
#include "refx.h"

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
    X(str_name)
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
        refx_init_partition_types(module, st) < 0 ||
        refx_init_filter_types(module, st) < 0) {
        return -1;
    }
    if (add_functions(module, module_functions) < 0 ||
        add_functions(module, refx_ref_functions) < 0 ||
        add_functions(module, refx_deref_functions) < 0 ||
        add_functions(module, refx_partition_functions) < 0 ||
        add_functions(module, refx_update_functions) < 0) {
        return -1;
    }
    return refx_init_tree_types(module, st);
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
