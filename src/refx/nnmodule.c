/*
 * nnmodule.c: the pytree flatten of refx.nn.Module (the _ModuleFlatten
 * type).
 *
 * refx/nn/_module.py registers every Module subclass as a pytree node.
 * jaxlib calls the node's flatten for every submodule of every tree it
 * flattens, and refx.jit flattens its arguments (a model, an optimizer) on
 * every call: in Python that flatten was most of refx.nn's per-call cost.
 * _module.py makes two _ModuleFlatten objects at import, the flatten and
 * the flatten_with_keys it registers; each is a callable with its own
 * vectorcall, called by jaxlib as (module,) -> (children, aux).
 *
 * The rule is _module.py's (its essay says it, _module._is_state is it):
 * this file decides what it can exactly as _is_state would, and calls
 * _is_state for the rest.  What the Python loop did, step by step:
 *
 *   attributes  vars(m) (so a __getattribute__ or a __dict__ property is
 *               honoured, as vars() does; it must be a dict), walked as
 *               `for k, v in d.items()` walks it: its size is checked
 *               before every step, so a dict changed under the flatten (a
 *               value's __hash__ may run any code) raises the same
 *               RuntimeError.  The key and value being looked at are held,
 *               so a mutation never frees them.
 *   the mark    d.get("__refx_children__", ()) (set by unflatten): the
 *               names that are children whatever they hold (`k in
 *               forced`); the mark itself is skipped (`k == mark`).
 *   state?      mf_is_state, below: atoms and NOTHING by themselves;
 *               _module.py's two type caches (the very sets _is_state
 *               fills); Refs, Modules and Derefs of a type not cached yet
 *               by their type (cached then, as _is_state does); lists,
 *               tuples and dicts by their elements (a namedtuple or a dict
 *               subclass by _is_state's isinstance steps and iteration);
 *               anything else by calling _is_state.
 *   statics     (name, type(value), value); a value whose hash raises
 *               TypeError is (name, type(value), frozen(value)), frozen
 *               being _module._Frozen.  The type makes a static changed
 *               to an equal value of another type (2 -> 2.0, "a" -> a
 *               StrEnum member) another treedef, so another cache key
 *               (static_entry).
 *   children    their values, or (GetAttrKey(name), value) for the
 *               flatten_with_keys (made with key=GetAttrKey); the aux
 *               entry is (name, child), child being _module._CHILD.
 *
 * Nothing about a module is kept between calls.  What is kept: an aux
 * entry whose value is the child marker or an atom, reused when the same
 * two objects come again (kept_entry: a tuple less to make and free per
 * attribute), and what the type caches answered for a type (they only
 * grow, so the answer stands; mf_is_state).
 *
 * The children list and the aux tuple are made at the end from C arrays,
 * each filled as soon as it exists: no Python code (a __hash__ calling
 * gc.get_objects(), another thread) ever sees one half-filled.  The
 * object is immutable once made but for the kept pairs, replaced with no
 * Python code running, and the caches are sets that only grow, so threads
 * may flatten at once.  Like the leaf predicates (tree.c), it returns
 * NULL at once when jaxlib calls it with an exception already set (a
 * tree deeper than the recursion limit).
 *
 * Functions in this file: the state decision (mf_is_state and its
 * sequence, dict and iterator walks), the aux entries (kept_entry,
 * static_entry), the flatten (mf_vectorcall), the type, _module_changed
 * (jit_partial's epoch of Module changes), refx_init_nn.
 */
#include "refx.h"
#include "ptrmap.h"
#include <structmember.h>

/* Aux entries kept for reuse (see kept_entry), in sets of two ways, and
 * types whose answer the caches gave (see mf_is_state): powers of two. */
#define MF_KEPT_BITS 9
#define MF_KEPT (2 << MF_KEPT_BITS)
#define MF_TYPES 128

typedef struct {
    PyObject *type; /* owned (the cache that answered holds it anyway) */
    int state;
} mf_type_entry;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *state_types;  /* set: types whose values are state */
    PyObject *static_types; /* set: types whose values are not (NOTHING's
                             * aside) */
    PyObject *child;        /* the aux value of a child slot */
    PyObject *frozen;       /* frozen(v): an unhashable static's aux value */
    PyObject *is_state;     /* is_state(v): the rule, for the other values */
    PyObject *mark;         /* str: the attribute naming forced children */
    PyObject *key;          /* GetAttrKey, or NULL: children without keys */
    PyObject *nothing;      /* NOTHING */
    PyObject *ref_type;     /* Ref, Module, Deref: state, cache or not */
    PyObject *module_type;
    PyObject *deref_type;
    PyObject *node_types;          /* (Ref, Module, Deref), for isinstance */
    PyObject *seq_types;           /* (list, tuple), for isinstance */
    PyObject *str_values;          /* "values" */
    PyObject *str_dict;            /* "__dict__" */
    PyObject *kept[MF_KEPT];       /* aux entries for reuse, by address */
    mf_type_entry types[MF_TYPES]; /* the caches' answers, by address */
} ModuleFlattenObject;
#define MF_CAST(op) ((ModuleFlattenObject *)(op))

/* Attributes whose results fit on the stack (more: a heap buffer). */
#define MF_SMALL 24

/* ------------------------------------------------------------------ */
/* is v state?                                                          */
/* ------------------------------------------------------------------ */

static int mf_is_state(ModuleFlattenObject *mf, PyObject *v);

/* A value of one of _module._ATOMS' types, exactly (the static types it
 * starts with). */
static inline int
is_atom(PyObject *v)
{
    return v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) ||
           PyUnicode_CheckExact(v) || PyFloat_CheckExact(v) ||
           PyBytes_CheckExact(v) || PyComplex_CheckExact(v) ||
           PyType_CheckExact(v);
}

/* any(is_state(x) for x in seq), seq an exact list or tuple: read by
 * index with its current size, as the list iterator reads it (is_state
 * may run code that changes the list).  seq is held by the caller. */
static int
seq_any(ModuleFlattenObject *mf, PyObject *seq)
{
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *x = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        int r = mf_is_state(mf, x);
        Py_DECREF(x);
        if (r != 0) {
            return r;
        }
    }
    return 0;
}

/* One step of `for k, v in d.items()` (or of d.values()) over a dict,
 * with the dict iterator's checks: the size before every step (it started
 * at *n), and no more items than that.  1: *k and *v are set (borrowed),
 * 0: the end, -1: the RuntimeError Python raises. */
typedef struct {
    Py_ssize_t pos, n, left;
} dict_walk;

static void
dict_walk_init(dict_walk *w, PyObject *d)
{
    w->pos = 0;
    w->n = w->left = PyDict_GET_SIZE(d);
}

static int
dict_walk_next(dict_walk *w, PyObject *d, PyObject **k, PyObject **v)
{
    if (PyDict_GET_SIZE(d) != w->n) {
        PyErr_SetString(PyExc_RuntimeError,
                        "dictionary changed size during iteration");
        return -1;
    }
    if (!PyDict_Next(d, &w->pos, k, v)) {
        return 0;
    }
    if (w->left-- == 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "dictionary keys changed during iteration");
        return -1;
    }
    return 1;
}

/* any(is_state(x) for x in d.values()), d an exact dict.  d is held by
 * the caller. */
static int
dict_any(ModuleFlattenObject *mf, PyObject *d)
{
    dict_walk w;
    dict_walk_init(&w, d);
    PyObject *k, *x;
    int r;
    while ((r = dict_walk_next(&w, d, &k, &x)) == 1) {
        Py_INCREF(x);
        r = mf_is_state(mf, x);
        Py_DECREF(x);
        if (r != 0) {
            return r;
        }
    }
    return r;
}

/* any(is_state(x) for x in iterable), by the iterator protocol. */
static int
iter_any(ModuleFlattenObject *mf, PyObject *iterable)
{
    PyObject *it = PyObject_GetIter(iterable), *x;
    if (it == NULL) {
        return -1;
    }
    int r = 0;
    while (r == 0 && (x = PyIter_Next(it)) != NULL) {
        r = mf_is_state(mf, x);
        Py_DECREF(x);
    }
    Py_DECREF(it);
    return r == 0 && PyErr_Occurred() ? -1 : r;
}

/* A list, tuple or dict of a subclass: _is_state's steps, in C, for a
 * namedtuple (an optax state) is common.  -2: not decided here (a
 * Ref/Module/Deref by isinstance, whose type _is_state caches). */
static int
subclass_any(ModuleFlattenObject *mf, PyObject *v)
{
    int r = PyObject_IsInstance(v, mf->node_types);
    if (r != 0) {
        return r < 0 ? -1 : -2;
    }
    if ((r = PyObject_IsInstance(v, mf->seq_types)) != 0) {
        return r < 0 ? -1 : iter_any(mf, v);
    }
    if ((r = PyObject_IsInstance(v, (PyObject *)&PyDict_Type)) != 0) {
        if (r < 0) {
            return -1;
        }
        PyObject *values = PyObject_CallMethodNoArgs(v, mf->str_values);
        if (values == NULL) {
            return -1;
        }
        r = iter_any(mf, values);
        Py_DECREF(values);
        return r;
    }
    return -2;
}

/* Note what the caches said of type t (state: 1, static: 0) in its
 * entry, and return it.  The caches only grow, so what they said stays
 * true: the entry needs no checking but its type's identity, which it
 * holds.  (Unless t's metaclass hashes or compares types its own way: a
 * set's answer for such a t may change, so it is not noted.)  Replacing
 * an entry runs no Python code (its type is in a cache too). */
static int
remember(mf_type_entry *e, PyTypeObject *t, int state)
{
    if (Py_TYPE(t)->tp_hash != PyType_Type.tp_hash ||
        Py_TYPE(t)->tp_richcompare != PyType_Type.tp_richcompare) {
        return state;
    }
    PyObject *old = e->type;
    e->type = Py_NewRef((PyObject *)t);
    e->state = state;
    Py_XDECREF(old);
    return state;
}

/* _module._is_state(v): 1 state, 0 not, -1 error.  v is held by the
 * caller.
 *
 * The two sets are _module.py's private caches; they only grow, and only
 * by _is_state's rule: the type of a value that is a Ref, Module, Deref
 * (by isinstance) or NOTHING or an array goes in _STATE_TYPES, the type of
 * a leaf that is none of those in _STATIC_TYPES, which starts with the
 * atoms' types.  So an exact atom is never state (no lookup needed), and
 * NOTHING or a value whose type is a subtype of Ref, Module or Deref
 * always is: the lookups would say the same or, before the first time,
 * the isinstance after them would (and the type is cached here as
 * _is_state caches it). */
static int
mf_is_state(ModuleFlattenObject *mf, PyObject *v)
{
    if (is_atom(v)) {
        return 0;
    }
    if (v == mf->nothing) {
        return 1;
    }
    PyTypeObject *t = Py_TYPE(v);
    mf_type_entry *e = &mf->types[refx_ptr_hash(t) & (MF_TYPES - 1)];
    if (e->type == (PyObject *)t) {
        return e->state; /* (v is not NOTHING) */
    }
    int r = PySet_Contains(mf->state_types, (PyObject *)t);
    if (r == 0) {
        r = PySet_Contains(mf->static_types, (PyObject *)t);
        if (r > 0) {
            return remember(e, t, 0);
        }
    }
    if (r != 0) {
        return r < 0 ? -1 : remember(e, t, 1);
    }
    if (PyType_IsSubtype(t, (PyTypeObject *)mf->ref_type) ||
        PyType_IsSubtype(t, (PyTypeObject *)mf->module_type) ||
        PyType_IsSubtype(t, (PyTypeObject *)mf->deref_type)) {
        /* seen for the first time: cached, as _is_state caches it */
        if (PySet_Add(mf->state_types, (PyObject *)t) < 0) {
            return -1;
        }
        return remember(e, t, 1);
    }
    if (PyList_Check(v) || PyTuple_Check(v) || PyDict_Check(v)) {
        if (Py_EnterRecursiveCall(" in refx.nn.Module's flatten")) {
            return -1;
        }
        if (PyDict_CheckExact(v)) {
            r = dict_any(mf, v);
        }
        else if (PyList_CheckExact(v) || PyTuple_CheckExact(v)) {
            r = seq_any(mf, v);
        }
        else {
            r = subclass_any(mf, v);
        }
        Py_LeaveRecursiveCall();
        if (r != -2) {
            return r;
        }
    }
    /* anything else, and a type seen for the first time: _is_state
     * itself, which fills the caches */
    PyObject *res = PyObject_CallOneArg(mf->is_state, v);
    if (res == NULL) {
        return -1;
    }
    r = PyObject_IsTrue(res);
    Py_DECREF(res);
    return r;
}

/* ------------------------------------------------------------------ */
/* the flatten                                                          */
/* ------------------------------------------------------------------ */

/* A new 2-tuple (a, b). */
static PyObject *
pair_of(PyObject *a, PyObject *b)
{
    PyObject *pair = PyTuple_New(2);
    if (pair != NULL) {
        PyTuple_SET_ITEM(pair, 0, Py_NewRef(a));
        PyTuple_SET_ITEM(pair, 1, Py_NewRef(b));
    }
    return pair;
}

/* A value that refers to no other object (so keeping it costs nothing). */
static inline int
is_plain_atom(PyObject *v)
{
    return v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) ||
           PyUnicode_CheckExact(v) || PyFloat_CheckExact(v) ||
           PyBytes_CheckExact(v) || PyComplex_CheckExact(v);
}

/* A new tuple (name, value), or (name, type(value), value) when typed. */
static PyObject *
entry_of(PyObject *name, PyObject *value, PyObject *type)
{
    PyObject *e = PyTuple_New(type != NULL ? 3 : 2);
    if (e != NULL) {
        PyTuple_SET_ITEM(e, 0, Py_NewRef(name));
        if (type != NULL) {
            PyTuple_SET_ITEM(e, 1, Py_NewRef(type));
        }
        PyTuple_SET_ITEM(e, type != NULL ? 2 : 1, Py_NewRef(value));
    }
    return e;
}

/* The aux entry of a child, (name, marker), or of a static plain atom,
 * (name, type(value), value).  A model's aux is the same entries call
 * after call, and making and freeing them was a visible part of a
 * flatten, so each is kept in a small table by the addresses of its name
 * and value and given again when the same two objects come (the
 * attribute name is interned, a flag is True or False, a size the same
 * int object call after call).  An immutable tuple of the same objects:
 * only its identity differs from a new one.  Nothing kept refers to
 * anything but a str, an atom or the marker and a builtin type, so
 * keeping them costs nothing, and dropping one runs no Python code. */
static PyObject *
kept_entry(ModuleFlattenObject *mf, PyObject *name, PyObject *value)
{
    /* multiplicative hashing of the two addresses, the top bits */
    uint64_t h =
        ((uint64_t)(uintptr_t)name >> 4 ^ (uint64_t)(uintptr_t)value << 9) *
        0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> (64 - MF_KEPT_BITS)) * 2;
    for (size_t w = i; w < i + 2; w++) {
        PyObject *p = mf->kept[w];
        if (p != NULL && PyTuple_GET_ITEM(p, 0) == name &&
            PyTuple_GET_ITEM(p, PyTuple_GET_SIZE(p) - 1) == value) {
            return Py_NewRef(p);
        }
    }
    PyObject *p = entry_of(
        name, value, value == mf->child ? NULL : (PyObject *)Py_TYPE(value));
    if (p != NULL && PyUnicode_CheckExact(name)) {
        PyObject *old = mf->kept[i + 1];
        mf->kept[i + 1] = mf->kept[i];
        mf->kept[i] = Py_NewRef(p);
        Py_XDECREF(old);
    }
    return p;
}

/* The aux entry of a static: (name, type(value), value) if value is
 * hashable, else (name, type(value), frozen(value)) (hash's TypeError,
 * and only that, means unhashable).  The type is there because jaxlib
 * compares aux data with ==, and 2 == 2.0 == True, "a" == a StrEnum
 * member: without it a static changed to an equal value of another type
 * would be the same treedef, the same refx.jit (and jax.jit) cache key,
 * and run the trace made for the old value (an int32 array where the new
 * value makes a float32 one).  Static arguments are compared the same
 * way (jit.c, "split").  It comes before the value, so two entries of
 * different types compare unequal without running the values' __eq__
 * (np.int32(2) == (1, 2) is an array, whose truth raises). */
static PyObject *
static_entry(ModuleFlattenObject *mf, PyObject *name, PyObject *v)
{
    if (is_plain_atom(v)) {
        return kept_entry(mf, name, v); /* hashable, by its type */
    }
    if (PyObject_Hash(v) != -1) { /* the type after it: __hash__ is code */
        return entry_of(name, v, (PyObject *)Py_TYPE(v));
    }
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
        return NULL;
    }
    PyErr_Clear();
    PyObject *type = Py_NewRef(Py_TYPE(v)); /* _Frozen may run v's code */
    PyObject *frozen = PyObject_CallOneArg(mf->frozen, v);
    PyObject *e = frozen != NULL ? entry_of(name, frozen, type) : NULL;
    Py_XDECREF(frozen);
    Py_DECREF(type);
    return e;
}

/* k == mark */
static inline int
is_mark(ModuleFlattenObject *mf, PyObject *k)
{
    if (k == mf->mark) {
        return 1;
    }
    if (PyUnicode_CheckExact(k)) {
        return PyUnicode_GET_LENGTH(k) == PyUnicode_GET_LENGTH(mf->mark) &&
               PyUnicode_Compare(k, mf->mark) == 0;
    }
    return PyObject_RichCompareBool(k, mf->mark, Py_EQ);
}

/* flatten(module) -> (children, aux) */
static PyObject *
mf_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
              PyObject *kwnames)
{
    if (PyErr_Occurred()) {
        return NULL; /* see tree.c's leaf predicates: never run with an
                      * exception set */
    }
    ModuleFlattenObject *mf = MF_CAST(self);
    if (mf->state_types == NULL) {
        return REFX_BUG("_ModuleFlatten used after it was cleared");
    }
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "a Module's flatten takes one argument, the module");
        return NULL;
    }
    PyObject *stack[2 * MF_SMALL];
    PyObject **aux_items = stack, **kids = NULL;
    Py_ssize_t n = 0, naux = 0, nkids = 0;
    PyObject *forced = NULL, *k = NULL, *v = NULL, *children = NULL,
             *aux = NULL, *res = NULL;

    PyObject *d = PyObject_GetAttr(args[0], mf->str_dict); /* vars(m) */
    if (d == NULL) {
        goto error;
    }
    if (!PyDict_CheckExact(d)) {
        PyErr_Format(PyExc_TypeError,
                     "refx.nn.Module %.200s: vars() is a %.200s, not a dict",
                     Py_TYPE(args[0])->tp_name, Py_TYPE(d)->tp_name);
        goto error;
    }
    forced = PyDict_GetItemWithError(d, mf->mark);
    if (forced == NULL && PyErr_Occurred()) {
        goto error;
    }
    Py_XINCREF(forced);
    n = PyDict_GET_SIZE(d);
    if (n > MF_SMALL) {
        aux_items = PyMem_New(PyObject *, 2 * n);
        if (aux_items == NULL) {
            PyErr_NoMemory();
            goto error;
        }
    }
    kids = aux_items + n;

    /* for k, v in d.items() */
    dict_walk w;
    dict_walk_init(&w, d);
    PyObject *bk, *bv;
    for (;;) {
        int step = dict_walk_next(&w, d, &bk, &bv);
        if (step < 0) {
            goto error;
        }
        if (step == 0) {
            break;
        }
        k = Py_NewRef(bk);
        v = Py_NewRef(bv);
        int r = is_mark(mf, k);
        if (r < 0) {
            goto error;
        }
        if (r == 0) {
            r = forced != NULL ? PySequence_Contains(forced, k) : 0;
            if (r == 0) {
                r = mf_is_state(mf, v);
            }
            if (r < 0) {
                goto error;
            }
            PyObject *entry;
            if (r) {
                PyObject *kid;
                if (mf->key == NULL) {
                    kid = Py_NewRef(v);
                }
                else {
                    PyObject *key = PyObject_CallOneArg(mf->key, k);
                    if (key == NULL) {
                        goto error;
                    }
                    kid = pair_of(key, v);
                    Py_DECREF(key);
                    if (kid == NULL) {
                        goto error;
                    }
                }
                kids[nkids++] = kid;
                entry = kept_entry(mf, k, mf->child);
            }
            else {
                entry = static_entry(mf, k, v);
            }
            if (entry == NULL) {
                goto error;
            }
            aux_items[naux++] = entry;
        }
        Py_CLEAR(k);
        Py_CLEAR(v);
    }

    /* each result filled as soon as it exists (see the top) */
    children = PyList_New(nkids);
    if (children == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < nkids; i++) {
        PyList_SET_ITEM(children, i, kids[i]);
    }
    nkids = 0;
    aux = PyTuple_New(naux);
    if (aux == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < naux; i++) {
        PyTuple_SET_ITEM(aux, i, aux_items[i]);
    }
    naux = 0;
    res = PyTuple_New(2);
    if (res == NULL) {
        goto error;
    }
    PyTuple_SET_ITEM(res, 0, children);
    PyTuple_SET_ITEM(res, 1, aux);
    children = aux = NULL;

error:
    for (Py_ssize_t i = 0; i < naux; i++) {
        Py_DECREF(aux_items[i]);
    }
    for (Py_ssize_t i = 0; i < nkids; i++) {
        Py_DECREF(kids[i]);
    }
    if (aux_items != stack) {
        PyMem_Free(aux_items);
    }
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(forced);
    Py_XDECREF(d);
    Py_XDECREF(children);
    Py_XDECREF(aux);
    return res;
}

int
refx_module_flatten_is_plain(refx_state *st, PyObject *f)
{
    return Py_TYPE(f) == st->ModuleFlatten_Type &&
           MF_CAST(f)->state_types != NULL && MF_CAST(f)->key == NULL;
}

/* The class a plain _ModuleFlatten wraps unhashable statics in (borrowed;
 * f must pass refx_module_flatten_is_plain). */
PyObject *
refx_module_flatten_frozen(PyObject *f)
{
    return MF_CAST(f)->frozen;
}

/* ------------------------------------------------------------------ */
/* the type                                                             */
/* ------------------------------------------------------------------ */

/* Every object a _ModuleFlatten holds but the kept pairs: traverse,
 * clear and dealloc go by this list. */
#define MF_OBJECTS(X)                                                         \
    X(state_types)                                                            \
    X(static_types)                                                           \
    X(child)                                                                  \
    X(frozen)                                                                 \
    X(is_state)                                                               \
    X(mark)                                                                   \
    X(key)                                                                    \
    X(nothing)                                                                \
    X(ref_type)                                                               \
    X(module_type)                                                            \
    X(deref_type)                                                             \
    X(node_types)                                                             \
    X(seq_types)                                                              \
    X(str_values)                                                             \
    X(str_dict)

static PyObject *
mf_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"state_types", "static_types", "child",
                             "frozen",      "is_state",     "mark",
                             "module_type", "key",          NULL};
    PyObject *state_types, *static_types, *child, *frozen, *is_state, *mark,
        *module_type, *key = Py_None;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "O!O!OOOUO!|$O:_ModuleFlatten", kwlist, &PySet_Type,
            &state_types, &PySet_Type, &static_types, &child, &frozen,
            &is_state, &mark, &PyType_Type, &module_type, &key)) {
        return NULL;
    }
    if (!PyCallable_Check(frozen) || !PyCallable_Check(is_state) ||
        (key != Py_None && !PyCallable_Check(key))) {
        PyErr_SetString(PyExc_TypeError,
                        "_ModuleFlatten: frozen, is_state and key (unless "
                        "None) must be callables");
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL) {
        return NULL;
    }
    ModuleFlattenObject *self = PyObject_GC_New(ModuleFlattenObject, tp);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = mf_vectorcall;
    self->state_types = Py_NewRef(state_types);
    self->static_types = Py_NewRef(static_types);
    self->child = Py_NewRef(child);
    self->frozen = Py_NewRef(frozen);
    self->is_state = Py_NewRef(is_state);
    self->mark = Py_NewRef(mark);
    self->key = key == Py_None ? NULL : Py_NewRef(key);
    self->nothing = Py_NewRef(st->nothing);
    self->ref_type = Py_NewRef(st->Ref_Type);
    self->module_type = Py_NewRef(module_type);
    self->deref_type = Py_NewRef(st->Deref_Type);
    self->node_types = PyTuple_Pack(3, st->Ref_Type, module_type,
                                    st->Deref_Type); /* Ref | Module | Deref */
    self->seq_types = PyTuple_Pack(2, &PyList_Type, &PyTuple_Type);
    self->str_values = PyUnicode_InternFromString("values");
    self->str_dict = PyUnicode_InternFromString("__dict__");
    memset(self->kept, 0, sizeof(self->kept));
    memset(self->types, 0, sizeof(self->types));
    PyObject_GC_Track(self);
    if (self->node_types == NULL || self->seq_types == NULL ||
        self->str_values == NULL || self->str_dict == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
mf_traverse(PyObject *op, visitproc visit, void *arg)
{
    ModuleFlattenObject *self = MF_CAST(op);
    Py_VISIT(Py_TYPE(self));
#define VISIT(name) Py_VISIT(self->name);
    MF_OBJECTS(VISIT)
#undef VISIT
    for (size_t i = 0; i < MF_KEPT; i++) {
        Py_VISIT(self->kept[i]);
    }
    for (size_t i = 0; i < MF_TYPES; i++) {
        Py_VISIT(self->types[i].type);
    }
    return 0;
}

/* The vectorcall and is_state check state_types first: a cleared object
 * (torn down as part of a cycle, yet still called) raises instead of
 * crashing. */
static int
mf_clear(PyObject *op)
{
    ModuleFlattenObject *self = MF_CAST(op);
#define CLEAR(name) Py_CLEAR(self->name);
    MF_OBJECTS(CLEAR)
#undef CLEAR
    for (size_t i = 0; i < MF_KEPT; i++) {
        Py_CLEAR(self->kept[i]);
    }
    for (size_t i = 0; i < MF_TYPES; i++) {
        Py_CLEAR(self->types[i].type);
    }
    return 0;
}

static void
mf_dealloc(PyObject *op)
{
    ModuleFlattenObject *self = MF_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    mf_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
mf_repr(PyObject *op)
{
    ModuleFlattenObject *self = MF_CAST(op);
    return PyUnicode_FromFormat(
        "<refx.nn.Module %s>",
        self->key != NULL ? "flatten_with_keys" : "flatten");
}

static PyObject *
mf_is_state_py(PyObject *op, PyObject *v)
{
    ModuleFlattenObject *self = MF_CAST(op);
    if (self->state_types == NULL) {
        return REFX_BUG("_ModuleFlatten used after it was cleared");
    }
    int r = mf_is_state(self, v);
    return r < 0 ? NULL : Py_NewRef(r ? Py_True : Py_False);
}

static PyMethodDef mf_methods[] = {
    {"is_state", mf_is_state_py, METH_O,
     "is_state($self, value, /)\n--\n\n"
     "Whether value holds state, by _module._is_state's rule (for tests)."},
    {NULL},
};

static PyMemberDef mf_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET,
     offsetof(ModuleFlattenObject, vectorcall), READONLY, NULL},
    {NULL},
};

PyDoc_STRVAR(
    mf_doc,
    "_ModuleFlatten(state_types, static_types, child, frozen, is_state, "
    "mark, module_type, *, key=None)\n"
    "--\n\n"
    "The pytree flatten of refx.nn.Module, made once by refx/nn/_module.py\n"
    "(see the top of nnmodule.c): flatten(module) -> (children, aux).\n"
    "With key=GetAttrKey, the flatten_with_keys: children are (key, value).");

static PyType_Slot mf_slots[] = {
    {Py_tp_doc, (void *)mf_doc},     {Py_tp_new, mf_new},
    {Py_tp_call, PyVectorcall_Call}, {Py_tp_traverse, mf_traverse},
    {Py_tp_clear, mf_clear},         {Py_tp_dealloc, mf_dealloc},
    {Py_tp_repr, mf_repr},           {Py_tp_methods, mf_methods},
    {Py_tp_members, mf_members},     {0, NULL},
};

static PyType_Spec mf_spec = {
    .name = "refx._core._ModuleFlatten",
    .basicsize = sizeof(ModuleFlattenObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = mf_slots,
};

/* _core._module_changed(): an nn.Module attribute was set or deleted
 * (Module.__setattr__, __delattr__, set_attributes).  jit_partial's bound
 * trees are checked again at its next call (jit.c, check_binding). */
static PyObject *
module_changed(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_get_state(module)->module_epoch++;
    Py_RETURN_NONE;
}

static PyMethodDef nn_functions[] = {
    {"_module_changed", module_changed, METH_NOARGS,
     "_module_changed($module, /)\n--\n\n"
     "Note that an nn.Module attribute changed: jit_partial checks its "
     "bound trees again at its next call."},
    {NULL, NULL, 0, NULL},
};

int
refx_init_nn(PyObject *module, refx_state *st)
{
    if (PyModule_AddFunctions(module, nn_functions) < 0) {
        return -1;
    }
    return refx_add_type(module, &mf_spec, NULL, &st->ModuleFlatten_Type, 1);
}
