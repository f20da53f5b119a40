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
 *   Identity table.  "Is this Ref new?" is answered by a pointer map
 *   (refx_ptrmap, module.c): Ref address -> its number, plus the one Index
 *   object every later occurrence shares (Index is immutable).  The map
 *   borrows its keys: the flattened leaves list keeps them alive, and the
 *   loop runs no Python code that could change the tree.
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

/* Raise ValueError "<fname>: <what> found at <path>; <hint>". */
static void
found_at(refx_state *st, const char *fname, PyObject *tree, PyObject *pred,
         Py_ssize_t i, const char *what, const char *hint)
{
    PyObject *path = refx_leaf_path_repr(st, tree, pred, i);
    if (path == NULL) {
        return;
    }
    PyErr_Format(PyExc_ValueError, "%s: %s found at %U; %s", fname, what,
                 path, hint);
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
/* deref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(deref_doc,
"deref($module, tree, /)\n"
"--\n\n"
"Replace the Refs of `tree` by Value and Index nodes, giving a pure pytree.\n\n"
"Distinct Refs are numbered in leaf order from 0: the first occurrence of\n"
"Ref i becomes Value(ref.value, i, ref.collection), later occurrences\n"
"Index(i, ref.collection).  Other leaves pass through; values are not\n"
"copied.  Call it before a tree of Refs crosses a JAX transform, and\n"
"`reref` on the other side.  A Value or Index in `tree` is a ValueError.");

static PyObject *
refx_deref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *out = NULL, *res = NULL;
    refx_ptrmap map;
    refx_ptrmap_init(&map);
    if (refx_require_jax(st, "deref") < 0) {
        goto error;
    }
    leaves = flatten_ref_tree(st, "deref", tree, &treedef);
    if (leaves == NULL) {
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves), count = 0;
    out = PyList_New(n);
    if (out == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i), *new;
        if (!Ref_Check(st, leaf)) {
            PyList_SET_ITEM(out, i, Py_NewRef(leaf));
            continue;
        }
        RefObject *ref = (RefObject *)leaf;
        int found;
        refx_ptrmap_entry *e = refx_ptrmap_get(&map, leaf, &found);
        if (e == NULL) {
            goto error;
        }
        if (!found) {
            e->value = count++;
            new = refx_value_create(st, ref->value, e->value,
                                    ref->collection);
        }
        else {
            if (e->obj == NULL) {
                e->obj = refx_index_create(st, e->value, ref->collection);
                if (e->obj == NULL) {
                    goto error;
                }
            }
            new = Py_NewRef(e->obj);
        }
        if (new == NULL) {
            goto error;
        }
        PyList_SET_ITEM(out, i, new);
    }
    res = refx_unflatten(st, treedef, out);
error:
    refx_ptrmap_release_objs(&map);
    refx_ptrmap_fini(&map);
    Py_XDECREF(out);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

/* ------------------------------------------------------------------ */
/* reref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(reref_doc,
"reref($module, tree, /)\n"
"--\n\n"
"Rebuild Refs from a deref'ed tree, with sharing intact.\n\n"
"Each Value becomes a new Ref(value, collection) belonging to the current\n"
"JAX trace, each Index the Ref its Value made.  Values must be numbered\n"
"0, 1, 2... in leaf order and every Index must follow its Value; a Ref in\n"
"`tree` is a ValueError.");

static PyObject *
refx_reref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *out = NULL, *res = NULL;
    PyObject *trace = NULL;
    PyObject **refs = NULL;
    Py_ssize_t nrefs = 0, cap = 0;
    if (refx_require_jax(st, "reref") < 0) {
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
                PyObject **nr = PyMem_Realloc(refs, (size_t)ncap * sizeof(*nr));
                if (nr == NULL) {
                    PyErr_NoMemory();
                    goto error;
                }
                refs = nr;
                cap = ncap;
            }
            new = refx_ref_create(st, st->Ref_Type,
                                  ((ValueObject *)leaf)->value,
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

PyDoc_STRVAR(clone_doc,
"clone($module, tree, /)\n"
"--\n\n"
"Same as reref(deref(tree)), in one pass: a copy of `tree` with new Refs\n"
"(of the current trace) that share among themselves as the old ones did.");

static PyObject *
refx_clone(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *out = NULL, *res = NULL;
    PyObject *trace = NULL;
    refx_ptrmap map;
    refx_ptrmap_init(&map);
    if (refx_require_jax(st, "clone") < 0) {
        goto error;
    }
    leaves = flatten_ref_tree(st, "clone", tree, &treedef);
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
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        if (!Ref_Check(st, leaf)) {
            PyList_SET_ITEM(out, i, Py_NewRef(leaf));
            continue;
        }
        int found;
        refx_ptrmap_entry *e = refx_ptrmap_get(&map, leaf, &found);
        if (e == NULL) {
            goto error;
        }
        if (!found) {
            RefObject *ref = (RefObject *)leaf;
            e->obj = refx_ref_create(st, st->Ref_Type, ref->value,
                                     ref->collection, trace);
            if (e->obj == NULL) {
                goto error;
            }
        }
        PyList_SET_ITEM(out, i, Py_NewRef(e->obj));
    }
    res = refx_unflatten(st, treedef, out);
error:
    refx_ptrmap_release_objs(&map);
    refx_ptrmap_fini(&map);
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
