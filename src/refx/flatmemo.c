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
 *   NONE    None (a node with no children for jaxlib)
 *   TUPLE   an exact tuple of `arity` items
 *   LIST    an exact list of `arity` items
 *   DICT    an exact dict with exactly the keys objs[obj] (a tuple of
 *           exact str, sorted): looked up in that order
 *   MODULE  a refx.nn.Module of the exact type objs[obj][0], whose
 *           flatten (objs[obj][2], the very rule jaxlib calls for that
 *           type) gives `arity` children and aux data == objs[obj][1]
 *
 * Why a walk that agrees with the memo gives jaxlib's answer.  jaxlib
 * decides a node by its exact type (tuple, list, dict, None, a registered
 * type) and a leaf otherwise; a dict's children come in the order of its
 * sorted keys, and a treedef is equal to another when the kinds, arities,
 * dict keys and custom aux data are equal (==).  The walk checks exactly
 * those: exact types, arities, the key set (size, then every key found),
 * aux data (==).  What it takes on trust is a fact about types that cannot
 * change unseen: which types are registered pytree nodes.  Registration
 * cannot be undone and JAX's registry dict only grows, so the memo keeps
 * the dict's size and is dropped when it grows (the same test as tree.c's
 * check for registered Ref subclasses).  A type is memoized as a leaf only
 * if it is not in that dict, and a Module only if the rule registered for
 * its type is refx's own _ModuleFlatten (nnmodule.c).  Every other node
 * kind jaxlib knows (namedtuples, OrderedDict, defaultdict, dataclasses,
 * refx's Partition/Value/Static, any custom node, a tuple/list/dict
 * subclass, dict keys other than str) makes the tree unmemoized: such a
 * call flattens with jaxlib every time, and the memo then holds just
 * (treedef,) so the next call of the same structure does not try again.
 *
 * A memo is made only when its walk over the tree reproduces jaxlib's
 * flatten of that same tree: the same leaves (the same objects, in order)
 * and as many nodes as the treedef has.
 *
 * Python code can run during a walk (a Module rule's _is_state, a dict key
 * lookup meeting a key with its own __eq__): every container being walked
 * and every child being descended into is held, lists and dicts are
 * re-measured, and the memo itself is held, so another thread replacing it
 * frees nothing in use.  A walk that fails with an ordinary exception
 * falls back to jaxlib's flatten, which raises what it raises.
 *
 * Functions in this file: the check walk (memo_check), the build walk
 * (memo_build), refx_memo_flatten, _core._memo_flatten (for tests).
 */
#include "refx.h"

enum { M_LEAF, M_NONE, M_TUPLE, M_LIST, M_DICT, M_MODULE };

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
    const memo_node *nodes;
    Py_ssize_t nnodes, at;
    PyObject *objs;   /* borrowed from the held memo */
    PyObject *leaves; /* a list of nleaves, filled from the front */
    Py_ssize_t nleaves, k;
} memo_walk;

static int memo_check(memo_walk *w, PyObject *o, int depth);

/* Check child `o` (held by the caller across the call). */
static int
memo_check_held(memo_walk *w, PyObject *o, int depth)
{
    Py_INCREF(o);
    int r = memo_check(w, o, depth);
    Py_DECREF(o);
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
        for (Py_ssize_t i = 0; i < arity; i++) {
            int r = memo_check(w, PyTuple_GET_ITEM(o, i), depth + 1);
            if (r <= 0) {
                return r;
            }
        }
        return 1;
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
    case M_DICT: {
        PyObject *keys = PyTuple_GET_ITEM(w->objs, n->obj);
        if (!PyDict_CheckExact(o) || PyDict_GET_SIZE(o) != arity) {
            return 0;
        }
        for (Py_ssize_t i = 0; i < arity; i++) {
            PyObject *v =
                PyDict_GetItemWithError(o, PyTuple_GET_ITEM(keys, i));
            if (v == NULL) {
                return PyErr_Occurred() ? -1 : 0;
            }
            int r = memo_check_held(w, v, depth + 1);
            if (r <= 0) {
                return r;
            }
        }
        return PyDict_GET_SIZE(o) == arity;
    }
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
            r = PyObject_RichCompareBool(PyTuple_GET_ITEM(flat, 1),
                                         PyTuple_GET_ITEM(spec, 1), Py_EQ);
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
    PyObject *leaves; /* list: the leaves the walk saw */
} memo_build_ctx;

static Py_ssize_t
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

/* 1: `o` described (children too); 0: a node kind the memo does not take;
 * -1: error.  `o` is held by the caller. */
static int
memo_build(memo_build_ctx *b, PyObject *o, int depth)
{
    refx_state *st = b->st;
    if (depth > MEMO_MAX_DEPTH) {
        return 0;
    }
    int r;
    if (o == Py_None) {
        return (int)memo_push(b, M_NONE, 0, NULL);
    }
    if (PyTuple_CheckExact(o)) {
        Py_ssize_t n = PyTuple_GET_SIZE(o);
        if ((r = (int)memo_push(b, M_TUPLE, n, NULL)) <= 0) {
            return r;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((r = memo_build(b, PyTuple_GET_ITEM(o, i), depth + 1)) <= 0) {
                return r;
            }
        }
        return 1;
    }
    if (PyList_CheckExact(o)) {
        Py_ssize_t n = PyList_GET_SIZE(o);
        if ((r = (int)memo_push(b, M_LIST, n, NULL)) <= 0) {
            return r;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (PyList_GET_SIZE(o) != n) {
                return 0;
            }
            PyObject *x = Py_NewRef(PyList_GET_ITEM(o, i));
            r = memo_build(b, x, depth + 1);
            Py_DECREF(x);
            if (r <= 0) {
                return r;
            }
        }
        return PyList_GET_SIZE(o) == n;
    }
    if (PyDict_CheckExact(o)) {
        PyObject *keys = PyDict_Keys(o), *sorted = NULL;
        if (keys == NULL) {
            return -1;
        }
        r = 1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
            if (!PyUnicode_CheckExact(PyList_GET_ITEM(keys, i))) {
                r = 0; /* jaxlib sorts other keys its own way */
            }
        }
        if (r > 0 && (PyList_Sort(keys) < 0 ||
                      (sorted = PyList_AsTuple(keys)) == NULL)) {
            r = -1;
        }
        Py_DECREF(keys);
        if (r <= 0) {
            return r;
        }
        Py_ssize_t n = PyTuple_GET_SIZE(sorted);
        r = (int)memo_push(b, M_DICT, n, sorted);
        for (Py_ssize_t i = 0; r > 0 && i < n; i++) {
            PyObject *v =
                PyDict_GetItemWithError(o, PyTuple_GET_ITEM(sorted, i));
            if (v == NULL) {
                r = PyErr_Occurred() ? -1 : 0;
                break;
            }
            Py_INCREF(v);
            r = memo_build(b, v, depth + 1);
            Py_DECREF(v);
        }
        Py_DECREF(sorted);
        return r > 0 ? PyDict_GET_SIZE(o) == n : r;
    }
    if (PyTuple_Check(o) || PyList_Check(o) || PyDict_Check(o)) {
        return 0; /* namedtuples, OrderedDict, defaultdict, other subclasses */
    }
    PyObject *type = (PyObject *)Py_TYPE(o);
    PyObject *entry = PyDict_GetItemWithError(st->pytree_registry, type);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        if ((r = (int)memo_push(b, M_LEAF, 0, type)) <= 0) {
            return r;
        }
        return PyList_Append(b->leaves, o) < 0 ? -1 : 1;
    }
    /* a registered node: only refx.nn.Module's own rule is taken */
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 1 ||
        !refx_module_flatten_is_plain(st, PyTuple_GET_ITEM(entry, 0))) {
        return 0;
    }
    PyObject *rule = PyTuple_GET_ITEM(entry, 0);
    PyObject *flat = PyObject_Vectorcall(rule, &o, 1, NULL), *spec = NULL;
    if (flat == NULL) {
        return -1;
    }
    if (!PyTuple_CheckExact(flat) || PyTuple_GET_SIZE(flat) != 2 ||
        !PyList_CheckExact(PyTuple_GET_ITEM(flat, 0))) {
        Py_DECREF(flat);
        return 0;
    }
    PyObject *kids = PyTuple_GET_ITEM(flat, 0);
    Py_ssize_t n = PyList_GET_SIZE(kids);
    spec = PyTuple_Pack(3, type, PyTuple_GET_ITEM(flat, 1), rule);
    r = spec == NULL ? -1 : (int)memo_push(b, M_MODULE, n, spec);
    Py_XDECREF(spec);
    for (Py_ssize_t i = 0; r > 0 && i < n; i++) {
        if (PyList_GET_SIZE(kids) != n) {
            r = 0;
            break;
        }
        PyObject *x = Py_NewRef(PyList_GET_ITEM(kids, i));
        r = memo_build(b, x, depth + 1);
        Py_DECREF(x);
    }
    Py_DECREF(flat);
    return r;
}

/* The memo of `tree`, whose jaxlib flatten gave `leaves` and `treedef`:
 * the 5-tuple, or (treedef,) when the tree is not memoized; NULL on error.
 * Registry size `regsize` as read before the flatten. */
static PyObject *
memo_make(refx_state *st, PyObject *tree, PyObject *leaves, PyObject *treedef,
          Py_ssize_t regsize)
{
    memo_build_ctx b = {st, NULL, 0, 0, PyList_New(0), PyList_New(0)};
    PyObject *res = NULL, *nodes = NULL, *objs = NULL, *num = NULL;
    if (b.objs == NULL || b.leaves == NULL) {
        goto done;
    }
    Py_INCREF(tree);
    int r = memo_build(&b, tree, 0);
    Py_DECREF(tree);
    if (r < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            goto done;
        }
        PyErr_Clear(); /* jaxlib's flatten of the same tree did not fail */
        r = 0;
    }
    if (r > 0) { /* the walk must be jaxlib's flatten exactly */
        Py_ssize_t n = PyList_GET_SIZE(leaves);
        r = PyList_GET_SIZE(b.leaves) == n &&
            PyDict_GET_SIZE(st->pytree_registry) == regsize;
        for (Py_ssize_t i = 0; r && i < n; i++) {
            r = PyList_GET_ITEM(b.leaves, i) == PyList_GET_ITEM(leaves, i);
        }
        if (r) {
            num = PyObject_GetAttrString(treedef, "num_nodes");
            if (num == NULL) {
                goto done;
            }
            r = PyLong_CheckExact(num) && PyLong_AsSsize_t(num) == b.nnodes;
            Py_CLEAR(num);
        }
    }
    if (!r) {
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
    Py_XDECREF(b.leaves);
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
memo_try(refx_state *st, PyObject *memo, PyObject *tree, PyObject **treedef)
{
    if (PyTuple_GET_SIZE(memo) != 5 ||
        PyDict_GET_SIZE(st->pytree_registry) !=
            PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 4))) {
        return NULL;
    }
    PyObject *nodes = PyTuple_GET_ITEM(memo, 1);
    memo_walk w = {
        (const memo_node *)PyBytes_AS_STRING(nodes),
        PyBytes_GET_SIZE(nodes) / (Py_ssize_t)sizeof(memo_node),
        0,
        PyTuple_GET_ITEM(memo, 2),
        NULL,
        PyLong_AsSsize_t(PyTuple_GET_ITEM(memo, 3)),
        0,
    };
    w.leaves = PyList_New(w.nleaves); /* NULL items until filled */
    if (w.leaves == NULL) {
        return NULL;
    }
    int r = memo_check(&w, tree, 0);
    if (r > 0 && w.k == w.nleaves && w.at == w.nnodes) {
        *treedef = Py_NewRef(PyTuple_GET_ITEM(memo, 0));
        return w.leaves;
    }
    Py_DECREF(w.leaves);
    if (r < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* jaxlib's flatten raises what it raises */
    }
    return NULL;
}

PyObject *
refx_memo_flatten(refx_state *st, PyObject **slot, PyObject *tree,
                  PyObject **treedef, int *hit)
{
    *hit = 0;
    if (st->pytree_registry == NULL) {
        return refx_flatten(st, tree, NULL, treedef);
    }
    PyObject *memo = Py_XNewRef(*slot); /* held: another thread may swap */
    if (memo != NULL) {
        PyObject *leaves = memo_try(st, memo, tree, treedef);
        if (leaves != NULL || PyErr_Occurred()) {
            *hit = leaves != NULL;
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
    PyObject *fresh = memo_make(st, tree, leaves, *treedef, regsize);
    if (fresh == NULL) {
        Py_CLEAR(*treedef);
        Py_DECREF(leaves);
        return NULL;
    }
    Py_XSETREF(*slot, fresh);
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

static PyMethodDef memo_functions[] = {
    {"_memo_flatten", (PyCFunction)(void (*)(void))memo_flatten_py,
     METH_FASTCALL, memo_flatten__doc__},
    {NULL, NULL, 0, NULL},
};

int
refx_init_memo(PyObject *module, refx_state *st)
{
    (void)st;
    return PyModule_AddFunctions(module, memo_functions);
}
