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
 *   place              (optional) place(value, sharding, fname) -> value:
 *                      puts the value of a Ref whose metadata declares a
 *                      sharding on it (see ref_place in ref.c)
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

/* The hooks _install_jax takes, by keyword, and where they go. */
static const struct {
    const char *name;
    size_t offset;
    int optional; /* None stands for "this JAX has no such thing" */
} jax_hooks[] = {
    {"flatten", offsetof(refx_state, flatten), 0},
    {"flatten_with_path", offsetof(refx_state, flatten_with_path), 0},
    {"treedef_type", offsetof(refx_state, treedef_type), 0},
    {"sequence_key", offsetof(refx_state, sequence_key), 0},
    {"dict_key", offsetof(refx_state, dict_key), 0},
    {"getattr_key", offsetof(refx_state, getattr_key), 0},
    {"flattened_index_key", offsetof(refx_state, flattened_index_key), 0},
    {"trace_state", offsetof(refx_state, trace_state), 0},
    {"check_value", offsetof(refx_state, check_value), 0},
    {"plain_types", offsetof(refx_state, plain_types), 0},
    {"pytree_registry", offsetof(refx_state, pytree_registry), 1},
    {"array_types", offsetof(refx_state, array_types), 1},
    /* declared shardings (issue 13): see ref_place in ref.c */
    {"place", offsetof(refx_state, place), 1},
};
#define N_JAX_HOOKS (sizeof(jax_hooks) / sizeof(jax_hooks[0]))

PyDoc_STRVAR(
    install_jax__doc__,
    "_install_jax($module, /, **hooks)\n"
    "--\n\n"
    "Link the C core to JAX.  Called once by refx._compat; not public.\n"
    "Keywords: flatten, flatten_with_path, treedef_type, sequence_key,\n"
    "dict_key, getattr_key, flattened_index_key, trace_state, check_value,\n"
    "plain_types (a tuple of types), pytree_registry (a dict or None),\n"
    "array_types (a tuple of types or None), place (a callable or None).");

static PyObject *
install_jax(PyObject *module, PyObject *args, PyObject *kwargs)
{
    PyObject *given[N_JAX_HOOKS] = {NULL};
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "_install_jax() takes keyword arguments only");
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (kwargs != NULL && PyDict_Next(kwargs, &pos, &k, &v)) {
        size_t i = 0;
        while (i < N_JAX_HOOKS &&
               PyUnicode_CompareWithASCIIString(k, jax_hooks[i].name) != 0) {
            i++;
        }
        if (i == N_JAX_HOOKS) {
            PyErr_Format(PyExc_TypeError,
                         "_install_jax() got an unexpected keyword %R", k);
            return NULL;
        }
        given[i] = v;
    }
    for (size_t i = 0; i < N_JAX_HOOKS; i++) {
        if (given[i] == NULL && !jax_hooks[i].optional) {
            PyErr_Format(PyExc_TypeError, "_install_jax() missing hook '%s'",
                         jax_hooks[i].name);
            return NULL;
        }
    }
    PyObject *plain = given[9], *registry = given[10], *arrays = given[11];
    if (arrays != NULL && arrays != Py_None && !PyTuple_Check(arrays)) {
        PyErr_SetString(PyExc_TypeError,
                        "_install_jax: array_types must be a tuple or None");
        return NULL;
    }
    if (!PyTuple_Check(plain)) {
        PyErr_SetString(PyExc_TypeError,
                        "_install_jax: plain_types must be a tuple");
        return NULL;
    }
    if (registry != NULL && registry != Py_None && !PyDict_Check(registry)) {
        PyErr_SetString(
            PyExc_TypeError,
            "_install_jax: pytree_registry must be a dict or None");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    for (size_t i = 0; i < N_JAX_HOOKS; i++) {
        PyObject **slot = (PyObject **)((char *)st + jax_hooks[i].offset);
        PyObject *o =
            given[i] == Py_None && jax_hooks[i].optional ? NULL : given[i];
        Py_XSETREF(*slot, Py_XNewRef(o));
    }
    st->registry_seen = -1; /* look at the registry on the next call */
    Py_RETURN_NONE;
}

static PyObject *
debug_counters(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    return Py_BuildValue(
        "{sKsKsKsnsn}", "deref_nodes_seen",
        (unsigned long long)st->deref_nodes_seen, "nothing_nodes_seen",
        (unsigned long long)st->nothing_nodes_seen, "noncanonical_seen",
        (unsigned long long)st->noncanonical_seen, "path_cache_size",
        PyDict_GET_SIZE(st->path_cache), "path_cache_paths",
        st->path_cache_paths);
}

PyDoc_STRVAR(
    keypath_to_path__doc__,
    "keypath_to_path($module, keypath, /)\n"
    "--\n\n"
    "The refx path (a tuple of str, as partitions are keyed and state_dict\n"
    "names are joined) of a jax.tree_util key path: a sequence index i\n"
    "becomes str(i), a dict key str(key), an attribute its name; a key\n"
    "that is a tuple (a Partition's path) is spliced in.");

static PyObject *
keypath_to_path(PyObject *module, PyObject *keypath)
{
    refx_state *st = refx_get_state(module);
    if (refx_require_jax(st, "keypath_to_path") < 0) {
        return NULL;
    }
    if (!PyTuple_Check(keypath) && !PyList_Check(keypath)) {
        PyErr_Format(PyExc_TypeError,
                     "keypath_to_path: a key path is a tuple of key entries, "
                     "as jax.tree_util gives them, not %.200s",
                     Py_TYPE(keypath)->tp_name);
        return NULL;
    }
    return refx_path_from_keypath(st, keypath);
}

static PyMethodDef module_functions[] = {
    {"keypath_to_path", keypath_to_path, METH_O, keypath_to_path__doc__},
    {"_debug_counters", debug_counters, METH_NOARGS,
     "_debug_counters($module, /)\n--\n\nInternal counters, for tests."},
    {"_install_jax", (PyCFunction)(void (*)(void))install_jax,
     METH_VARARGS | METH_KEYWORDS, install_jax__doc__},
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
    X(PathContains_Type) \
    X(PathFilter_Type) \
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
    X(copyreg_newobj) \
    X(pytree_registry) \
    X(registered_ref_type) \
    X(array_types) \
    X(pred_deref) \
    X(pred_refx) \
    X(path_cache) \
    X(unflat_cache) \
    X(ref_tree_memo) \
    X(reref_memo) \
    X(str_value) \
    X(str_unflatten) \
    X(str_num_leaves) \
    X(str_idx) \
    X(str_key) \
    X(str_name) \
    X(str_flatten_up_to) \
    X(str_shape) \
    X(str_new) \
    X(str_dtype) \
    X(str_position) \
    X(str_reason) \
    X(str_trace) \
    X(str_mutable) \
    X(WriteRefused) \
    X(Static_Type) \
    X(Jit_Type) \
    X(jit_builder) \
    X(jit_array_type) \
    X(jit_describe) \
    X(jit_traceable) \
    X(jit_eval_trace) \
    X(jit_disable_jit) \
    X(jit_bound_changed) \
    X(ModuleFlatten_Type) \
    X(Flat_Type) \
    X(FlatSpec_Type) \
    X(mutable_var) \
    X(place) \
    X(capture_hook) \
    X(capture_rediscover)
/* clang-format on */

/* A field added to refx_state without its STATE_OBJECTS entry would escape
 * traverse and clear: the objects come first in the struct, and there must
 * be exactly as many of them as the list names. */
#define ONE(name) +1
_Static_assert(offsetof(refx_state, deref_nodes_seen) ==
                   (0 STATE_OBJECTS(ONE)) * sizeof(PyObject *),
               "STATE_OBJECTS does not list every object of refx_state");
#undef ONE

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

/* Create a heap type of this module into *out; `public`: also make it an
 * attribute of the module (internal types, like the leaf predicates', are
 * not). */
int
refx_add_type(PyObject *module, PyType_Spec *spec, PyObject *base,
              PyTypeObject **out, int public)
{
    PyObject *tp = PyType_FromModuleAndSpec(module, spec, base);
    if (tp == NULL) {
        return -1;
    }
    *out = (PyTypeObject *)tp;
    return public ? PyModule_AddType(module, (PyTypeObject *)tp) : 0;
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
    INTERN(str_flatten_up_to, "flatten_up_to")
    INTERN(str_shape, "shape")
    INTERN(str_new, "__new__")
    INTERN(str_dtype, "dtype")
    INTERN(str_position, "position")
    INTERN(str_reason, "reason")
    INTERN(str_trace, "trace")
    INTERN(str_mutable, "mutable")
#undef INTERN
    /* private: the transforms' write-back catches it (jit.c, write_refs) */
    st->WriteRefused =
        PyErr_NewException("refx._core._WriteRefused", PyExc_ValueError, NULL);
    if (st->WriteRefused == NULL ||
        PyModule_AddObjectRef(module, "_WriteRefused", st->WriteRefused) < 0) {
        return -1;
    }
    if ((st->path_cache = PyDict_New()) == NULL) {
        return -1;
    }
    if ((st->unflat_cache = refx_unflat_cache_new()) == NULL) {
        return -1;
    }
    st->path_cache_max_paths = 500000; /* see partition.c */
    st->path_cache_max_entries = 512;
    PyObject *copyreg = PyImport_ImportModule("copyreg");
    if (copyreg == NULL) {
        return -1;
    }
    st->copyreg_newobj = PyObject_GetAttrString(copyreg, "__newobj__");
    Py_DECREF(copyreg);
    if (st->copyreg_newobj == NULL) {
        return -1;
    }
    if (refx_init_ref_types(module, st) < 0 ||
        refx_init_partition_types(module, st) < 0 ||
        refx_init_filter_types(module, st) < 0) {
        return -1;
    }
    if (PyModule_AddFunctions(module, module_functions) < 0 ||
        PyModule_AddFunctions(module, refx_ref_functions) < 0 ||
        PyModule_AddFunctions(module, refx_deref_functions) < 0 ||
        PyModule_AddFunctions(module, refx_partition_functions) < 0 ||
        PyModule_AddFunctions(module, refx_update_functions) < 0) {
        return -1;
    }
    if (refx_init_jit(module, st) < 0 ||  /* jit.c */
        refx_init_nn(module, st) < 0 ||   /* nnmodule.c */
        refx_init_memo(module, st) < 0 || /* flatmemo.c */
        refx_init_flat(module, st) < 0) { /* flatvalue.c */
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
