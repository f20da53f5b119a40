/*
 * refx.h: the private header shared by the C files of refx._core.
 *
 * refx is a reference system for JAX pytrees.  The C core owns six
 * things, one file each:
 *
 *   module.c     module state, the JAX hooks installed by refx._compat,
 *                tree flattening helpers, key paths and error paths.
 *   ref.c        the Ref type, the Deref/Value/Index types, NOTHING,
 *                and the trace-level check that guards every write.
 *   deref.c      deref, reref and clone: turning shared Refs into a pure
 *                pytree and back.
 *   partition.c  the Partition type, filters (Not/All/Any and the
 *                shorthands), tree_partition, get_partition and
 *                merge_partitions.
 *   update.c     update_refs: validate everything, then write everything.
 *   jit.c        the per-call path of refx.jit / refx.jit_partial (the
 *                JitFunction type) and Static; their trace-time side is
 *                refx/_transforms.py.
 *
 * All state lives in `refx_state` (PEP 489 multi-phase init, heap types).
 * JAX is not imported from C: refx/_compat.py imports it, picks the calls
 * that fit the installed version and hands them to `_core._install_jax`.
 * Until that has happened, every function that needs JAX raises
 * RuntimeError instead of crashing.
 */
#ifndef REFX_H
#define REFX_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if PY_VERSION_HEX < 0x030B0000
#error "refx needs CPython 3.11 or newer"
#endif
#ifdef Py_GIL_DISABLED
/* deref's in-place Ref marks, the module-state counters and the borrowed
 * pointers of the per-call tables all assume the GIL. */
#error "refx does not support free-threaded CPython builds yet"
#endif

/* Setting a dict item whose hash is already known (tree_partition stores
 * each path into one of several dicts).  _PyDict_SetItem_KnownHash left the
 * public headers in 3.13; there the hash is recomputed (a path is a tuple
 * of str, whose hashes are cached, so that is a few ns per entry). */
static inline int
refx_dict_setitem_known_hash(PyObject *d, PyObject *key, PyObject *value,
                             Py_hash_t hash)
{
#if PY_VERSION_HEX < 0x030D0000
    return _PyDict_SetItem_KnownHash(d, key, value, hash);
#else
    (void)hash;
    return PyDict_SetItem(d, key, value);
#endif
}

/* ------------------------------------------------------------------ */
/* module state                                                        */
/* ------------------------------------------------------------------ */

typedef struct {
    /* types */
    PyTypeObject *Ref_Type;
    PyTypeObject *Deref_Type;
    PyTypeObject *Value_Type;
    PyTypeObject *Index_Type;
    PyTypeObject *Nothing_Type;
    PyTypeObject *Partition_Type;
    PyTypeObject *Not_Type;
    PyTypeObject *All_Type;
    PyTypeObject *Any_Type;
    PyTypeObject *Pred_Type; /* leaf predicates handed to jaxlib */
    PyObject *nothing;       /* the NOTHING singleton */

    /* JAX hooks, set once by _install_jax (NULL before) */
    PyObject *flatten;           /* registry.flatten(tree, pred) */
    PyObject *flatten_with_path; /* registry.flatten_with_path(tree, pred) */
    PyObject *treedef_type;      /* PyTreeDef */
    PyObject *sequence_key;      /* key-path entry types */
    PyObject *dict_key;
    PyObject *getattr_key;
    PyObject *flattened_index_key;
    PyObject *trace_state; /* .value is the current trace's weakref */
    PyObject *check_value; /* check_value(value, trace_weakref) */
    PyObject *plain_types; /* tuple of types that never hold tracers */

    /* leaf predicates handed to jaxlib (module.c) */
    PyObject *pred_deref; /* Value/Index are leaves */
    PyObject *pred_refx;  /* Ref/Value/Index/NOTHING are leaves */

    /* treedef -> tuple of path tuples, bounded (see module.c) */
    PyObject *path_cache;

    /* Bumped by the flatten functions of Value/Index and of NOTHING.
     * deref and tree_partition flatten without a leaf predicate (it costs
     * ~25% of a flatten) and compare these counters before and after: a
     * change means the tree held such nodes and the call redoes the
     * flatten with a predicate.  Monotonic, so another thread flattening
     * at the same time can only cause a needless redo, never a miss. */
    uint64_t deref_nodes_seen;
    uint64_t nothing_nodes_seen;
    int partition_hint;    /* last tree_partition needed the predicate */
    uint64_t epoch;        /* numbers deref/clone calls, for Ref marks */
    uint64_t mark_retries; /* deref/clone calls redone with a map (tests) */

    /* interned strings */
    PyObject *str_value;
    PyObject *str_unflatten;
    PyObject *str_num_leaves;
    PyObject *str_idx;
    PyObject *str_key;
    PyObject *str_name;

    /* refx.jit (jit.c) */
    PyTypeObject *Static_Type;
    PyTypeObject *Jit_Type;
    PyObject *jit_builder;    /* _transforms.build_jit_entry (NULL before) */
    PyObject *jit_array_type; /* jax's Array type: the only donated values */
    PyObject *jit_describe;   /* _transforms: where a Ref sits, for errors */
} refx_state;

extern PyModuleDef refx_module;

static inline refx_state *
refx_get_state(PyObject *module)
{
    return (refx_state *)PyModule_GetState(module);
}

/* State from an instance of one of our types (or of a Python subclass). */
static inline refx_state *
refx_state_from_type(PyTypeObject *tp)
{
    PyObject *m = PyType_GetModuleByDef(tp, &refx_module);
    if (m == NULL) {
        return NULL;
    }
    return refx_get_state(m);
}

/* Raise SystemError naming this file and line: internal invariants only. */
#define REFX_BUG(msg)                                                         \
    PyErr_Format(PyExc_SystemError, "refx internal error at %s:%d: %s",       \
                 __FILE__, __LINE__, (msg))

/* ------------------------------------------------------------------ */
/* objects                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD PyObject *value; /* owned; never NULL after construction */
    PyObject *collection;          /* owned, hashable; None by default */
    PyObject *trace; /* owned weakref to the creating JAX trace */
    PyObject *weakreflist;
    /* Scratch marks for deref/clone (see deref.c): "this Ref is number
     * mark_index in the deref call numbered mark_epoch".  Meaningless
     * outside that call; never read by anything else. */
    uint64_t mark_epoch;
    Py_ssize_t mark_index;
} RefObject;

typedef struct {
    PyObject_HEAD Py_ssize_t index;
    PyObject *collection; /* owned */
    PyObject *flat;       /* lazily built ((children...), (index, coll)) */
} DerefObject;

typedef struct {
    DerefObject base;
    PyObject *value; /* owned */
} ValueObject;

typedef struct {
    PyDictObject dict;
    PyObject *paths; /* NULL or tuple of the keys in order (a cache) */
    PyObject *aux;   /* NULL or (paths, positions of NOTHING): pytree aux */
} PartitionObject;

#define Ref_Check(st, o) PyObject_TypeCheck((o), (st)->Ref_Type)
#define Deref_Check(st, o) PyObject_TypeCheck((o), (st)->Deref_Type)
#define Value_Check(st, o) PyObject_TypeCheck((o), (st)->Value_Type)
#define Index_Check(st, o) PyObject_TypeCheck((o), (st)->Index_Type)
#define Partition_Check(st, o) PyObject_TypeCheck((o), (st)->Partition_Type)

/* ------------------------------------------------------------------ */
/* cross-file functions                                                */
/* ------------------------------------------------------------------ */

/* module.c */
int refx_require_jax(refx_state *st, const char *fname);
void refx_unwrap_jax_error(void);
PyObject *refx_call_jax(PyObject *callable, PyObject *const *args,
                        size_t nargsf);
PyObject *refx_flatten(refx_state *st, PyObject *tree, PyObject *pred,
                       PyObject **treedef);
PyObject *refx_unflatten(refx_state *st, PyObject *treedef, PyObject *leaves);
PyObject *refx_path_from_keypath(refx_state *st, PyObject *keypath);
PyObject *refx_leaf_path_repr(refx_state *st, PyObject *tree, PyObject *pred,
                              Py_ssize_t i);
int refx_check_hashable(PyObject *o, const char *fname, const char *what);
PyObject *refx_current_trace(refx_state *st);
PyObject *refx_make_pred(refx_state *st, PyObject *user_is_leaf);

/* ref.c */
int refx_init_ref_types(PyObject *module, refx_state *st);
PyObject *refx_ref_create(refx_state *st, PyTypeObject *tp, PyObject *value,
                          PyObject *collection, PyObject *trace);
int refx_check_write(refx_state *st, RefObject *ref, PyObject *value,
                     PyObject *current_trace);
/* Set ref.value (no checks), keeping GC tracking right. */
void refx_ref_store(refx_state *st, RefObject *ref, PyObject *value);
PyObject *refx_value_create(refx_state *st, PyObject *value, Py_ssize_t index,
                            PyObject *collection);
PyObject *refx_index_create(refx_state *st, Py_ssize_t index,
                            PyObject *collection);
PyObject *refx_collection_of(refx_state *st, PyObject *leaf);
extern PyMethodDef refx_ref_functions[];

/* deref.c */
extern PyMethodDef refx_deref_functions[];

/* partition.c */
int refx_init_partition_types(PyObject *module, refx_state *st);
int refx_filter_validate(refx_state *st, PyObject *filter, const char *fname,
                         Py_ssize_t pos);
int refx_filter_match(refx_state *st, PyObject *filter, PyObject *leaf);
extern PyMethodDef refx_partition_functions[];

/* update.c */
extern PyMethodDef refx_update_functions[];

/* jit.c: refx.jit's per-call path, Static */
int refx_init_jit(PyObject *module, refx_state *st);

/* ------------------------------------------------------------------ */
/* a pointer-keyed hash map for per-call identity tables                 */
/* ------------------------------------------------------------------ */

/*
 * deref and update_refs must recognise the same Ref at several leaves.
 * A PyDict would do, but these maps hold borrowed pointers for the span
 * of one call during which no Python code runs (deref) or the objects are
 * kept alive by the flattened leaves list (update), so a plain
 * open-addressing table keyed by address is both safe and several times
 * cheaper than dict lookups.  Small maps live in an inline buffer.
 */
typedef struct {
    void *key;
    Py_ssize_t value;
    PyObject *obj; /* owned by the caller: release before refx_ptrmap_fini */
} refx_ptrmap_entry;

#define REFX_PTRMAP_INLINE 64

typedef struct {
    refx_ptrmap_entry *entries;
    Py_ssize_t mask; /* capacity - 1; capacity is a power of two */
    Py_ssize_t used;
    refx_ptrmap_entry inline_entries[REFX_PTRMAP_INLINE];
} refx_ptrmap;

void refx_ptrmap_init(refx_ptrmap *m);
void refx_ptrmap_fini(refx_ptrmap *m);
/* Py_XDECREF every entry's obj */
void refx_ptrmap_release_objs(refx_ptrmap *m);
/* Returns the entry for key, inserting {key, -1, NULL} if missing (sets *found).
 * NULL with MemoryError set on allocation failure. */
refx_ptrmap_entry *refx_ptrmap_get(refx_ptrmap *m, void *key, int *found);

#endif /* REFX_H */
