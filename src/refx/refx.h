/*
 * refx.h: the private header shared by the C files of refx._core.
 *
 * refx is a reference system for JAX pytrees.  The C core is cut by
 * concern, one file each:
 *
 *   module.c     module state and lifecycle, _install_jax (the JAX hooks
 *                installed by refx._compat).
 *   tree.c       how refx reaches trees through jaxlib: flatten/unflatten
 *                with the recursion-budget repair, key paths and error
 *                paths, the C leaf predicates.
 *   ref.c        the Ref type, the Deref/Value/Index types, NOTHING,
 *                and the write check (trace level, refx.mutable, tracers)
 *                with the one routine that writes Refs, refx_write_all.
 *   kinds.c      what a Ref is besides its value and collection: its class,
 *                metadata and a subclass's attributes (its "kind"), the
 *                typo hint for metadata names, Value/Index aux data.
 *   deref.c      deref, reref and clone: turning shared Refs into a pure
 *                pytree and back.
 *   filter.c     filters: the shorthands and Not/All/Any.
 *   partition.c  the Partition type, tree_partition, get_partition and
 *                merge_partitions.
 *   update.c     update_refs: validate everything, then write everything.
 *   jit.c        the per-call path of refx.jit / refx.jit_partial (the
 *                JitFunction type) and Static; their trace-time side is
 *                refx/_jit.py (over the lift, refx/_lift.py).
 *   nnmodule.c   the pytree flatten of refx.nn.Module (_ModuleFlatten),
 *                made and registered by refx/nn/_module.py.
 *   flatmemo.c   refx.jit's argument flatten, checked against a memo of
 *                the last call's instead of made again by jaxlib.
 *   flatvalue.c  a Ref's pytree value through refx.jit's jax.jit call as
 *                its leaves (Flat, FlatSpec) and rebuilt in C.
 *   ptrmap.h     a pointer-keyed hash map for per-call identity tables.
 *
 * Naming: functions named refx_* are declared here and shared between
 * files; entry points are static and named after the Python function
 * (refx_deref is deref()), their docstrings <cfunc>__doc__.
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
#include <stdarg.h>
#include <stddef.h>
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
    PyTypeObject *PathContains_Type;
    PyTypeObject *PathFilter_Type;
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
    PyObject *trace_state;         /* .value is the current trace's weakref */
    PyObject *check_value;         /* check_value(value, trace_weakref) */
    PyObject *plain_types;         /* tuple of types that never hold tracers */
    PyObject *copyreg_newobj;      /* copyreg.__newobj__, for Ref.__reduce__ */
    PyObject *pytree_registry;     /* JAX's dict of registered node types */
    PyObject *registered_ref_type; /* a Ref subclass found in it, or NULL */
    PyObject *array_types; /* (numpy.ndarray, numpy.generic, jax.Array) */

    /* leaf predicates handed to jaxlib (tree.c) */
    PyObject *pred_deref; /* Value/Index are leaves */
    PyObject *pred_refx;  /* Ref/Value/Index/NOTHING are leaves */

    /* treedef -> path info, bounded (see partition.c) */
    PyObject *path_cache;
    /* Partition unflatten's templates: a list of UNFLAT_SLOTS items, each
     * None or (aux, template, hashes) (see partition.c) */
    PyObject *unflat_cache;
    /* flatten memos (flatmemo.c, refx_memo_flatten_eager; NULL until
     * first used): deref's and clone's of a tree of Refs, reref's of a
     * deref'ed tree */
    PyObject *ref_tree_memo;
    PyObject *reref_memo;

    /* interned strings */
    PyObject *str_value;
    PyObject *str_unflatten;
    PyObject *str_num_leaves;
    PyObject *str_idx;
    PyObject *str_key;
    PyObject *str_name;
    PyObject *str_flatten_up_to;
    PyObject *str_shape;
    PyObject *str_new; /* "__new__": flatmemo.c's namedtuple checks */
    PyObject *str_dtype;
    PyObject *str_position; /* _WriteRefused's attributes and reasons */
    PyObject *str_reason;
    PyObject *str_trace;
    PyObject *str_mutable;

    /* _core._WriteRefused(ValueError): a write refx_check_write refused,
     * raised by _write_refs with args (message, position) and the
     * attributes `position` and `reason` (see jit.c, write_refs) */
    PyObject *WriteRefused;

    /* refx.jit (jit.c) */
    PyTypeObject *Static_Type;
    PyTypeObject *Jit_Type;
    PyObject *jit_builder;     /* _jit._build_jit_entry (NULL before) */
    PyObject *jit_array_type;  /* jax's Array type: the only donated values */
    PyObject *jit_describe;    /* _jit: where a Ref sits, for errors */
    PyObject *jit_traceable;   /* _lift.traceable: may JAX take this leaf? */
    PyObject *jit_eval_trace;  /* jax's EvalTrace type: "outside any trace" */
    PyObject *jit_disable_jit; /* .value is jax_disable_jit */
    PyObject *jit_bound_changed; /* _jit: raises for a changed binding */

    /* refx.nn.Module's flatten (nnmodule.c) */
    PyTypeObject *ModuleFlatten_Type;

    /* a Ref's pytree value through jax.jit as its leaves (flatvalue.c) */
    PyTypeObject *Flat_Type;
    PyTypeObject *FlatSpec_Type;

    /* refx.mutable (ref.c): a ContextVar holding the filters of the
     * `with refx.mutable(f)` blocks this context is in (a tuple, innermost
     * last); unset outside every block */
    PyObject *mutable_var;
    /* declared shardings (issue 13): place(value, sharding, fname) puts a
     * new Ref's value on the sharding its metadata declares (ref.c,
     * ref_place); NULL when refx._compat installed none */
    PyObject *place;
    /* closed-over Refs (ref.c, refx/_lift.py): capture(ref, writing)
     * says what a read or write of a Ref that is not of the current trace
     * means while a refx transform traces (None: nothing special; a Ref:
     * its stand-in inside the trace) */
    PyObject *capture_hook;
    PyObject *capture_rediscover; /* _lift.Rediscover: trace again (jit.c) */

    /* Everything above is an object listed in STATE_OBJECTS (module.c,
     * which checks that the list covers them); plain data from here on. */

    /* Bumped by the flatten functions of Value/Index and of NOTHING; see
     * refx_flatten_leaves. */
    uint64_t deref_nodes_seen;
    uint64_t nothing_nodes_seen;
    uint64_t epoch; /* numbers deref/clone calls, for Ref marks */
    /* Bumped by pred_refx (and is_leaf predicates) for each dict node
     * whose keys are not all canonical (see tree.c, "Paths"). */
    uint64_t noncanonical_seen;
    /* The path cache's bounds and what it holds (partition.c). */
    Py_ssize_t path_cache_paths, path_cache_max_paths, path_cache_max_entries;
    Py_ssize_t registry_seen; /* size of pytree_registry when last checked */
    uint64_t eager_clock;    /* counts eager transform calls (jit.c, `used`) */
    uint64_t module_epoch;   /* counts nn.Module attribute changes (jit.c,
                              * check_binding; _core._module_changed) */
    Py_ssize_t unflat_paths; /* paths held by unflat_cache (partition.c) */
} refx_state;

extern PyModuleDef refx_module;
/* > 0 while some refx transform traces with closed-over Refs captured
 * (ref.c): the .value getter and setter consult capture_hook only then */
extern Py_ssize_t refx_capture_depth;
/* Refs made so far (ref.c): each Ref's `serial` is the count at its birth */
extern uint64_t refx_ref_serial;

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

/* The exception being raised, normalized, as a new reference; the error
 * indicator is cleared.  (PyErr_GetRaisedException, before 3.12 too.) */
static inline PyObject *
refx_take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyErr_NormalizeException(&et, &ev, &etb);
    if (ev != NULL && etb != NULL) {
        PyException_SetTraceback(ev, etb);
    }
    Py_XDECREF(et);
    Py_XDECREF(etb);
    return ev;
#endif
}

/* Is this weakref's referent gone?  (PyWeakref_GET_OBJECT is deprecated
 * in 3.13, PyWeakref_GetRef new in it.) */
static inline int
refx_weakref_is_dead(PyObject *wr)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj;
    if (PyWeakref_GetRef(wr, &obj) < 0) {
        PyErr_Clear();
        return 0;
    }
    Py_XDECREF(obj);
    return obj == NULL;
#else
    return PyWeakref_GET_OBJECT(wr) == Py_None;
#endif
}

/* Is this weakref's referent an instance of `type`?  (0 when dead.) */
static inline int
refx_weakref_is_a(PyObject *wr, PyTypeObject *type)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj;
    if (PyWeakref_GetRef(wr, &obj) < 0) {
        PyErr_Clear();
        return 0;
    }
    int r = obj != NULL && PyObject_TypeCheck(obj, type);
    Py_XDECREF(obj);
    return r;
#else
    PyObject *obj = PyWeakref_GET_OBJECT(wr);
    return obj != Py_None && PyObject_TypeCheck(obj, type);
#endif
}

/* Raise SystemError naming this file and line: internal invariants only. */
#define REFX_BUG(msg)                                                         \
    PyErr_Format(PyExc_SystemError, "refx internal error at %s:%d: %s",       \
                 __FILE__, __LINE__, (msg))

/* ------------------------------------------------------------------ */
/* objects                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    /* owned; never NULL after construction.  The Ref's value, or a Flat
     * refx.jit left pending (flatvalue.c, "Pending values"): read it only
     * through refx_ref_value, which makes the value first; only refx.jit's
     * snapshot and the stores read or write it as it is. */
    PyObject *held;
    PyObject *collection; /* owned, hashable; None by default */
    PyObject *trace;      /* owned weakref to the creating JAX trace */
    PyObject *weakreflist;
    /* Scratch marks for deref/clone (see deref.c): "this Ref is number
     * mark_index in the deref call numbered mark_epoch".  Meaningless
     * outside that call; never read by anything else. */
    uint64_t mark_epoch;
    Py_ssize_t mark_index;
    /* when it was made: refx_ref_serial at its creation (ref.c); a
     * capturing trace never captures a Ref made after it started */
    uint64_t serial;
    PyObject *metadata; /* owned: NULL, or (name, value) pairs by name */
    PyObject *kind;     /* owned cache: NULL, or its kind (see kinds.c) */
    /* owned cache: NULL, or the Value the last deref made of this Ref, reused
     * while its value, collection, kind and number still match (deref.c,
     * "Reused Values"); dropped by every store of a new value */
    PyObject *last;
    /* 0 from __new__ until __init__ or __setstate__ sets value and
     * collection; then 1, and collection and metadata are read-only. */
    char initialized;
} RefObject;

typedef struct {
    PyObject_HEAD
    Py_ssize_t index;
    PyObject *collection; /* owned */
    PyObject *kind;       /* owned: NULL for a plain Ref, else its kind */
    PyObject *flat;       /* lazily built ((children...), aux) */
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

/* Slot functions take PyObject * (the type the slot calls them with: a
 * function called through a pointer of another type is undefined behaviour)
 * and cast it with these. */
#define REFX_REF_CAST(op) ((RefObject *)(op))
#define REFX_DEREF_CAST(op) ((DerefObject *)(op))
#define REFX_VALUE_CAST(op) ((ValueObject *)(op))
#define REFX_PARTITION_CAST(op) ((PartitionObject *)(op))

#define Ref_Check(st, o) PyObject_TypeCheck((o), (st)->Ref_Type)
#define Deref_Check(st, o) PyObject_TypeCheck((o), (st)->Deref_Type)
#define Value_Check(st, o) PyObject_TypeCheck((o), (st)->Value_Type)
#define Index_Check(st, o) PyObject_TypeCheck((o), (st)->Index_Type)
#define Partition_Check(st, o) PyObject_TypeCheck((o), (st)->Partition_Type)

/* ------------------------------------------------------------------ */
/* cross-file functions                                                */
/* ------------------------------------------------------------------ */

/* module.c */
int refx_add_type(PyObject *module, PyType_Spec *spec, PyObject *base,
                  PyTypeObject **out, int public);

/* tree.c */
int refx_init_tree_types(PyObject *module, refx_state *st);
int refx_require_jax(refx_state *st, const char *fname);
/* refx_require_jax, and no Ref subclass is registered as a pytree node:
 * every function that walks a tree starts with it */
int refx_require_trees(refx_state *st, const char *fname);
void refx_unwrap_jax_error(void);
PyObject *refx_call_jax(PyObject *callable, PyObject *const *args,
                        size_t nargsf);
PyObject *refx_flatten(refx_state *st, PyObject *tree, PyObject *pred,
                       PyObject **treedef);
PyObject *refx_unflatten(refx_state *st, PyObject *treedef, PyObject *leaves);
PyObject *refx_path_from_keypath(refx_state *st, PyObject *keypath);
PyObject *refx_path_from_keypath_ex(refx_state *st, PyObject *keypath,
                                    int *canonical);
PyObject *refx_leaf_path_repr(refx_state *st, PyObject *tree, PyObject *pred,
                              Py_ssize_t i);
void refx_raise_at_leaf(refx_state *st, PyObject *exc, PyObject *tree,
                        PyObject *pred, Py_ssize_t i, const char *fmt, ...);
void refx_raise_at_path(PyObject *exc, PyObject *path, const char *fmt, ...);
void refx_vraise_at_leaf(refx_state *st, PyObject *exc, PyObject *tree,
                         PyObject *pred, Py_ssize_t i, const char *fmt,
                         va_list va);
void refx_vraise_at_path(PyObject *exc, PyObject *path, const char *fmt,
                         va_list va);
PyObject *refx_flatten_leaves(refx_state *st, PyObject *tree, PyObject *pred,
                              PyObject **treedef);
typedef struct {
    PyObject *dict; /* borrowed: the caller keeps it alive */
    Py_ssize_t pos;
    int in_step; /* keys have come in the dict's order so far */
} refx_dict_cursor;
void refx_cursor_init(refx_dict_cursor *cur, PyObject *dict);
PyObject *refx_cursor_get(refx_dict_cursor *cur, PyObject *key);
int refx_check_hashable(PyObject *o, const char *fname, const char *what);
PyObject *refx_current_trace(refx_state *st);
PyObject *refx_make_pred(refx_state *st, PyObject *user_is_leaf);

/* ref.c */
int refx_init_ref_types(PyObject *module, refx_state *st);
PyObject *refx_ref_create(refx_state *st, PyTypeObject *tp, PyObject *value,
                          PyObject *collection, PyObject *trace);
PyObject *refx_ref_create_kind(refx_state *st, PyObject *kind, PyObject *value,
                               PyObject *collection, PyObject *trace);
PyObject *refx_ref_create_untracked(refx_state *st, PyObject *value,
                                    PyObject *collection, PyObject *trace,
                                    int *track);
PyObject *refx_short_repr(PyObject *value);
/* The first clause of the trace-level refusal: callers that say where the
 * Ref is keep it and drop the Ref's own account. */
#define REFX_TRACE_SEED "Cannot mutate Ref from a different trace level"
/* Which check of refx_check_write refused a write; `reason` of
 * _core._WriteRefused is its name ("trace", "mutable", "value"). */
typedef enum {
    REFX_WRITE_OK = 0,
    REFX_REFUSED_TRACE,   /* the Ref belongs to another JAX trace */
    REFX_REFUSED_MUTABLE, /* refused by refx.mutable (or its filter raised) */
    REFX_REFUSED_VALUE,   /* refx_check_value refused the value */
} refx_refusal;
/* 0 if the write may happen; -1 with ValueError (or the error a check
 * raised) otherwise, and *why (unless NULL) says which check it was. */
int refx_check_write(refx_state *st, RefObject *ref, PyObject *value,
                     PyObject *current_trace, refx_refusal *why);
/* While refx_capture_depth > 0: the stand-in of a Ref in the innermost
 * capturing trace of this thread (a new reference), or Py_None (ref.c) */
PyObject *refx_ref_captured(RefObject *ref, PyObject *writing);
/* While refx_capture_depth > 0: each Ref of the list *leaves that such a
 * trace closes over replaced by its stand-in (a copy of the list is made
 * first unless only the caller holds it); 0, or -1 with an error (ref.c) */
int refx_substitute_captured(refx_state *st, PyObject **leaves,
                             PyObject *writing);
/* Turn the ValueError refx_check_write raised for write k into
 * _WriteRefused with .position, .reason (and .ref when `ref` is given). */
void refx_raise_refused(refx_state *st, Py_ssize_t k, refx_refusal why,
                        PyObject *ref);
/* Check every write, then store every value, old values released after the
 * last store: all or nothing (see ref.c).  -1: nothing written, *failed the
 * refused write's index (-1: none's), *why (unless NULL) its reason. */
int refx_write_all(refx_state *st, RefObject *const *refs,
                   PyObject *const *values, Py_ssize_t n, PyObject *trace,
                   Py_ssize_t *failed, refx_refusal *why);
int refx_check_value(refx_state *st, PyObject *value, PyObject *trace);
/* value is of a type that never holds tracers (scalars, str, arrays) */
int refx_is_plain_value(refx_state *st, PyObject *value);
/* Set ref.value (no checks), keeping GC tracking right. */
void refx_ref_store(refx_state *st, RefObject *ref, PyObject *value);
/* The value `ref` holds, made first if refx.jit left it pending: borrowed
 * (Py_None for a Ref not yet initialized), or NULL with an error (out of
 * memory).  Runs no Python code for a value refx.jit left pending. */
PyObject *refx_ref_value(refx_state *st, RefObject *ref);
/* The value made from `flat`, a Flat `ref` held at some moment (a new
 * reference; a snapshot's value, whatever `ref` holds now), kept in `ref`
 * if it still holds that Flat; NULL with an error. */
PyObject *refx_ref_made(refx_state *st, RefObject *ref, PyObject *flat);
PyObject *refx_value_create(refx_state *st, PyObject *value, Py_ssize_t index,
                            PyObject *collection);
PyObject *refx_index_create(refx_state *st, Py_ssize_t index,
                            PyObject *collection);
/* the same, recording a kind (NULL: plain) */
PyObject *refx_value_create_kind(refx_state *st, PyObject *value,
                                 Py_ssize_t index, PyObject *collection,
                                 PyObject *kind);
PyObject *refx_index_create_kind(refx_state *st, Py_ssize_t index,
                                 PyObject *collection, PyObject *kind);
/* the type of Ref a Value/Index stands for (borrowed) */
PyTypeObject *refx_deref_ref_type(refx_state *st, DerefObject *d);
PyObject *refx_collection_of(refx_state *st, PyObject *leaf);
/* an index argument: an int, 0 <= i < 2**63 */
int refx_parse_index(PyObject *o, const char *fname, Py_ssize_t *out);
extern PyMethodDef refx_ref_functions[];
/* treescope: the __treescope_repr__ attribute of Ref, Deref, NOTHING and
 * Partition (the rendering is in refx/_inspect.py) */
PyObject *refx_treescope_repr_get(PyObject *self, void *closure);
#define REFX_TREESCOPE_GETSET                                                 \
    {"__treescope_repr__", refx_treescope_repr_get, NULL,                     \
     "treescope's rendering hook (refx/_inspect.py).", NULL}

/* kinds.c */
/* A Ref's kind: NULL for a plain Ref without metadata, else
 * (type, metadata pairs, attribute pairs); *err = 1 on error. */
PyObject *refx_ref_kind(refx_state *st, RefObject *ref, int *err);
int refx_check_kind(refx_state *st, PyObject *kind, const char *fname);
/* metadata entries from keyword arguments (NULL, no error: none) */
PyObject *refx_metadata_from_dict(PyObject *kwargs, const char *fname);
PyObject *refx_pairs_to_dict(PyObject *pairs);
PyObject *refx_pairs_to_mapping(PyObject *pairs);
PyObject *refx_pairs_repr(PyObject *pairs);
/* a Python subclass's non-empty instance __dict__, or NULL (no error) */
PyObject *refx_ref_instance_dict(refx_state *st, PyObject *self);
/* the kind of Value(...)/Index(...)'s ref_type= and metadata= (NULL: plain) */
PyObject *refx_kind_from_args(refx_state *st, PyObject *ref_type,
                              PyObject *metadata, const char *fname);
PyObject *refx_kind_repr(refx_state *st, PyObject *kind);
int refx_parse_aux(refx_state *st, PyObject *aux, const char *fname,
                   Py_ssize_t *index, PyObject **collection, PyObject **kind);

/* deref.c */
extern PyMethodDef refx_deref_functions[];

/* filter.c */
int refx_init_filter_types(PyObject *module, refx_state *st);
int refx_filter_validate(refx_state *st, PyObject *filter, const char *fname,
                         Py_ssize_t pos);
int refx_filter_match(refx_state *st, PyObject *filter, PyObject *leaf);
/* the same, for the leaf at `path` (NULL: unknown; path filters raise) */
int refx_filter_match_at(refx_state *st, PyObject *filter, PyObject *path,
                         PyObject *leaf);

/* partition.c */
int refx_init_partition_types(PyObject *module, refx_state *st);
PyObject *refx_unflat_cache_new(void);
extern PyMethodDef refx_partition_functions[];

/* update.c */
extern PyMethodDef refx_update_functions[];

/* jit.c: refx.jit's per-call path, Static */
int refx_init_jit(PyObject *module, refx_state *st);

/* nnmodule.c: refx.nn.Module's flatten */
int refx_init_nn(PyObject *module, refx_state *st);
/* is f a _ModuleFlatten of the plain kind (no key paths)? */
int refx_module_flatten_is_plain(refx_state *st, PyObject *f);
PyObject *refx_module_flatten_frozen(PyObject *f);

/* flatmemo.c: refx.jit's argument flatten, checked against a memo of the
 * last one (*slot, owned; replaced when it does not fit); *hit (when not
 * NULL) says whether the memo gave the leaves */
PyObject *refx_memo_flatten(refx_state *st, PyObject **slot, PyObject *tree,
                            PyObject **treedef, int *hit);
/* deref's/clone's and reref's flatten (strict; *box, owned, made at first
 * use: two memos and the last three structures no memo took) */
PyObject *refx_memo_flatten_eager(refx_state *st, PyObject **box,
                                  PyObject *tree, PyObject *pred,
                                  PyObject **treedef);
int refx_init_memo(PyObject *module, refx_state *st);
/* value memos (flatmemo.c, for flatvalue.c): made from jaxlib's flatten of
 * a Ref's value (NULL, no error: not memoized), the leaves of a value by
 * one (NULL, no error: it does not fit), the value rebuilt from leaves */
PyObject *refx_value_memo(refx_state *st, PyObject *leaves, PyObject *treedef,
                          Py_ssize_t regsize);
PyObject *refx_value_memo_leaves(refx_state *st, PyObject *memo,
                                 PyObject *value);
/* pending: a value left pending (flatvalue.c), its classes checked then */
PyObject *refx_value_memo_rebuild(refx_state *st, PyObject *memo,
                                  PyObject *leaves, int pending);
int refx_value_memo_lazy(refx_state *st, PyObject *memo);
int refx_value_memo_plain_now(refx_state *st, PyObject *memo);
int refx_value_memo_same(PyObject *a, PyObject *b);

/* flatvalue.c: a Ref's pytree value through jax.jit as its leaves */
int refx_init_flat(PyObject *module, refx_state *st);
/* the value refx.jit passes for Ref number k: a Flat or the value itself
 * (*slots: the JitFunction's per-number memos, a list made at first use) */
PyObject *refx_flat_in(refx_state *st, PyObject **slots, Py_ssize_t k,
                       PyObject *value);
/* the written values as jax.jit returned them (a list), each Flat rebuilt
 * but those that may be left pending in their Refs (slots: as refx_flat_in's,
 * or NULL for none; written: the Ref number of each value): a new list, or
 * the list itself when it holds no Flat */
PyObject *refx_flat_restore_all(refx_state *st, PyObject *values,
                                PyObject *slots, PyObject *written);
/* Flat `flat`'s leaves (a tuple, borrowed; NULL once cleared) */
PyObject *refx_flat_leaves(PyObject *flat);
/* `v` made if it is a Flat, else itself: a new reference */
PyObject *refx_flat_value(refx_state *st, PyObject *v);

#endif /* REFX_H */
