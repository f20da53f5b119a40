/*
 * flatmemo.c: refx.jit's flatten of its arguments, checked against the
 * last call's instead of made again.
 *
 * Every refx.jit call flattens its arguments (a model, an optimizer, a
 * batch) before anything else, and jaxlib's flatten was the largest piece
 * of refx.jit's own cost: a treedef built node by node, dict keys sorted,
 * a registry lookup per node (~45,000 instructions for a model of 30 Refs
 * in 37 nodes, a fifth of a whole eval step's call).  Mostly the arguments
 * have the structure they had last time.  So each JitFunction keeps a memo
 * of its last flatten, and a call first walks its arguments against it:
 * where everything is as the memo says, the leaves come out of that walk
 * and the treedef is the memo's own object (which also makes the cache
 * key's comparison an identity test); at the first difference the walk
 * stops and jaxlib flattens, as before, and a new memo is made from that.
 * deref, clone and reref flatten the same way, each through a memo in the
 * module state (deref.c, "Memoized flattens"); reref's flattens with
 * Value/Index as leaves (pred_deref), which the walk honours for free:
 * that predicate is a function of the exact type alone (Value and Index
 * are final), so a LEAF record of type Value is what jaxlib with the
 * predicate would say of any Value, and no container type the walk
 * descends into is one the predicate takes.
 *
 * deref's, clone's and reref's memos (refx_memo_flatten_eager) serve
 * every call of the program, not one function's, so they keep two memos,
 * the last one made or hit first, and make a memo only for a structure
 * that came before: one of the last three no memo took (a memo costs a
 * walk of the treedef through Python calls, about a flatten), or one
 * whose memo missed on a leaf's type or a static's identity (made again
 * once, then marked), and only in place of a memo not hit lately.  Trees
 * that alternate get a memo each, three in turn keep two, a structure
 * seen once costs no memo, memos a workload left are dropped (see the
 * box, below).
 *
 * Strictness.  refx.jit's memo compares a module's aux data with ==, as
 * its cache key and jax.jit's compare treedefs: an equal treedef is the
 * same call to them.  deref, clone and reref build their output from the
 * memo's treedef, so for them (strict) each static entry's value
 * must be the very object the memo holds: a static set to 2.0 where the
 * memo has 2 is a miss, and the output gets 2.0 (memo_same_aux).
 *
 * The memo is a tuple
 *
 *     (treedef, nodes, objs, nleaves, registry size)
 *
 * `nodes` a bytes object of memo_node records in jaxlib's flatten order
 * (preorder, a dict's children in sorted-key order), `objs` the objects
 * they name.  A record is one of
 *
 *   LEAF    the object's exact type (objs): a leaf is a leaf of that type
 *           (never a tuple subclass: jaxlib asks those for _fields anew)
 *   NONE    None (a node with no children for jaxlib)
 *   TUPLE   an exact tuple of `arity` items
 *   NAMEDTUPLE  a tuple of the exact type objs[obj][0] (a tuple subclass
 *           whose class has as many _fields as it has items, not
 *           registered: jaxlib's namedtuple), `arity` items, and
 *           hasattr(o, "_fields") (jaxlib's own per-object test)
 *   LIST    an exact list of `arity` items
 *   DICT    an exact dict with exactly the keys of objs[obj] (a dict
 *           {key: position among the sorted keys}), each an exact str
 *   MODULE  a refx.nn.Module of the exact type objs[obj][0], whose
 *           flatten (objs[obj][2], the very rule jaxlib calls for that
 *           type) gives `arity` children and aux data == objs[obj][1]
 *   NODE    (value memos only) refx's own Value, Index, NOTHING or
 *           Partition, of the exact type objs[obj][0], whose registered
 *           C flatten objs[obj][2] gives `arity` children and aux data ==
 *           objs[obj][1] (a Value's compared field by field, as == of the
 *           tuple it would build); objs[obj][3] is its C unflatten
 *
 * Value memos (flatvalue.c: a Ref's pytree value passed to jax.jit as its
 * leaves) take refx's own nodes, since an optimiser state over a deref'ed
 * model is made of them, and are also rebuilt from: refx_value_memo_rebuild
 * makes from leaves what jaxlib's unflatten of the memo's treedef makes
 * (tuples, lists, dicts in sorted-key order, a namedtuple by calling its
 * class, a NODE by calling its C unflatten with its aux data), without
 * the treedef walk and the registry calls.
 *
 * Why a walk that agrees with the memo gives jaxlib's answer.  jaxlib
 * decides a node by its exact type (tuple, list, dict, None, a registered
 * type) and a leaf otherwise; a dict's children come in the order of its
 * sorted keys, and a treedef is equal to another when the kinds, arities,
 * dict keys and custom aux data are equal (==).  The walk checks exactly
 * those: exact types, arities, the key set (each key an exact str found
 * among the memo's: equal exact strs sort alike, where a str subclass, a
 * StrEnum or np.str_ may not, and makes another treedef), aux data (==).
 * What it takes on trust is a fact about types that cannot change unseen:
 * which types are registered pytree nodes.  Registration cannot be undone
 * and JAX's registry dict only grows, so the memo keeps the dict's size
 * and is dropped when it grows (the same test as tree.c's check for
 * registered Ref subclasses; a node registered on a jaxlib registry object
 * directly, bypassing jax.tree_util, is not seen, as jax.jit does not see
 * it either).  A Module is memoized only if the rule registered for its
 * type is refx's own _ModuleFlatten (nnmodule.c).  Every other node kind
 * jaxlib knows (OrderedDict, defaultdict, dataclasses, refx's
 * Partition/Value/Static, any custom node, dict keys other than exact str)
 * makes the tree unmemoized: such a call flattens with jaxlib every time,
 * and the memo then holds just (treedef,) so the next call of the same
 * structure does not try again.
 *
 * A memo is made from jaxlib's own answer, never from a second look at the
 * tree: the treedef's node data and children (node_data(), children()) and
 * the types of the leaves it returned.  Python code run by jaxlib's flatten
 * (a static attribute's __hash__, another thread) may change the tree after
 * jaxlib has passed a node; a memo made by walking the tree again would then
 * describe the new tree next to the old treedef, and every later call in
 * the new state would get the old treedef (found by the hostile review).
 *
 * Python code can run during a walk (a Module rule's _is_state, a static's
 * __eq__ comparing aux data; the pass over a dict's exact str keys runs
 * none): every container being walked
 * and every child being descended into is held, lists and dicts are
 * re-measured, and the memo itself is held, so another thread replacing it
 * frees nothing in use.  A walk that fails with an ordinary exception
 * falls back to jaxlib's flatten, which raises what it raises.
 *
 * Functions in this file: the check walk (memo_same_aux, value_same_aux,
 * memo_check, memo_check_items, memo_check_dict), the build from a treedef
 * (memo_build, memo_make, namedtuple_plain_new), value memos (refx_value_memo,
 * refx_value_memo_leaves, refx_value_memo_rebuild, refx_value_memo_lazy,
 * refx_value_memo_same), refx_memo_flatten, refx_memo_flatten_eager (the box: eager_read,
 * eager_write; a hit: eager_hit; a miss: eager_plan, eager_apply),
 * _core._memo_flatten, _flatten_memos and _clear_flatten_memos (tests).
 */
#include "refx.h"
#include <string.h>

enum {
    M_LEAF,
    M_NONE,
    M_TUPLE,
    M_NAMEDTUPLE,
    M_LIST,
    M_DICT,
    M_MODULE,
    M_NODE
};

typedef struct {
    uint32_t kind;
    uint32_t arity;
    uint32_t obj; /* index into objs (LEAF, DICT, MODULE) */
} memo_node;

/* deeper trees are left to jaxlib (no memo, no RecursionError of ours) */
#define MEMO_MAX_DEPTH 100

/* ------------------------------------------------------------------ */
/* the check                                                            */
/* ------------------------------------------------------------------ */

typedef struct {
    refx_state *st;
    const memo_node *nodes;
    Py_ssize_t nnodes, at;
    PyObject *objs;   /* borrowed from the held memo */
    PyObject *leaves; /* a list of nleaves, filled from the front */
    Py_ssize_t nleaves, k;
    int strict; /* a module's statics must be the memo's own objects */
} memo_walk;

/* A module's aux data, as the memo's walk compares it: == for refx.jit
 * (its cache key compares treedefs with ==, as jax.jit's does), and for
 * deref, reref and clone each static entry's value the very object
 * the memo's treedef holds, since their output is unflattened with that
 * treedef: a static set to 2.0 where the memo has 2 (equal, not the same)
 * must come out as 2.0.  1 same, 0 not, -1 error. */
static int
memo_same_aux(const memo_walk *w, PyObject *aux, PyObject *memo_aux,
              PyObject *frozen)
{
    if (!w->strict) {
        return PyObject_RichCompareBool(aux, memo_aux, Py_EQ);
    }
    if (aux == memo_aux) {
        return 1;
    }
    if (!PyTuple_CheckExact(aux) || !PyTuple_CheckExact(memo_aux) ||
        PyTuple_GET_SIZE(aux) != PyTuple_GET_SIZE(memo_aux)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(aux); i++) {
        PyObject *a = PyTuple_GET_ITEM(aux, i),
                 *b = PyTuple_GET_ITEM(memo_aux, i);
        if (a == b) {
            continue;
        }
        /* (name, child) or (name, type, value) entries: exact str names
         * equal, types identical, values identical */
        Py_ssize_t size = PyTuple_Check(a) ? PyTuple_GET_SIZE(a) : 0;
        if (!PyTuple_CheckExact(a) || !PyTuple_CheckExact(b) ||
            PyTuple_GET_SIZE(b) != size || size < 2 || size > 3 ||
            (size == 3 && PyTuple_GET_ITEM(a, 1) != PyTuple_GET_ITEM(b, 1)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(a, 0)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(b, 0)) ||
            PyUnicode_Compare(PyTuple_GET_ITEM(a, 0),
                              PyTuple_GET_ITEM(b, 0)) != 0) {
            return 0;
        }
        PyObject *va = PyTuple_GET_ITEM(a, size - 1),
                 *vb = PyTuple_GET_ITEM(b, size - 1);
        if (va == vb) {
            continue;
        }
        /* an unhashable static is wrapped anew on every flatten: the same
         * if it wraps the very same object */
        if (frozen == NULL || (PyObject *)Py_TYPE(va) != frozen ||
            (PyObject *)Py_TYPE(vb) != frozen) {
            return 0;
        }
        PyObject *ia = PyObject_GetAttr(va, w->st->str_value);
        PyObject *ib =
            ia != NULL ? PyObject_GetAttr(vb, w->st->str_value) : NULL;
        int same = ia != NULL && ib != NULL && ia == ib;
        Py_XDECREF(ia);
        Py_XDECREF(ib);
        if (PyErr_Occurred()) {
            return -1;
        }
        if (!same) {
            return 0;
        }
    }
    return 1;
}

static int memo_check(memo_walk *w, PyObject *o, int depth);

/* Aux data as a value memo compares it: the same object, or of the same
 * type and, for exact tuples, item by item so, else ==.  Stricter than
 * jaxlib's ==, because the traced function rebuilds the value with the
 * memo's aux objects: a collection True where the memo has 1 (equal,
 * another type) must not be rebuilt as 1 (found by the hostile review).
 * 1 same, 0 not, -1 error. */
static int
aux_same(PyObject *a, PyObject *b, int depth)
{
    if (a == b) {
        return 1;
    }
    if (Py_TYPE(a) != Py_TYPE(b) || depth > MEMO_MAX_DEPTH) {
        return 0;
    }
    if (!PyTuple_CheckExact(a)) {
        return PyObject_RichCompareBool(a, b, Py_EQ);
    }
    if (PyTuple_GET_SIZE(a) != PyTuple_GET_SIZE(b)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(a); i++) {
        int r = aux_same(PyTuple_GET_ITEM(a, i), PyTuple_GET_ITEM(b, i),
                         depth + 1);
        if (r <= 0) {
            return r;
        }
    }
    return 1;
}

/* Is the aux data value_flatten gives Value `d`, (index, collection) or
 * (index, collection, kind), aux_same as `aux`?  1 yes, 0 no, -1 error. */
static int
value_same_aux(DerefObject *d, PyObject *aux)
{
    Py_ssize_t size = d->kind == NULL ? 2 : 3;
    if (!PyTuple_CheckExact(aux) || PyTuple_GET_SIZE(aux) != size ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(aux, 0))) {
        return 0;
    }
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(aux, 0));
    if (index == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (index != d->index) {
        return 0;
    }
    int r = aux_same(d->collection, PyTuple_GET_ITEM(aux, 1), 0);
    if (r > 0 && size == 3) {
        r = aux_same(d->kind, PyTuple_GET_ITEM(aux, 2), 0);
    }
    return r;
}

/* Check child `o` (held by the caller across the call). */
static int
memo_check_held(memo_walk *w, PyObject *o, int depth)
{
    Py_INCREF(o);
    int r = memo_check(w, o, depth);
    Py_DECREF(o);
    return r;
}

/* The items of tuple `o` (held by the caller; a tuple's items cannot
 * change under the walk), checked in order. */
static int
memo_check_items(memo_walk *w, PyObject *o, Py_ssize_t arity, int depth)
{
    for (Py_ssize_t i = 0; i < arity; i++) {
        int r = memo_check(w, PyTuple_GET_ITEM(o, i), depth + 1);
        if (r <= 0) {
            return r;
        }
    }
    return 1;
}

/* A DICT node: `o` an exact dict with exactly the keys of `pos` ({key:
 * sorted position}), each an exact str, its values checked in that order.
 * The pass over the dict runs no Python code (exact str keys hash and
 * compare in C), so the values it collects are held before any can go. */
static int
memo_check_dict(memo_walk *w, PyObject *o, PyObject *pos, Py_ssize_t arity,
                int depth)
{
    if (!PyDict_CheckExact(o) || PyDict_GET_SIZE(o) != arity) {
        return 0;
    }
    /* vals[i] the value of the i-th key in sorted order, keys[i] that key */
    PyObject *stack[32], **vals = stack, **keys;
    if (arity > 16) {
        vals = PyMem_Calloc(2 * (size_t)arity, sizeof(PyObject *));
        if (vals == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    else {
        memset(stack, 0, sizeof(stack));
    }
    keys = vals + arity;
    Py_ssize_t it = 0, seen = 0;
    PyObject *k, *v;
    int r = 1;
    while (r > 0 && PyDict_Next(o, &it, &k, &v)) {
        PyObject *at = PyUnicode_CheckExact(k) ? PyDict_GetItem(pos, k) : NULL;
        Py_ssize_t i = at != NULL ? PyLong_AsSsize_t(at) : -1;
        if (i < 0 || i >= arity || vals[i] != NULL) {
            r = 0;
        }
        else {
            vals[i] = v; /* borrowed for now; held below, no code between */
            keys[i] = k;
            seen++;
        }
    }
    r = r > 0 && seen == arity;
    for (Py_ssize_t i = 0; i < 2 * arity; i++) {
        Py_XINCREF(vals[i]);
    }
    for (Py_ssize_t i = 0; r > 0 && i < arity; i++) {
        r = memo_check(w, vals[i], depth + 1);
    }
    /* Python code the walk ran (a static's __hash__, a namedtuple's
     * _fields) may have changed this dict: jaxlib reads each value after
     * walking the ones before it, so a value replaced meanwhile is one the
     * walk must not have used.  Still the same keys and values?  (Exact
     * str keys: the lookups run no Python code.) */
    if (r > 0 && PyDict_GET_SIZE(o) != arity) {
        r = 0;
    }
    for (Py_ssize_t i = 0; r > 0 && i < arity; i++) {
        PyObject *now = PyDict_GetItemWithError(o, keys[i]);
        r = now == vals[i] ? 1 : (PyErr_Occurred() ? -1 : 0);
    }
    for (Py_ssize_t i = 0; i < 2 * arity; i++) {
        Py_XDECREF(vals[i]);
    }
    if (vals != stack) {
        PyMem_Free(vals);
    }
    return r;
}

/* 1: `o` is as the memo's next node says (its leaves appended); 0: it is
 * not; -1: error. */
static int
memo_check(memo_walk *w, PyObject *o, int depth)
{
    if (w->at >= w->nnodes || depth > MEMO_MAX_DEPTH) {
        return 0;
    }
    const memo_node *n = &w->nodes[w->at++];
    Py_ssize_t arity = (Py_ssize_t)n->arity;
    switch (n->kind) {
    case M_LEAF:
        if ((PyObject *)Py_TYPE(o) != PyTuple_GET_ITEM(w->objs, n->obj) ||
            w->k >= w->nleaves) {
            return 0;
        }
        PyList_SET_ITEM(w->leaves, w->k++, Py_NewRef(o));
        return 1;
    case M_NONE:
        return o == Py_None;
    case M_TUPLE:
        if (!PyTuple_CheckExact(o) || PyTuple_GET_SIZE(o) != arity) {
            return 0;
        }
        return memo_check_items(w, o, arity, depth);
    case M_NAMEDTUPLE: {
        /* (type, "_fields"): jaxlib asks hasattr(o, "_fields") of every
         * tuple subclass on every flatten, so the walk asks it too */
        PyObject *spec = PyTuple_GET_ITEM(w->objs, n->obj);
        if ((PyObject *)Py_TYPE(o) != PyTuple_GET_ITEM(spec, 0) ||
            PyTuple_GET_SIZE(o) != arity ||
            !PyObject_HasAttr(o, PyTuple_GET_ITEM(spec, 1))) {
            return 0;
        }
        return memo_check_items(w, o, arity, depth);
    }
    case M_LIST:
        if (!PyList_CheckExact(o)) {
            return 0;
        }
        for (Py_ssize_t i = 0; i < arity; i++) {
            if (PyList_GET_SIZE(o) != arity) {
                return 0;
            }
            int r = memo_check_held(w, PyList_GET_ITEM(o, i), depth + 1);
            if (r <= 0) {
                return r;
            }
        }
        return PyList_GET_SIZE(o) == arity;
    case M_DICT:
        return memo_check_dict(w, o, PyTuple_GET_ITEM(w->objs, n->obj), arity,
                               depth);
    case M_MODULE: {
        PyObject *spec = PyTuple_GET_ITEM(w->objs, n->obj);
        if ((PyObject *)Py_TYPE(o) != PyTuple_GET_ITEM(spec, 0)) {
            return 0;
        }
        PyObject *flat =
            PyObject_Vectorcall(PyTuple_GET_ITEM(spec, 2), &o, 1, NULL);
        if (flat == NULL) {
            return -1;
        }
        int r = 0;
        if (PyTuple_CheckExact(flat) && PyTuple_GET_SIZE(flat) == 2 &&
            PyList_CheckExact(PyTuple_GET_ITEM(flat, 0)) &&
            PyList_GET_SIZE(PyTuple_GET_ITEM(flat, 0)) == arity) {
            r = memo_same_aux(
                w, PyTuple_GET_ITEM(flat, 1), PyTuple_GET_ITEM(spec, 1),
                refx_module_flatten_frozen(PyTuple_GET_ITEM(spec, 2)));
            PyObject *kids = PyTuple_GET_ITEM(flat, 0); /* held by flat */
            for (Py_ssize_t i = 0; r > 0 && i < arity; i++) {
                if (PyList_GET_SIZE(kids) != arity) {
                    r = 0;
                    break;
                }
                r = memo_check_held(w, PyList_GET_ITEM(kids, i), depth + 1);
            }
        }
        Py_DECREF(flat);
        return r;
    }
    case M_NODE: {
        /* refx's own Value/Index/NOTHING/Partition (value memos only):
         * (type, aux, flatten, unflatten); the C flatten jaxlib calls, its
         * aux compared as jaxlib compares node data (==) */
        PyObject *spec = PyTuple_GET_ITEM(w->objs, n->obj);
        if ((PyObject *)Py_TYPE(o) != PyTuple_GET_ITEM(spec, 0)) {
            return 0;
        }
        if (Py_TYPE(o) == w->st->Value_Type) {
            /* a Value's aux data is (index, collection[, kind]), its one
             * child its value: compared as jaxlib would compare the aux
             * tuple value_flatten builds, without building it */
            int r =
                value_same_aux((DerefObject *)o, PyTuple_GET_ITEM(spec, 1));
            return r <= 0 ? r
                          : memo_check_held(w, ((ValueObject *)o)->value,
                                            depth + 1);
        }
        PyObject *flat =
            PyObject_Vectorcall(PyTuple_GET_ITEM(spec, 2), &o, 1, NULL);
        if (flat == NULL) {
            return -1;
        }
        int r = 0;
        PyObject *kids =
            PyTuple_CheckExact(flat) && PyTuple_GET_SIZE(flat) == 2
                ? PyTuple_GET_ITEM(flat, 0)
                : NULL; /* held by flat */
        if (kids != NULL &&
            (PyTuple_CheckExact(kids) || PyList_CheckExact(kids)) &&
            PySequence_Fast_GET_SIZE(kids) == arity) {
            PyObject *aux = PyTuple_GET_ITEM(flat, 1);
            r = aux_same(aux, PyTuple_GET_ITEM(spec, 1), 0);
            for (Py_ssize_t i = 0; r > 0 && i < arity; i++) {
                if (PySequence_Fast_GET_SIZE(kids) != arity) {
                    r = 0;
                    break;
                }
                r = memo_check_held(w, PySequence_Fast_GET_ITEM(kids, i),
                                    depth + 1);
            }
        }
        Py_DECREF(flat);
        return r;
    }
    default:
        REFX_BUG("flatmemo: unknown node kind");
        return -1;
    }
}

/* ------------------------------------------------------------------ */
/* the build                                                            */
/* ------------------------------------------------------------------ */

typedef struct {
    refx_state *st;
    memo_node *nodes;
    Py_ssize_t nnodes, cap;
    PyObject *objs;   /* list */
    PyObject *leaves; /* jaxlib's leaves, taken in order */
    Py_ssize_t k;
    int refx_nodes; /* a value memo: refx's own nodes taken (M_NODE) */
} memo_build_ctx;

static int
memo_push(memo_build_ctx *b, uint32_t kind, Py_ssize_t arity, PyObject *obj)
{
    if (arity > UINT32_MAX || PyList_GET_SIZE(b->objs) >= UINT32_MAX) {
        return 0; /* absurd sizes: not memoized */
    }
    if (b->nnodes == b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 64;
        memo_node *nodes = PyMem_Realloc(b->nodes, cap * sizeof(memo_node));
        if (nodes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->nodes = nodes;
        b->cap = cap;
    }
    memo_node *n = &b->nodes[b->nnodes++];
    n->kind = kind;
    n->arity = (uint32_t)arity;
    n->obj = (uint32_t)PyList_GET_SIZE(b->objs);
    if (obj != NULL && PyList_Append(b->objs, obj) < 0) {
        return -1;
    }
    return 1;
}

/* A DICT node's object: {key: position in sorted order} for jaxlib's
 * sorted keys `keys` (a list), or NULL (no error) when a key is not an
 * exact str. */
static PyObject *
memo_positions(PyObject *keys)
{
    PyObject *pos = PyDict_New();
    if (pos == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        PyObject *at = PyUnicode_CheckExact(k) ? PyLong_FromSsize_t(i) : NULL;
        if (at == NULL || PyDict_SetItem(pos, k, at) < 0) {
            Py_XDECREF(at);
            Py_DECREF(pos);
            return NULL;
        }
        Py_DECREF(at);
    }
    return pos;
}

/* Is `tp` a class collections.namedtuple made (or a subclass of one that
 * adds no __new__, __init__ or metaclass)?  Then tp(*items) is
 * tuple.__new__(tp, items): its generated __new__ calls nothing else, and
 * a value memo's rebuild makes it so without running Python code
 * (memo_rebuild_node).  Recognised by that __new__: a lambda compiled from
 * "<string>" with one argument per field after the class, whose globals
 * are the namespace namedtuple evaluated it in (no builtins, a
 * "namedtuple_" __name__, tuple.__new__ as _tuple_new; found by the
 * hostile review: globals alone took a module defining _tuple_new).  The
 * staticmethod found (borrowed: the class dict holds it), or NULL.  Read
 * from the class dicts (_PyType_Lookup), a function's globals and code:
 * runs no Python code, raises nothing.  A class changed later (a new
 * __new__ or __init__) is seen by namedtuple_still_plain. */
static PyObject *
namedtuple_plain_new(refx_state *st, PyTypeObject *tp, Py_ssize_t nfields)
{
    if (Py_TYPE(tp) != &PyType_Type ||
        tp->tp_init != PyBaseObject_Type.tp_init ||
        tp->tp_alloc != PyType_GenericAlloc) {
        return NULL;
    }
    PyObject *sm = _PyType_Lookup(tp, st->str_new); /* borrowed */
    /* tuple.__new__, as namedtuple took it (not tp_dict: a static
     * type's dict is per interpreter from CPython 3.12, tp_dict NULL) */
    PyObject *real = _PyType_Lookup(&PyTuple_Type, st->str_new);
    if (sm == NULL || real == NULL || !Py_IS_TYPE(sm, &PyStaticMethod_Type)) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(sm, "__func__"); /* a member */
    int plain = 0;
    if (fn != NULL && PyFunction_Check(fn) &&
        PyDict_CheckExact(PyFunction_GET_GLOBALS(fn))) {
        PyObject *g = PyFunction_GET_GLOBALS(fn);
        PyCodeObject *code = (PyCodeObject *)PyFunction_GET_CODE(fn);
        PyObject *tn = PyDict_GetItemString(g, "_tuple_new");
        PyObject *bi = PyDict_GetItemString(g, "__builtins__");
        PyObject *nm = PyDict_GetItemString(g, "__name__");
        plain =
            tn == real && bi != NULL && PyDict_CheckExact(bi) &&
            PyDict_GET_SIZE(bi) == 0 && nm != NULL &&
            PyUnicode_CheckExact(nm) && PyUnicode_AsUTF8(nm) != NULL &&
            strncmp(PyUnicode_AsUTF8(nm), "namedtuple_", 11) == 0 &&
            PyCode_Check(code) &&
            PyUnicode_CompareWithASCIIString(code->co_filename, "<string>") ==
                0 &&
            PyUnicode_CompareWithASCIIString(code->co_name, "<lambda>") == 0 &&
            code->co_argcount == nfields + 1;
    }
    Py_XDECREF(fn);
    PyErr_Clear();
    return plain ? sm : NULL;
}

/* Is the namedtuple of memo record `spec` (class, "_fields", plain
 * __new__ or None) made by tuple.__new__ still: the class's __new__ the
 * one found when the memo was made, and no __init__ or metaclass since? */
static int
namedtuple_still_plain(refx_state *st, PyObject *spec)
{
    PyObject *cls = PyTuple_GET_ITEM(spec, 0), *sm = PyTuple_GET_ITEM(spec, 2);
    return sm != Py_None && Py_TYPE(cls) == &PyType_Type &&
           ((PyTypeObject *)cls)->tp_init == PyBaseObject_Type.tp_init &&
           _PyType_Lookup((PyTypeObject *)cls, st->str_new) == sm;
}

/* A tuple subclass jaxlib flattened with no aux data: its namedtuple kind
 * (a tuple subclass with _fields), or a node registered on a jaxlib
 * registry object directly (unseen in JAX's registry dict).  Memoized only
 * when the class itself has _fields, as many as the node's children (a
 * namedtuple's own signature); the walk asks hasattr(o, "_fields") again
 * on every call, as jaxlib does.  The class's _fields is read from the
 * dicts of its MRO (_PyType_Lookup), as an instance's lookup finds it:
 * no Python code runs (a metaclass's __getattribute__ is not asked, as
 * jaxlib's flatten never asks it), so nothing can raise here that a plain
 * flatten would not, and nothing raised needs swallowing. */
static int
memo_namedtuple(memo_build_ctx *b, PyObject *type, Py_ssize_t n)
{
    PyObject *name = PyUnicode_InternFromString("_fields");
    if (name == NULL) {
        return -1;
    }
    PyObject *fields = PyType_Check(type)
                           ? _PyType_Lookup((PyTypeObject *)type, name)
                           : NULL; /* borrowed */
    int r = 0;
    if (fields != NULL && PyTuple_Check(fields) &&
        PyTuple_GET_SIZE(fields) == n) {
        PyObject *sm = namedtuple_plain_new(b->st, (PyTypeObject *)type, n);
        PyObject *spec =
            PyTuple_Pack(3, type, name, sm != NULL ? sm : Py_None);
        r = spec != NULL ? memo_push(b, M_NAMEDTUPLE, n, spec) : -1;
        Py_XDECREF(spec);
    }
    Py_DECREF(name);
    return r;
}

/* Describe the subtree of treedef `td` (jaxlib's, with its node data and
 * children as jaxlib recorded them): 1 done, 0 a node kind the memo does
 * not take, -1 error. */
static int
memo_build(memo_build_ctx *b, PyObject *td, int depth)
{
    refx_state *st = b->st;
    if (depth > MEMO_MAX_DEPTH) {
        return 0;
    }
    PyObject *nd = PyObject_CallMethod(td, "node_data", NULL);
    if (nd == NULL) {
        return -1;
    }
    if (nd == Py_None) { /* a leaf: the next of jaxlib's leaves */
        Py_DECREF(nd);
        if (b->k >= PyList_GET_SIZE(b->leaves)) {
            return 0;
        }
        PyObject *leaf = PyList_GET_ITEM(b->leaves, b->k++);
        if (PyTuple_Check(leaf)) {
            return 0; /* a tuple subclass is a leaf until it has _fields */
        }
        return memo_push(b, M_LEAF, 0, (PyObject *)Py_TYPE(leaf));
    }
    PyObject *kids = NULL, *obj = NULL;
    int r = 0;
    if (!PyTuple_Check(nd) || PyTuple_GET_SIZE(nd) != 2) {
        goto done;
    }
    kids = PyObject_CallMethod(td, "children", NULL);
    if (kids == NULL || !PyList_Check(kids)) {
        r = kids == NULL ? -1 : 0;
        goto done;
    }
    PyObject *type = PyTuple_GET_ITEM(nd, 0), *data = PyTuple_GET_ITEM(nd, 1);
    Py_ssize_t n = PyList_GET_SIZE(kids);
    if (type == (PyObject *)&PyTuple_Type) {
        r = memo_push(b, M_TUPLE, n, NULL);
    }
    else if (type == (PyObject *)&PyList_Type) {
        r = memo_push(b, M_LIST, n, NULL);
    }
    else if (type == (PyObject *)Py_TYPE(Py_None)) {
        r = n == 0 ? memo_push(b, M_NONE, 0, NULL) : 0;
    }
    else if (type == (PyObject *)&PyDict_Type) {
        if (PyList_Check(data) && PyList_GET_SIZE(data) == n) {
            obj = memo_positions(data);
            r = obj != NULL ? memo_push(b, M_DICT, n, obj)
                            : (PyErr_Occurred() ? -1 : 0);
        }
    }
    else { /* a registered node: only refx.nn.Module's own rule is taken */
        PyObject *entry = PyDict_GetItemWithError(st->pytree_registry, type);
        if (entry == NULL && !PyErr_Occurred() && PyType_Check(type) &&
            PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type) &&
            data == Py_None) {
            r = memo_namedtuple(b, type, n);
        }
        else if (entry == NULL) {
            r = PyErr_Occurred() ? -1 : 0;
        }
        else if (b->refx_nodes && PyTuple_Check(entry) &&
                 PyTuple_GET_SIZE(entry) >= 2 &&
                 (type == (PyObject *)st->Value_Type ||
                  type == (PyObject *)st->Index_Type ||
                  type == (PyObject *)st->Nothing_Type ||
                  type == (PyObject *)st->Partition_Type)) {
            obj = PyTuple_Pack(4, type, data, PyTuple_GET_ITEM(entry, 0),
                               PyTuple_GET_ITEM(entry, 1));
            r = obj != NULL ? memo_push(b, M_NODE, n, obj) : -1;
        }
        else if (PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) >= 1 &&
                 refx_module_flatten_is_plain(st,
                                              PyTuple_GET_ITEM(entry, 0))) {
            obj = PyTuple_Pack(3, type, data, PyTuple_GET_ITEM(entry, 0));
            r = obj != NULL ? memo_push(b, M_MODULE, n, obj) : -1;
        }
    }
    for (Py_ssize_t i = 0; r > 0 && i < n; i++) {
        r = memo_build(b, PyList_GET_ITEM(kids, i), depth + 1);
    }
done:
    Py_XDECREF(obj);
    Py_XDECREF(kids);
    Py_DECREF(nd);
    return r;
}

/* The memo of a tree whose jaxlib flatten gave `leaves` and `treedef`,
 * made from those two alone (not from the tree, which Python code run by
 * the flatten may have changed since): the 5-tuple, or (treedef,) when the
 * tree is not memoized; NULL on error.  `regsize`: the registry's size as
 * read before the flatten. */
static PyObject *
memo_make(refx_state *st, PyObject *leaves, PyObject *treedef,
          Py_ssize_t regsize, int refx_nodes)
{
    memo_build_ctx b = {st, NULL, 0, 0, PyList_New(0), leaves, 0, refx_nodes};
    PyObject *res = NULL, *nodes = NULL, *objs = NULL;
    if (b.objs == NULL) {
        goto done;
    }
    int r = memo_build(&b, treedef, 0);
    if (r < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            goto done;
        }
        PyErr_Clear();
        r = 0;
    }
    if (r == 0 || b.k != PyList_GET_SIZE(leaves) ||
        PyDict_GET_SIZE(st->pytree_registry) != regsize) {
        res = PyTuple_Pack(1, treedef);
        goto done;
    }
    nodes = PyBytes_FromStringAndSize(
        (const char *)b.nodes, b.nnodes * (Py_ssize_t)sizeof(memo_node));
    objs = PyList_AsTuple(b.objs);
    PyObject *nl = PyLong_FromSsize_t(PyList_GET_SIZE(leaves));
    PyObject *rs = PyLong_FromSsize_t(regsize);
    if (nodes != NULL && objs != NULL && nl != NULL && rs != NULL) {
        res = PyTuple_Pack(5, treedef, nodes, objs, nl, rs);
    }
    Py_XDECREF(nl);
    Py_XDECREF(rs);
done:
    PyMem_Free(b.nodes);
    Py_XDECREF(b.objs);
    Py_XDECREF(nodes);
    Py_XDECREF(objs);
    return res;
}

/* ------------------------------------------------------------------ */
/* refx_memo_flatten                                                    */
/* ------------------------------------------------------------------ */

/* The leaves of `tree` from the memo in *slot, or NULL with no error when
 * it does not fit. */
static PyObject *
memo_try(refx_state *st, PyObject *memo, PyObject *tree, int strict,
         PyObject **treedef, int *costly)
{
    if (PyTuple_GET_SIZE(memo) != 5 ||
        PyDict_GET_SIZE(st->pytree_registry) !=
            PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 4))) {
        return NULL;
    }
    PyObject *nodes = PyTuple_GET_ITEM(memo, 1);
    memo_walk w = {
        st,
        (const memo_node *)PyBytes_AS_STRING(nodes),
        PyBytes_GET_SIZE(nodes) / (Py_ssize_t)sizeof(memo_node),
        0,
        PyTuple_GET_ITEM(memo, 2),
        NULL,
        PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 3)),
        0,
        strict,
    };
    /* NULL items until filled: kept out of the collector's sight (a
     * gc.get_objects() from Python code the walk runs would read them) */
    w.leaves = PyList_New(w.nleaves);
    if (w.leaves == NULL) {
        return NULL;
    }
    PyObject_GC_UnTrack(w.leaves);
    int r = memo_check(&w, tree, 0);
    /* the registry again: Python code run by the walk may have registered
     * a type a leaf already passed has */
    if (r > 0 && w.k == w.nleaves && w.at == w.nnodes &&
        PyDict_GET_SIZE(st->pytree_registry) ==
            PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 4))) {
        PyObject_GC_Track(w.leaves);
        *treedef = Py_NewRef(PyTuple_GET_ITEM(memo, 0));
        return w.leaves;
    }
    Py_DECREF(w.leaves);
    if (costly != NULL) {
        *costly = w.at * 4 > w.nnodes; /* a miss past a quarter of it */
    }
    if (r < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* jaxlib's flatten raises what it raises */
    }
    return NULL;
}

PyObject *
refx_memo_flatten(refx_state *st, PyObject **slot, PyObject *tree,
                  PyObject **treedef, int *hit)
{
    if (hit != NULL) {
        *hit = 0;
    }
    if (st->pytree_registry == NULL) {
        return refx_flatten(st, tree, NULL, treedef);
    }
    PyObject *memo = Py_XNewRef(*slot); /* held: another thread may swap */
    if (memo != NULL) {
        PyObject *leaves = memo_try(st, memo, tree, 0, treedef, NULL);
        if (leaves != NULL || PyErr_Occurred()) {
            if (hit != NULL) {
                *hit = leaves != NULL;
            }
            Py_DECREF(memo);
            return leaves;
        }
    }
    Py_ssize_t regsize = PyDict_GET_SIZE(st->pytree_registry);
    PyObject *leaves = refx_flatten(st, tree, NULL, treedef);
    if (leaves == NULL) {
        Py_XDECREF(memo);
        return NULL;
    }
    if (memo != NULL && PyTuple_GET_SIZE(memo) == 1) {
        /* not memoized last time: the same structure is not tried again */
        int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(memo, 0),
                                            *treedef, Py_EQ);
        if (same != 0) {
            Py_DECREF(memo);
            if (same < 0) {
                Py_CLEAR(*treedef);
                Py_CLEAR(leaves);
            }
            return leaves;
        }
    }
    Py_XDECREF(memo);
    PyObject *fresh = memo_make(st, leaves, *treedef, regsize, 0);
    if (fresh == NULL) {
        Py_CLEAR(*treedef);
        Py_DECREF(leaves);
        return NULL;
    }
    Py_XSETREF(*slot, fresh);
    return leaves;
}

/* ------------------------------------------------------------------ */
/* value memos (flatvalue.c)                                            */
/* ------------------------------------------------------------------ */

/* The memo of a Ref's pytree value from jaxlib's flatten of it (`leaves`,
 * `treedef`; `regsize` the registry's size before that flatten), refx's
 * own nodes (Value, Index, NOTHING, Partition) taken as M_NODE records:
 * the 5-tuple, or NULL with no error when the value has a node the memo
 * does not take. */
PyObject *
refx_value_memo(refx_state *st, PyObject *leaves, PyObject *treedef,
                Py_ssize_t regsize)
{
    PyObject *m = memo_make(st, leaves, treedef, regsize, 1);
    if (m != NULL && PyTuple_GET_SIZE(m) != 5) {
        Py_CLEAR(m);
    }
    return m;
}

/* The leaves (a list) of `value` as value memo `memo` describes it (aux
 * data compared with ==, as jaxlib compares treedefs), or NULL with no
 * error when it does not fit. */
PyObject *
refx_value_memo_leaves(refx_state *st, PyObject *memo, PyObject *value)
{
    PyObject *td = NULL;
    PyObject *leaves = memo_try(st, memo, value, 0, &td, NULL);
    Py_XDECREF(td);
    return leaves;
}

typedef struct {
    refx_state *st;
    const memo_node *nodes;
    Py_ssize_t nnodes, at;
    PyObject *objs;
    PyObject *const *leaves;
    Py_ssize_t nleaves, k;
    int pending; /* a value left pending: its classes checked when written */
} memo_rebuild_ctx;

/* Is `aux` the aux data a Value or Index flattens to, as refx made it:
 * (index, collection) or (index, collection, kind), the index an exact
 * int and the kind (class, metadata, attributes)?  Then direct_deref makes
 * the node as its unflatten would, without refx_parse_aux's checks (which
 * hash the collection and kind): the memo took the aux from refx's own
 * flatten of a Value or Index, which was made checked. */
static int
direct_deref_aux(PyObject *aux)
{
    if (!PyTuple_CheckExact(aux) ||
        (PyTuple_GET_SIZE(aux) != 2 && PyTuple_GET_SIZE(aux) != 3) ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(aux, 0))) {
        return 0;
    }
    PyObject *kind =
        PyTuple_GET_SIZE(aux) == 3 ? PyTuple_GET_ITEM(aux, 2) : NULL;
    return kind == NULL ||
           (PyTuple_CheckExact(kind) && PyTuple_GET_SIZE(kind) == 3 &&
            PyType_Check(PyTuple_GET_ITEM(kind, 0)));
}

/* A Value (of `kids`' one item) or Index from aux data direct_deref_aux
 * took.  New reference, or NULL with an error. */
static PyObject *
direct_deref(refx_state *st, PyObject *type, PyObject *aux, PyObject *kids)
{
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(aux, 0));
    if (index == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *collection = PyTuple_GET_ITEM(aux, 1);
    PyObject *kind =
        PyTuple_GET_SIZE(aux) == 3 ? PyTuple_GET_ITEM(aux, 2) : NULL;
    if (type == (PyObject *)st->Index_Type) {
        return PyTuple_GET_SIZE(kids) == 0
                   ? refx_index_create_kind(st, index, collection, kind)
                   : REFX_BUG("flatmemo: an Index with children");
    }
    return PyTuple_GET_SIZE(kids) == 1
               ? refx_value_create_kind(st, PyTuple_GET_ITEM(kids, 0), index,
                                        collection, kind)
               : REFX_BUG("flatmemo: a Value without its one child");
}

/* The object of the memo's next node, made from the next leaves as
 * jaxlib's unflatten of the memo's treedef makes it: a tuple, list, dict
 * (keys in sorted order), namedtuple (its class called with the
 * children), or refx node (its registered C unflatten called with its aux
 * data and the children).  New reference, or NULL with an error. */
static PyObject *
memo_rebuild_node(memo_rebuild_ctx *r, int depth)
{
    if (r->at >= r->nnodes || depth > MEMO_MAX_DEPTH) {
        return REFX_BUG("flatmemo: a rebuild ran past its memo");
    }
    const memo_node *n = &r->nodes[r->at++];
    Py_ssize_t arity = (Py_ssize_t)n->arity;
    if (n->kind == M_LEAF) {
        if (r->k >= r->nleaves) {
            return REFX_BUG("flatmemo: a rebuild ran out of leaves");
        }
        return Py_NewRef(r->leaves[r->k++]);
    }
    if (n->kind == M_NONE) {
        return Py_NewRef(Py_None);
    }
    if (n->kind == M_MODULE) {
        return REFX_BUG("flatmemo: a rebuild met a module node");
    }
    /* the children first; NULL items until made, so out of the
     * collector's sight (a namedtuple's class may run Python code) */
    PyObject *kids = PyTuple_New(arity), *res = NULL;
    if (kids == NULL) {
        return NULL;
    }
    PyObject_GC_UnTrack(kids);
    for (Py_ssize_t i = 0; i < arity; i++) {
        PyObject *c = memo_rebuild_node(r, depth + 1);
        if (c == NULL) {
            Py_DECREF(kids);
            return NULL;
        }
        PyTuple_SET_ITEM(kids, i, c);
    }
    PyObject_GC_Track(kids);
    switch (n->kind) {
    case M_TUPLE:
        return kids;
    case M_LIST:
        res = PySequence_List(kids);
        break;
    case M_DICT: {
        PyObject *pos = PyTuple_GET_ITEM(r->objs, n->obj), *key, *at;
        Py_ssize_t it = 0, i = 0;
        res = _PyDict_NewPresized(arity);
        while (res != NULL && PyDict_Next(pos, &it, &key, &at)) {
            if (i >= arity ||
                PyDict_SetItem(res, key, PyTuple_GET_ITEM(kids, i++)) < 0) {
                if (!PyErr_Occurred()) {
                    REFX_BUG("flatmemo: a dict memo with too many keys");
                }
                Py_CLEAR(res);
            }
        }
        break;
    }
    case M_NAMEDTUPLE: {
        /* (class, "_fields", plain __new__ or None): a plain namedtuple as
         * its generated __new__ makes it, tuple.__new__(class, items), with
         * no Python code; any other by calling its class.  A pending value
         * (r->pending) was written when the class was plain (may_pend
         * checked): made as it would have been then */
        PyObject *spec = PyTuple_GET_ITEM(r->objs, n->obj);
        PyObject *cls = PyTuple_GET_ITEM(spec, 0);
        if (PyTuple_GET_ITEM(spec, 2) != Py_None &&
            (r->pending || namedtuple_still_plain(r->st, spec))) {
            PyObject *args = PyTuple_Pack(1, kids);
            res = args != NULL
                      ? PyTuple_Type.tp_new((PyTypeObject *)cls, args, NULL)
                      : NULL;
            Py_XDECREF(args);
        }
        else {
            res = PyObject_Call(cls, kids, NULL);
        }
        break;
    }
    case M_NODE: {
        PyObject *spec = PyTuple_GET_ITEM(r->objs, n->obj);
        PyObject *type = PyTuple_GET_ITEM(spec, 0);
        PyObject *aux = PyTuple_GET_ITEM(spec, 1);
        if ((type == (PyObject *)r->st->Value_Type ||
             type == (PyObject *)r->st->Index_Type) &&
            direct_deref_aux(aux)) {
            res = direct_deref(r->st, type, aux, kids);
            break;
        }
        PyObject *args[2] = {aux, kids};
        res = PyObject_Vectorcall(PyTuple_GET_ITEM(spec, 3), args, 2, NULL);
        break;
    }
    default:
        REFX_BUG("flatmemo: unknown node kind");
    }
    Py_DECREF(kids);
    return res;
}

/* jaxlib's unflatten of value memo `memo`'s treedef with `leaves` (a
 * tuple of exactly the memo's number of leaves), without jaxlib: no
 * PyTreeDef walk, no custom-node calls through its registry.  A memo with
 * a module node is unflattened by jaxlib.  New reference. */
PyObject *
refx_value_memo_rebuild(refx_state *st, PyObject *memo, PyObject *leaves,
                        int pending)
{
    PyObject *nodes = PyTuple_GET_ITEM(memo, 1);
    memo_rebuild_ctx r = {
        st,
        (const memo_node *)PyBytes_AS_STRING(nodes),
        PyBytes_GET_SIZE(nodes) / (Py_ssize_t)sizeof(memo_node),
        0,
        PyTuple_GET_ITEM(memo, 2),
        &PyTuple_GET_ITEM(leaves, 0),
        PyTuple_GET_SIZE(leaves),
        0,
        pending,
    };
    if (PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 3)) != r.nleaves) {
        return REFX_BUG("flatmemo: a rebuild given the wrong leaves");
    }
    for (Py_ssize_t i = 0; i < r.nnodes; i++) {
        if (r.nodes[i].kind == M_MODULE) {
            PyObject *list = PySequence_List(leaves);
            PyObject *res =
                list != NULL
                    ? refx_unflatten(st, PyTuple_GET_ITEM(memo, 0), list)
                    : NULL;
            Py_XDECREF(list);
            return res;
        }
    }
    PyObject *res = memo_rebuild_node(&r, 0);
    if (res != NULL && (r.at != r.nnodes || r.k != r.nleaves)) {
        Py_DECREF(res);
        return REFX_BUG("flatmemo: a rebuild left nodes or leaves over");
    }
    return res;
}

/* Is aux item `o` of a kind whose hash and == run no Python code: exact
 * str, int or None, or an exact tuple of them? */
static int
aux_is_plain(PyObject *o, int depth)
{
    if (o == Py_None || PyUnicode_CheckExact(o) || PyLong_CheckExact(o)) {
        return 1;
    }
    if (!PyTuple_CheckExact(o) || depth > 4) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++) {
        if (!aux_is_plain(PyTuple_GET_ITEM(o, i), depth + 1)) {
            return 0;
        }
    }
    return 1;
}

/* May value memo `memo` be rebuilt later, by whoever first reads the Ref
 * refx.jit left its Flat in (flatvalue.c, "Pending values")?  Only if the
 * rebuild runs no Python code, so that it cannot fail (but for lack of
 * memory), cannot be seen to run late, and may run where no Python code
 * may (deref's one moment): tuples, lists, None, dicts (exact str keys, as
 * every dict memo), plain namedtuples (namedtuple_plain_new), and refx's
 * Value, Index, NOTHING and Partition whose aux data (index, collection,
 * kind; paths) is exact str, int, None or tuples of them, or a kind refx
 * made.  1 or 0; runs no Python code. */
int
refx_value_memo_lazy(refx_state *st, PyObject *memo)
{
    PyObject *nodes = PyTuple_GET_ITEM(memo, 1),
             *objs = PyTuple_GET_ITEM(memo, 2);
    const memo_node *ns = (const memo_node *)PyBytes_AS_STRING(nodes);
    Py_ssize_t nn = PyBytes_GET_SIZE(nodes) / (Py_ssize_t)sizeof(memo_node);
    for (Py_ssize_t i = 0; i < nn; i++) {
        PyObject *spec = NULL;
        switch (ns[i].kind) {
        case M_LEAF:
        case M_NONE:
        case M_TUPLE:
        case M_LIST:
        case M_DICT:
            continue;
        case M_NAMEDTUPLE:
            spec = PyTuple_GET_ITEM(objs, ns[i].obj);
            if (!namedtuple_still_plain(st, spec)) {
                return 0;
            }
            continue;
        case M_NODE: {
            spec = PyTuple_GET_ITEM(objs, ns[i].obj);
            PyObject *tp = PyTuple_GET_ITEM(spec, 0),
                     *aux = PyTuple_GET_ITEM(spec, 1);
            if (tp == (PyObject *)st->Nothing_Type) {
                continue;
            }
            if (tp == (PyObject *)st->Value_Type ||
                tp == (PyObject *)st->Index_Type) {
                /* made by memo_rebuild_node's direct_deref, which reads
                 * the kind without hashing it (its metadata may have a
                 * Python __hash__: found by the second reader) */
                if (!direct_deref_aux(aux) ||
                    !aux_is_plain(PyTuple_GET_ITEM(aux, 1), 0)) {
                    return 0;
                }
                continue;
            }
            if (tp == (PyObject *)st->Partition_Type && aux_is_plain(aux, 0)) {
                continue;
            }
            return 0;
        }
        default:
            return 0;
        }
    }
    return 1;
}

/* Are the namedtuples of lazy value memo `memo` still made by
 * tuple.__new__ (namedtuple_still_plain: no class given a __new__ or
 * __init__ since the memo was made)?  Checked when a value is left pending
 * (flatvalue.c may_pend), since it is then made as the classes are now.
 * 1 or 0; runs no Python code. */
int
refx_value_memo_plain_now(refx_state *st, PyObject *memo)
{
    PyObject *nodes = PyTuple_GET_ITEM(memo, 1),
             *objs = PyTuple_GET_ITEM(memo, 2);
    const memo_node *ns = (const memo_node *)PyBytes_AS_STRING(nodes);
    Py_ssize_t nn = PyBytes_GET_SIZE(nodes) / (Py_ssize_t)sizeof(memo_node);
    for (Py_ssize_t i = 0; i < nn; i++) {
        if (ns[i].kind == M_NAMEDTUPLE &&
            !namedtuple_still_plain(st, PyTuple_GET_ITEM(objs, ns[i].obj))) {
            return 0;
        }
    }
    return 1;
}

/* Are value memos `a` and `b` the same structure, aux data compared as
 * aux_same compares it (the same objects, or of the same types and ==),
 * whatever the types of their leaves?
 * For two lazy memos (refx_value_memo_lazy): their aux data is str, int,
 * None, tuples, types and refx's kinds, so no Python code runs.  1 or 0
 * (-1 with an error: only from an == of other memos). */
int
refx_value_memo_same(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    PyObject *na = PyTuple_GET_ITEM(a, 1), *nb = PyTuple_GET_ITEM(b, 1);
    if (PyBytes_GET_SIZE(na) != PyBytes_GET_SIZE(nb) ||
        memcmp(PyBytes_AS_STRING(na), PyBytes_AS_STRING(nb),
               (size_t)PyBytes_GET_SIZE(na)) != 0) {
        return 0;
    }
    int r = PyObject_RichCompareBool(PyTuple_GET_ITEM(a, 3),
                                     PyTuple_GET_ITEM(b, 3), Py_EQ);
    /* node by node; a leaf's record is its type, which a memo made while
     * tracing has as a tracer's: leaves are the avals' business */
    const memo_node *ns = (const memo_node *)PyBytes_AS_STRING(na);
    Py_ssize_t nn = PyBytes_GET_SIZE(na) / (Py_ssize_t)sizeof(memo_node);
    PyObject *oa = PyTuple_GET_ITEM(a, 2), *ob = PyTuple_GET_ITEM(b, 2);
    for (Py_ssize_t i = 0; r > 0 && i < nn; i++) {
        switch (ns[i].kind) {
        case M_NAMEDTUPLE:
        case M_DICT:
        case M_MODULE:
        case M_NODE:
            r = aux_same(PyTuple_GET_ITEM(oa, ns[i].obj),
                         PyTuple_GET_ITEM(ob, ns[i].obj), 0);
            break;
        default:
            break;
        }
    }
    return r;
}

/* ------------------------------------------------------------------ */
/* deref's, clone's and reref's memos                                   */
/* ------------------------------------------------------------------ */

/* A box is an immutable tuple, replaced whole (so Python code that gets
 * hold of one, through gc.get_referents of the module, can change
 * nothing):
 *
 *   (memo0, memo1, seen0, seen1, strikes0, strikes1, streak, hot0, hot1,
 *    seen2)
 *
 * memo0/memo1 the two memos (a 5-tuple, (treedef,) for a structure the
 * memo cannot take, or None), the last made or hit first; seen0, seen1,
 * seen2 the treedefs of the last three structures no memo took (or None);
 * strikes the times memo k was made again after missing (a leaf of
 * another type, a static replaced by an equal object): at the second, a
 * structure that keeps changing so is marked (treedef,) instead; streak
 * the memos' misses in calls that made no memo (4 for a costly one, a
 * walk past a quarter of the memo's nodes before the tree differed; 1
 * for one at its first nodes), less 4 per hit: at EAGER_STALE, the
 * second memo is dropped and the first moves second (a workload that
 * moved on neither walks nor keeps old memos forever); hot: memo k was hit
 * since it was made or last passed over.  A structure from the seen
 * slots takes memo1's place only when memo1 is cold; else memo1 is made
 * cold and no memo is made, so three structures in turn keep two memos
 * instead of making one every other call.
 *
 * In C a box is read into an eager_box (its objects borrowed from the
 * tuple, which the reader holds) and written back whole by eager_write.
 * A call reads the box once before its walks (`was`, what it tries) and
 * again right before it writes (`now`): the walks and memo_make run
 * Python code, and another thread may have stored a box meanwhile, whose
 * memos must not be lost to this call's update.  A call that no memo
 * served is planned against `was` (eager_plan: which slot, if any, saw
 * this structure, and what follows) and applied to `now` (eager_apply). */
enum {
    B_MEMO0,
    B_MEMO1,
    B_SEEN0,
    B_SEEN1,
    B_STRIKES0,
    B_STRIKES1,
    B_STREAK,
    B_HOT0,
    B_HOT1,
    B_SEEN2,
    EAGER_BOX
};
#define EAGER_STALE 32

typedef struct {
    PyObject *memo[2]; /* a memo, (treedef,), or None (borrowed) */
    PyObject *seen[3]; /* a treedef or None (borrowed) */
    long strikes[2];
    long streak;
    int hot[2];
} eager_box;

static long
eager_count(PyObject *o)
{
    return PyLong_Check(o) ? PyLong_AsLong(o) : 0;
}

/* The box `t` (NULL: none yet, all empty) as C values. */
static void
eager_read(PyObject *t, eager_box *b)
{
#define ITEM(i) (t != NULL ? PyTuple_GET_ITEM(t, (i)) : Py_None)
    for (int k = 0; k < 2; k++) {
        b->memo[k] = ITEM(B_MEMO0 + k);
        b->strikes[k] = eager_count(ITEM(B_STRIKES0 + k));
        b->hot[k] = ITEM(B_HOT0 + k) == Py_True;
    }
    b->seen[0] = ITEM(B_SEEN0);
    b->seen[1] = ITEM(B_SEEN1);
    b->seen[2] = ITEM(B_SEEN2);
    b->streak = eager_count(ITEM(B_STREAK));
#undef ITEM
}

/* Replace *boxp by the box `b` describes. */
static int
eager_write(PyObject **boxp, const eager_box *b)
{
    PyObject *t =
        Py_BuildValue("(OOOOlllOOO)", b->memo[0], b->memo[1], b->seen[0],
                      b->seen[1], b->strikes[0], b->strikes[1], b->streak,
                      b->hot[0] ? Py_True : Py_False,
                      b->hot[1] ? Py_True : Py_False, b->seen[2]);
    if (t == NULL) {
        return -1;
    }
    Py_XSETREF(*boxp, t);
    return 0;
}

/* Does `o` (a box item) hold a treedef, or a memo of one, == treedef?
 * 1, 0, -1 error.  An aux data __eq__ that raises (np.int64(1) == (1, 2)
 * is an array, whose truth raises) says "not the same": the call
 * flattened fine and must not fail for a memo's sake. */
static int
eager_same(PyObject *o, PyObject *treedef)
{
    if (o == Py_None) {
        return 0;
    }
    PyObject *td = PyTuple_Check(o) ? PyTuple_GET_ITEM(o, 0) : o;
    int eq = PyObject_RichCompareBool(td, treedef, Py_EQ);
    if (eq < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        eq = 0;
    }
    return eq;
}

/* Memo k of `was` gave the leaves: it goes first, hot, and the streak of
 * misses loses 4.  Skipped when the box has moved on (memo k is no longer
 * where it was) or when nothing would change (memo0 hit again, already
 * hot, no streak). */
static int
eager_hit(PyObject **boxp, const eager_box *was, int k)
{
    PyObject *held = Py_XNewRef(*boxp);
    eager_box now, upd;
    eager_read(held, &now);
    int r = 0;
    if (now.memo[k] == was->memo[k] &&
        (k == 1 || now.streak > 0 || !now.hot[0])) {
        upd = now;
        upd.memo[0] = now.memo[k];
        upd.memo[1] = now.memo[1 - k];
        upd.strikes[0] = now.strikes[k];
        upd.strikes[1] = now.strikes[1 - k];
        upd.hot[0] = 1;
        upd.hot[1] = now.hot[1 - k];
        upd.streak = now.streak > 4 ? now.streak - 4 : 0;
        r = eager_write(boxp, &upd);
    }
    Py_XDECREF(held);
    return r;
}

/* What a call that no memo served does to the box (eager_plan decides it
 * from `was`, eager_apply does it to the box as it is then). */
typedef enum {
    E_NOTHING,   /* a structure marked not memoized: tried no more */
    E_SEEN,      /* new: remembered in seen0; the streak of misses grows */
    E_PASS_OVER, /* came before, but memo1 was hit lately: memo1 cooled */
    E_MAKE,      /* came before, or its memo missed: a memo made, first */
    E_MARK,      /* its memo missed twice: marked (treedef,), first */
} eager_action;

typedef struct {
    eager_action action;
    int at;       /* E_MAKE/E_MARK: the memo slot it replaces, or -1 */
    long strikes; /* E_MAKE/E_MARK: the new memo's strikes */
    int streak;   /* E_SEEN: what the misses add to the streak */
} eager_step;

static int
eager_plan(const eager_box *was, PyObject *treedef, int costly, int tried,
           eager_step *step)
{
    /* where this structure was last seen: a memo slot, a seen slot, or
     * nowhere */
    PyObject *slots[5] = {was->memo[0], was->memo[1], was->seen[0],
                          was->seen[1], was->seen[2]};
    int at = -1;
    for (int i = 0; i < 5 && at < 0; i++) {
        int eq = eager_same(slots[i], treedef);
        if (eq < 0) {
            return -1;
        }
        at = eq ? i : -1;
    }
    *step = (eager_step){E_SEEN, -1, 0, costly ? 4 : tried ? 1 : 0};
    if (at < 0) {
        return 0;
    }
    if (at < 2) {
        if (PyTuple_GET_SIZE(was->memo[at]) == 1) {
            step->action = E_NOTHING;
            return 0;
        }
        step->at = at;
        step->strikes = was->strikes[at] + 1;
        step->action = step->strikes >= 2 ? E_MARK : E_MAKE;
        return 0;
    }
    int memo1_real =
        PyTuple_Check(was->memo[1]) && PyTuple_GET_SIZE(was->memo[1]) > 1;
    step->action = memo1_real && was->hot[1] ? E_PASS_OVER : E_MAKE;
    return 0;
}

static int
eager_apply(refx_state *st, PyObject **boxp, const eager_box *was,
            const eager_step *step, PyObject *leaves, PyObject *treedef,
            Py_ssize_t regsize)
{
    if (step->action == E_NOTHING) {
        return 0;
    }
    /* the new memo before the box is read again: memo_make runs Python */
    PyObject *fresh = NULL;
    if (step->action == E_MARK) {
        fresh = PyTuple_Pack(1, treedef);
    }
    else if (step->action == E_MAKE) {
        fresh = memo_make(st, leaves, treedef, regsize, 0);
    }
    if ((step->action == E_MARK || step->action == E_MAKE) && fresh == NULL) {
        return -1;
    }
    PyObject *held = Py_XNewRef(*boxp);
    eager_box now, upd;
    eager_read(held, &now);
    upd = now;
    switch (step->action) {
    case E_SEEN: { /* after a stale streak, one memo less */
        long streak = now.streak + step->streak;
        if (streak >= EAGER_STALE) {
            upd.memo[0] = Py_None;
            upd.memo[1] = now.memo[0];
            upd.strikes[0] = 0;
            upd.strikes[1] = now.strikes[0];
            upd.hot[0] = 0;
            upd.hot[1] = now.hot[0];
            streak = 0;
        }
        upd.streak = streak;
        upd.seen[0] = treedef;
        upd.seen[1] = now.seen[0];
        upd.seen[2] = now.seen[1];
        break;
    }
    case E_PASS_OVER:
        upd.hot[1] = 0;
        break;
    default: { /* E_MAKE, E_MARK: the new memo first; the other memo
                * second (the one it replaces, if still there, dropped) */
        int other = step->at == 0 && now.memo[0] == was->memo[0] ? 1 : 0;
        upd.memo[0] = fresh;
        upd.memo[1] = now.memo[other];
        upd.strikes[0] = step->strikes;
        upd.strikes[1] = now.strikes[other];
        upd.hot[0] = 1;
        upd.hot[1] = now.hot[other];
        upd.streak = 0;
        break;
    }
    }
    int r = eager_write(boxp, &upd);
    Py_XDECREF(held);
    Py_XDECREF(fresh);
    return r;
}

PyObject *
refx_memo_flatten_eager(refx_state *st, PyObject **boxp, PyObject *tree,
                        PyObject *pred, PyObject **treedef)
{
    if (st->pytree_registry == NULL) {
        return refx_flatten(st, tree, pred, treedef);
    }
    PyObject *held = Py_XNewRef(*boxp), *leaves = NULL;
    eager_box was; /* borrowed from `held`: the walks may run Python code */
    eager_read(held, &was);
    int costly = 0, tried = 0;
    /* the two memos, the last one made or hit first */
    for (int k = 0; k < 2; k++) {
        if (!PyTuple_Check(was.memo[k])) {
            continue;
        }
        int c = 0;
        tried = 1;
        leaves = memo_try(st, was.memo[k], tree, 1, treedef, &c);
        costly |= c;
        if (leaves != NULL) {
            if (eager_hit(boxp, &was, k) < 0) {
                goto error;
            }
            goto done;
        }
        if (PyErr_Occurred()) {
            goto done;
        }
    }
    Py_ssize_t regsize = PyDict_GET_SIZE(st->pytree_registry);
    leaves = refx_flatten(st, tree, pred, treedef);
    if (leaves == NULL) {
        goto done;
    }
    eager_step step;
    if (eager_plan(&was, *treedef, costly, tried, &step) < 0 ||
        eager_apply(st, boxp, &was, &step, leaves, *treedef, regsize) < 0) {
        goto error;
    }
    goto done;
error:
    Py_CLEAR(leaves);
    Py_CLEAR(*treedef);
done:
    Py_XDECREF(held);
    return leaves;
}

/* ------------------------------------------------------------------ */
/* _core._memo_flatten (tests)                                          */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(memo_flatten__doc__,
             "_memo_flatten($module, box, tree, /)\n--\n\n"
             "refx.jit's argument flatten with the memo held in box[0] (a "
             "one-item list, None at first): (leaves, treedef, hit), hit "
             "saying whether the memo gave the leaves.  For tests.");

static PyObject *
memo_flatten_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs != 2 || !PyList_CheckExact(args[0]) ||
        PyList_GET_SIZE(args[0]) != 1) {
        PyErr_SetString(PyExc_TypeError,
                        "_memo_flatten(box, tree): box is a one-item list");
        return NULL;
    }
    if (refx_require_jax(st, "_memo_flatten") < 0) {
        return NULL;
    }
    PyObject *box = args[0];
    PyObject *slot = PyList_GET_ITEM(box, 0) == Py_None
                         ? NULL
                         : Py_NewRef(PyList_GET_ITEM(box, 0));
    if (slot != NULL && !PyTuple_CheckExact(slot)) {
        Py_DECREF(slot);
        PyErr_SetString(PyExc_TypeError, "_memo_flatten: box[0] is no memo");
        return NULL;
    }
    PyObject *treedef = NULL;
    int hit;
    PyObject *leaves = refx_memo_flatten(st, &slot, args[1], &treedef, &hit);
    PyObject *res = NULL;
    if (leaves != NULL) {
        res =
            Py_BuildValue("(NNO)", leaves, treedef, hit ? Py_True : Py_False);
        if (res != NULL &&
            PyList_SetItem(
                box, 0, slot != NULL ? Py_NewRef(slot) : Py_NewRef(Py_None)) <
                0) {
            Py_CLEAR(res);
        }
    }
    Py_XDECREF(slot);
    return res;
}

PyDoc_STRVAR(clear_memos__doc__,
             "_clear_flatten_memos($module, /)\n--\n\n"
             "Drop the flatten memo boxes of deref/clone and reref (the "
             "structures they keep).  For tests and the leak check.");

static PyObject *
clear_memos_py(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    Py_CLEAR(st->ref_tree_memo);
    Py_CLEAR(st->reref_memo);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(flatten_memos__doc__,
             "_flatten_memos($module, /)\n--\n\n"
             "(deref/clone's, reref's) memo boxes, each None or a tuple "
             "(memo0, memo1, seen0, seen1, strikes0, strikes1, streak, hot0, "
             "hot1, seen2) (strikes and streak ints, hot bools): a "
             "memo is (treedef, ...), (treedef,) for a structure not "
             "memoized, or None.  For tests.");

static PyObject *
flatten_memos_py(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    return PyTuple_Pack(
        2, st->ref_tree_memo != NULL ? st->ref_tree_memo : Py_None,
        st->reref_memo != NULL ? st->reref_memo : Py_None);
}

static PyMethodDef memo_functions[] = {
    {"_flatten_memos", flatten_memos_py, METH_NOARGS, flatten_memos__doc__},
    {"_memo_flatten", (PyCFunction)(void (*)(void))memo_flatten_py,
     METH_FASTCALL, memo_flatten__doc__},
    {"_clear_flatten_memos", clear_memos_py, METH_NOARGS, clear_memos__doc__},
    {NULL, NULL, 0, NULL},
};

int
refx_init_memo(PyObject *module, refx_state *st)
{
    (void)st;
    return PyModule_AddFunctions(module, memo_functions);
}
