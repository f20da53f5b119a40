/*
 * deref.c: deref, reref and clone.
 *
 * deref(tree) makes a tree of Refs safe to hand to JAX.  The tree is
 * flattened by JAX (Refs are leaves), then one pass over the leaves, in
 * leaf order, numbers the distinct Refs from 0: the first occurrence of
 * Ref number i becomes Value(ref.value, i, ref.collection), each later
 * occurrence Index(i, ref.collection), and the tree is unflattened with
 * the same treedef.  Other leaves pass through untouched; values are never
 * copied.
 *
 *   Identity.  "Is this Ref new?" is answered by marks in the Ref itself:
 *   each deref/clone call takes a fresh epoch number and stamps every Ref
 *   it numbers with (epoch, index).  That costs one load per leaf, where a
 *   hash table keyed by address costs a cache miss per leaf once the table
 *   outgrows the cache (measured: 1.67x of the flatten+unflatten floor at
 *   100k Refs with a table, see git history).  The loop runs no Python
 *   code of ours, but an allocation may run a finalizer that releases the
 *   GIL, and another thread's deref may then re-stamp a shared Ref.  So
 *   after the loop every numbered Ref is checked to still carry this
 *   call's stamp and number; if one does not, the call is redone with a
 *   pointer map (refx_ptrmap, ptrmap.h), which no one else can touch.
 *   Either way each distinct Ref gets one slot holding the Index object
 *   its later occurrences share (Index is immutable).  Slots borrow their
 *   Refs: the flattened leaves list keeps them alive.
 *
 *   Already deref'ed input.  Value and Index are pytree nodes, so a plain
 *   flatten would walk into them.  Rather than pay for a leaf predicate on
 *   every node, deref watches st->deref_nodes_seen, which their flatten
 *   functions bump: if it moved, the tree is flattened again with the
 *   predicate, the Value/Index is found as a leaf and its path is named
 *   in the error.
 *
 * reref(tree) is the inverse.  It flattens with Value/Index as leaves and
 * walks them in leaf order, keeping a C array of the Refs made so far:
 * Value(v, i, c) must have i == the number of Values seen (it makes the
 * i-th new Ref), Index(i, c) must name a Value already seen with the same
 * collection.  Every new Ref belongs to the trace current at the call:
 * reref inside jit makes Refs that jit's body may write.
 *
 * clone(tree) is reref(deref(tree)) in one pass: the same numbering, but
 * each distinct Ref maps straight to a new Ref.
 *
 * Functions in this file: refx_deref, refx_reref, refx_clone and the
 * shared error helpers.
 */
#include "refx.h"
#include "ptrmap.h"

/* Raise ValueError "<fname>: <what> found at <path>; <hint>". */
static void
found_at(refx_state *st, const char *fname, PyObject *tree, PyObject *pred,
         Py_ssize_t i, const char *what, const char *hint)
{
    PyObject *path = refx_leaf_path_repr(st, tree, pred, i);
    if (path == NULL) {
        return;
    }
    PyErr_Format(PyExc_ValueError, "%s: %s found at %U; %s", fname, what, path,
                 hint);
    Py_DECREF(path);
}

/* Flatten a tree of Refs without a leaf predicate; if it held Value/Index
 * nodes, raise naming the first.  Returns the leaves list (new ref). */
static PyObject *
flatten_ref_tree(refx_state *st, const char *fname, PyObject *tree,
                 PyObject **treedef)
{
    uint64_t seen = st->deref_nodes_seen;
    PyObject *leaves = refx_flatten(st, tree, NULL, treedef);
    if (leaves == NULL || st->deref_nodes_seen == seen) {
        return leaves;
    }
    /* maybe a Value/Index inside (or another thread flattened one) */
    Py_DECREF(leaves);
    Py_CLEAR(*treedef);
    leaves = refx_flatten(st, tree, st->pred_deref, treedef);
    if (leaves == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(leaves); i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        if (Deref_Check(st, leaf)) {
            found_at(st, fname, tree, st->pred_deref, i,
                     Value_Check(st, leaf) ? "Value" : "Index",
                     "expected a tree of Refs (was it already deref'ed?)");
            Py_DECREF(leaves);
            Py_CLEAR(*treedef);
            return NULL;
        }
    }
    return leaves;
}

/* ------------------------------------------------------------------ */
/* numbering distinct Refs                                              */
/* ------------------------------------------------------------------ */

typedef struct {
    RefObject *ref; /* owned: the leaves list may be rewritten in place */
    PyObject *obj;  /* owned: the shared Index (deref) or new Ref (clone) */
} numbered;

typedef struct {
    uint64_t epoch;
    int use_map; /* the fallback: a private pointer map instead of marks */
    refx_ptrmap map;
    numbered *slots;
    Py_ssize_t count, cap;
} numbering;

static void
numbering_init(refx_state *st, numbering *nb, int use_map)
{
    nb->epoch = ++st->epoch;
    nb->use_map = use_map;
    refx_ptrmap_init(&nb->map);
    nb->slots = NULL;
    nb->count = nb->cap = 0;
}

static void
numbering_fini(numbering *nb)
{
    for (Py_ssize_t i = 0; i < nb->count; i++) {
        Py_DECREF(nb->slots[i].ref);
        Py_XDECREF(nb->slots[i].obj);
    }
    PyMem_Free(nb->slots);
    nb->slots = NULL;
    nb->count = nb->cap = 0;
    refx_ptrmap_fini(&nb->map);
}

/* The number of `ref` in this call; *is_new says whether it was just
 * given one.  -1 with MemoryError set. */
static Py_ssize_t
number_ref(numbering *nb, RefObject *ref, int *is_new)
{
    refx_ptrmap_entry *e = NULL;
    if (!nb->use_map) {
        if (ref->mark_epoch == nb->epoch) {
            *is_new = 0;
            return ref->mark_index;
        }
    }
    else {
        int found;
        e = refx_ptrmap_get(&nb->map, ref, &found);
        if (e == NULL) {
            return -1;
        }
        if (found) {
            *is_new = 0;
            return e->value;
        }
    }
    if (nb->count == nb->cap) {
        Py_ssize_t ncap = nb->cap ? nb->cap * 2 : 64;
        numbered *ns = PyMem_Realloc(nb->slots, (size_t)ncap * sizeof(*ns));
        if (ns == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        nb->slots = ns;
        nb->cap = ncap;
    }
    Py_ssize_t i = nb->count++;
    nb->slots[i].ref = (RefObject *)Py_NewRef(ref);
    nb->slots[i].obj = NULL;
    if (e != NULL) {
        e->value = i;
    }
    else {
        ref->mark_epoch = nb->epoch;
        ref->mark_index = i;
    }
    *is_new = 1;
    return i;
}

/* 1 if every numbered Ref still carries this call's mark (always true in
 * map mode), 0 if another call re-stamped one meanwhile. */
static int
numbering_intact(numbering *nb)
{
    if (nb->use_map) {
        return 1;
    }
    for (Py_ssize_t i = 0; i < nb->count; i++) {
        RefObject *r = nb->slots[i].ref;
        if (r->mark_epoch != nb->epoch || r->mark_index != i) {
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* deref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    deref_doc,
    "deref($module, tree, /)\n"
    "--\n\n"
    "Replace the Refs of `tree` by Value and Index nodes, giving a pure "
    "pytree.\n\n"
    "Distinct Refs are numbered in leaf order from 0: the first occurrence "
    "of\n"
    "Ref i becomes Value(ref.value, i, ref.collection), later occurrences\n"
    "Index(i, ref.collection).  Other leaves pass through; values are not\n"
    "copied.  Call it before a tree of Refs crosses a JAX transform, and\n"
    "`reref` on the other side.  A Value or Index in `tree` is a ValueError.");

/* Replace the Refs of `leaves` (a list only we hold) in place.  0 on
 * success, -1 with an error, 1 with no error if the marks were disturbed
 * (the list is then half-rewritten: the caller flattens again and retries
 * with a map).  Rewriting in place saves a second list of n items. */
static int
deref_leaves(refx_state *st, PyObject *leaves, int use_map)
{
    numbering nb;
    numbering_init(st, &nb, use_map);
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    int res = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i), *new;
        if (!Ref_Check(st, leaf)) {
            continue;
        }
        RefObject *ref = (RefObject *)leaf;
        int is_new;
        Py_ssize_t k = number_ref(&nb, ref, &is_new);
        if (k < 0) {
            goto done;
        }
        if (is_new) {
            new = refx_value_create(st, ref->value, k, ref->collection);
        }
        else {
            numbered *slot = &nb.slots[k];
            if (slot->obj == NULL) {
                slot->obj = refx_index_create(st, k, ref->collection);
                if (slot->obj == NULL) {
                    goto done;
                }
            }
            new = Py_NewRef(slot->obj);
        }
        if (new == NULL) {
            goto done;
        }
        /* the Ref stays alive: the slot owns it */
        PyList_SET_ITEM(leaves, i, new);
        Py_DECREF(leaf);
    }
    res = numbering_intact(&nb) ? 0 : 1;
done:
    numbering_fini(&nb);
    return res;
}

static PyObject *
refx_deref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *res = NULL;
    if (refx_require_trees(st, "deref") < 0) {
        return NULL;
    }
    for (int use_map = 0; use_map < 2; use_map++) {
        leaves = flatten_ref_tree(st, "deref", tree, &treedef);
        if (leaves == NULL) {
            goto error;
        }
        if (Py_REFCNT(leaves) != 1) { /* not ours alone: work on a copy */
            Py_SETREF(leaves, PyList_GetSlice(leaves, 0, PY_SSIZE_T_MAX));
            if (leaves == NULL) {
                goto error;
            }
        }
        int r = deref_leaves(st, leaves, use_map);
        if (r < 0) {
            goto error;
        }
        if (r == 0) {
            break;
        }
        Py_CLEAR(leaves); /* marks disturbed: again, with a private map */
        Py_CLEAR(treedef);
        st->mark_retries++;
    }
    res = refx_unflatten(st, treedef, leaves);
error:
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

/* ------------------------------------------------------------------ */
/* reref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    reref_doc,
    "reref($module, tree, /)\n"
    "--\n\n"
    "Rebuild Refs from a deref'ed tree, with sharing intact.\n\n"
    "Each Value becomes a new Ref(value, collection) belonging to the "
    "current\n"
    "JAX trace, each Index the Ref its Value made.  Values must be numbered\n"
    "0, 1, 2... in leaf order and every Index must follow its Value; a Ref "
    "in\n"
    "`tree` is a ValueError.");

static PyObject *
refx_reref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *out = NULL, *res = NULL;
    PyObject *trace = NULL;
    PyObject **refs = NULL;
    Py_ssize_t nrefs = 0, cap = 0;
    if (refx_require_trees(st, "reref") < 0) {
        goto error;
    }
    leaves = refx_flatten(st, tree, st->pred_deref, &treedef);
    if (leaves == NULL) {
        goto error;
    }
    trace = refx_current_trace(st);
    if (trace == NULL) {
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    out = PyList_New(n);
    if (out == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i), *new;
        PyTypeObject *tp = Py_TYPE(leaf);
        if (tp == st->Value_Type) {
            DerefObject *d = (DerefObject *)leaf;
            if (d->index != nrefs) {
                PyObject *path =
                    refx_leaf_path_repr(st, tree, st->pred_deref, i);
                if (path != NULL) {
                    PyErr_Format(
                        PyExc_ValueError,
                        "reref: Value at %U has index %zd, expected %zd; "
                        "Values must be numbered 0, 1, 2... in leaf order "
                        "(was the tree deref'ed as a whole?)",
                        path, d->index, nrefs);
                    Py_DECREF(path);
                }
                goto error;
            }
            if (nrefs == cap) {
                Py_ssize_t ncap = cap ? cap * 2 : 16;
                PyObject **nr =
                    PyMem_Realloc(refs, (size_t)ncap * sizeof(*nr));
                if (nr == NULL) {
                    PyErr_NoMemory();
                    goto error;
                }
                refs = nr;
                cap = ncap;
            }
            new =
                refx_ref_create(st, st->Ref_Type, ((ValueObject *)leaf)->value,
                                d->collection, trace);
            if (new == NULL) {
                goto error;
            }
            refs[nrefs++] = new; /* borrowed by refs; owned by out */
        }
        else if (tp == st->Index_Type) {
            DerefObject *d = (DerefObject *)leaf;
            if (d->index >= nrefs) {
                PyObject *path =
                    refx_leaf_path_repr(st, tree, st->pred_deref, i);
                if (path != NULL) {
                    PyErr_Format(
                        PyExc_ValueError,
                        "reref: Index(%zd) at %U comes before any Value with "
                        "index %zd; an Index must follow its Value in leaf "
                        "order",
                        d->index, path, d->index);
                    Py_DECREF(path);
                }
                goto error;
            }
            RefObject *target = (RefObject *)refs[d->index];
            if (target->collection != d->collection) {
                int eq = PyObject_RichCompareBool(target->collection,
                                                  d->collection, Py_EQ);
                if (eq < 0) {
                    goto error;
                }
                if (!eq) {
                    PyObject *path =
                        refx_leaf_path_repr(st, tree, st->pred_deref, i);
                    if (path != NULL) {
                        PyErr_Format(PyExc_ValueError,
                                     "reref: Index(%zd) at %U has collection "
                                     "%R but its Value has collection %R",
                                     d->index, path, d->collection,
                                     target->collection);
                        Py_DECREF(path);
                    }
                    goto error;
                }
            }
            new = Py_NewRef((PyObject *)target);
        }
        else if (Ref_Check(st, leaf)) {
            found_at(st, "reref", tree, st->pred_deref, i, "Ref",
                     "expected a deref'ed tree of Values and Indexes (was it "
                     "already reref'ed?)");
            goto error;
        }
        else {
            new = Py_NewRef(leaf);
        }
        PyList_SET_ITEM(out, i, new);
    }
    res = refx_unflatten(st, treedef, out);
error:
    PyMem_Free(refs);
    Py_XDECREF(trace);
    Py_XDECREF(out);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

/* ------------------------------------------------------------------ */
/* clone                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    clone_doc,
    "clone($module, tree, /)\n"
    "--\n\n"
    "Same as reref(deref(tree)), in one pass: a copy of `tree` with new Refs\n"
    "(of the current trace) that share among themselves as the old ones did.");

static PyObject *
clone_leaves(refx_state *st, PyObject *leaves, PyObject *trace, int use_map)
{
    numbering nb;
    numbering_init(st, &nb, use_map);
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        if (!Ref_Check(st, leaf)) {
            PyList_SET_ITEM(out, i, Py_NewRef(leaf));
            continue;
        }
        RefObject *ref = (RefObject *)leaf;
        int is_new;
        Py_ssize_t k = number_ref(&nb, ref, &is_new);
        if (k < 0) {
            goto error;
        }
        numbered *slot = &nb.slots[k];
        if (is_new) {
            slot->obj = refx_ref_create(st, st->Ref_Type, ref->value,
                                        ref->collection, trace);
            if (slot->obj == NULL) {
                goto error;
            }
        }
        PyList_SET_ITEM(out, i, Py_NewRef(slot->obj));
    }
    if (!numbering_intact(&nb)) {
        Py_CLEAR(out); /* no error set: retry */
    }
    numbering_fini(&nb);
    return out;
error:
    numbering_fini(&nb);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *
refx_clone(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *out = NULL, *res = NULL;
    PyObject *trace = NULL;
    if (refx_require_trees(st, "clone") < 0) {
        return NULL;
    }
    leaves = flatten_ref_tree(st, "clone", tree, &treedef);
    if (leaves == NULL) {
        goto error;
    }
    trace = refx_current_trace(st);
    if (trace == NULL) {
        goto error;
    }
    out = clone_leaves(st, leaves, trace, 0);
    if (out == NULL && !PyErr_Occurred()) {
        st->mark_retries++;
        out = clone_leaves(st, leaves, trace, 1);
    }
    if (out == NULL) {
        goto error;
    }
    res = refx_unflatten(st, treedef, out);
error:
    Py_XDECREF(trace);
    Py_XDECREF(out);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

PyMethodDef refx_deref_functions[] = {
    {"deref", (PyCFunction)refx_deref, METH_O, deref_doc},
    {"reref", (PyCFunction)refx_reref, METH_O, reref_doc},
    {"clone", (PyCFunction)refx_clone, METH_O, clone_doc},
    {NULL, NULL, 0, NULL},
};
