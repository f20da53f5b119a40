/*
 * update.c: update_refs(target, source).
 *
 * Writes the values of `source` into the Refs of `target`, position by
 * position.  Positions come from one of two alignments:
 *
 *   by path  when `target` is a Partition and `source` a dict (a
 *            Partition, or e.g. a checkpoint {path: array}): each target
 *            path is looked up in the source (a dict cursor: one
 *            PyDict_Next per path while the orders agree).  The source may
 *            leave out a path where the target holds NOTHING, or repeats a
 *            Ref that the source gives a value at another path (a checkpoint
 *            stores a tied weight once); every source path must be a target
 *            path.  A target entry that is itself a subtree holding Refs (a
 *            partition made with is_leaf) is aligned leaf by leaf with the
 *            source's value there, as by leaf below.  Where the Ref holds an
 *            array, the new value must have its shape and dtype: this is how
 *            checkpoints come back, and a wrong-shape file must not load.
 *   by leaf  otherwise: the target is flattened with Ref/Value/Index/NOTHING
 *            as leaves, and the source is flattened *up to* that structure
 *            (jaxlib's treedef.flatten_up_to), so it must have the target's
 *            structure, node by node, with anything at a Ref's place (a Ref,
 *            a Value/Index, or a plain value, itself a pytree if the Ref
 *            holds one) and a leaf at each plain leaf's place.  A source
 *            that differs is a ValueError naming the first path where it
 *            does, never a write by position.  Shapes are not checked: a
 *            by-leaf source is a tree the program computed, not a file.
 *
 * At each position the target holds a Ref, NOTHING (the source must hold
 * NOTHING too) or a plain leaf (nothing to write; the source may not hold
 * a Ref or a Value/Index there).  The source holds, for a Ref target:
 *
 *   a Ref            its value is written ("Ref mode");
 *   Value / Index    as made by deref ("deref mode"): Value(v, i, c) writes
 *                    v, Index(i) must sit where the target has the same Ref
 *                    as at Value i's position, and c must equal the Ref's
 *                    collection;
 *   a plain value    written as is.
 *
 * A source may not mix Refs with Values/Indexes.  Sharing must line up, and
 * sharing is by identity: where the target repeats a Ref, the source must
 * repeat the same source Ref, give an Index to the Value written there, or
 * repeat the identical object; and one source Ref or Value may not feed two
 * different target Refs.
 *
 * All or nothing: a plan, then its application.  The plan (update_plan)
 * collects the aligned positions, takes the value of every source Ref at
 * one moment (plan_snapshot: a pass that runs no Python code, so another
 * thread's update cannot land half-way through what this one reads), then
 * checks every position (plan_position, one function per kind of source)
 * and lists (Ref, new value) pairs, one per distinct target Ref.
 * plan_apply hands them to refx_write_all (ref.c), the one write routine
 * of update_refs and the transforms' write-backs: it runs the write check
 * of every pair (trace level, refx.mutable, tracers) before storing any,
 * stores them all with no Python code running, and releases the old values
 * after the last store.  A refused write is raised at its position's path,
 * after the alignment checks of every position.  So a call that raises has
 * changed no Ref, and no other thread (nor a __del__) sees an update
 * half-applied.  Checks may run Python code
 * (collection __eq__, the tracer check), which is why the identity tables
 * borrow only objects the aligned leaf lists keep alive.
 *
 * Functions in this file: fail_at/fail_structure_at, structure_error,
 * collect_by_leaf,
 * collect_by_path (and expand_entry), plan_snapshot, plan_position
 * (plan_index, plan_value, plan_ref_or_plain, plan_add, check_shape),
 * plan_check_missing, plan_apply, plan_fini, refx_update_refs.
 */
#include "refx.h"
#include "ptrmap.h"

enum { MODE_NONE, MODE_REF, MODE_DEREF };

typedef struct {
    refx_state *st;
    PyObject *target, *source; /* the arguments, for error paths */
    int by_path;
    PyObject *tl, *sl;     /* aligned target and source leaf, per position */
    PyObject *paths;       /* by path: the path of each position */
    PyObject *missing;     /* by path: stands for "no such source path" */
    PyObject **snap;       /* per position: a source Ref's value, or NULL */
    PyObject *trace;       /* the current trace's weakref */
    refx_ptrmap targets;   /* target Ref -> source object first given it */
    refx_ptrmap sources;   /* source Ref -> the target Ref it feeds */
    PyObject *value_owner; /* {Value index: target Ref} */
    int mode;
    Py_ssize_t nmissing;
    /* the planned writes, as refx_write_all takes them: */
    RefObject **wrefs;  /* borrowed: the target leaf list keeps them alive */
    PyObject **wvalues; /* owned */
    Py_ssize_t *wpos;   /* the position each was planned at, for errors */
    Py_ssize_t nitems;
} update_plan;

static const char *
kind_of(refx_state *st, PyObject *x)
{
    if (x == st->nothing) {
        return "NOTHING";
    }
    if (Ref_Check(st, x)) {
        return "a Ref";
    }
    if (Value_Check(st, x)) {
        return "a Value";
    }
    if (Index_Check(st, x)) {
        return "an Index";
    }
    return Py_TYPE(x)->tp_name;
}

/* ValueError "<head> <path of position j>: <fmt...>"; head ends with
 * "at" (positions know their path only by index, when by leaf). */
static void
vfail(update_plan *p, Py_ssize_t j, const char *head, const char *fmt,
      va_list va)
{
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    if (msg == NULL) {
        return;
    }
    if (p->by_path) {
        refx_raise_at_path(PyExc_ValueError, PyList_GET_ITEM(p->paths, j),
                           "%s {path}: %U", head, msg);
    }
    else {
        refx_raise_at_leaf(p->st, PyExc_ValueError, p->target,
                           p->st->pred_refx, j, "%s {path}: %U", head, msg);
    }
    Py_DECREF(msg);
}

/* ValueError "update_refs: at <path of position j>: <fmt...>" */
static void
fail_at(update_plan *p, Py_ssize_t j, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    vfail(p, j, "update_refs: at", fmt, va);
    va_end(va);
}

/* ValueError "update_refs: the source's structure differs ... at <path>" */
static void
fail_structure_at(update_plan *p, Py_ssize_t j, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    vfail(p, j,
          "update_refs: the source's structure differs from the target's at",
          fmt, va);
    va_end(va);
}

/* Is `x` a leaf (one it would be, flattened with Ref/Value/Index/NOTHING
 * as leaves)?  1, 0, or -1 with an error. */
static int
is_leaf(refx_state *st, PyObject *x)
{
    if (x == st->nothing || Ref_Check(st, x) || Deref_Check(st, x) ||
        refx_is_plain_value(st, x)) {
        return 1;
    }
    PyObject *treedef;
    PyObject *leaves = refx_flatten(st, x, st->pred_refx, &treedef);
    if (leaves == NULL) {
        return -1;
    }
    int r = PyList_GET_SIZE(leaves) == 1 && PyList_GET_ITEM(leaves, 0) == x;
    Py_DECREF(leaves);
    Py_DECREF(treedef);
    return r;
}

/* ------------------------------------------------------------------ */
/* alignment                                                            */
/* ------------------------------------------------------------------ */

/* The refx paths of the leaves of `tree` (Ref/Value/Index/NOTHING as
 * leaves), each prefixed by `prefix` (a tuple; may be empty). */
static PyObject *
leaf_paths(refx_state *st, PyObject *tree, PyObject *prefix)
{
    PyObject *args[2] = {tree, st->pred_refx};
    PyObject *res = refx_call_jax(st->flatten_with_path, args, 2);
    if (res == NULL) {
        return NULL;
    }
    PyObject *paths = NULL, *pairs = PyTuple_GET_ITEM(res, 0);
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    paths = PyList_New(n);
    for (Py_ssize_t i = 0; paths != NULL && i < n; i++) {
        PyObject *kp = PyTuple_GET_ITEM(PyList_GET_ITEM(pairs, i), 0);
        PyObject *rel = refx_path_from_keypath(st, kp);
        PyObject *path = rel != NULL ? PySequence_Concat(prefix, rel) : NULL;
        Py_XDECREF(rel);
        if (path == NULL) {
            Py_CLEAR(paths);
            break;
        }
        PyList_SET_ITEM(paths, i, path);
    }
    Py_DECREF(res);
    return paths;
}

static int
has_prefix(PyObject *path, PyObject *prefix)
{
    Py_ssize_t n = PyTuple_GET_SIZE(prefix);
    if (PyTuple_GET_SIZE(path) < n) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(path, i),
                 *b = PyTuple_GET_ITEM(prefix, i);
        if (a != b && PyUnicode_Compare(a, b) != 0) {
            return 0;
        }
    }
    return 1;
}

/* `path` cut after its first element that differs from `other` */
static PyObject *
cut_at_difference(PyObject *path, PyObject *other)
{
    Py_ssize_t n = PyTuple_GET_SIZE(path), m = PyTuple_GET_SIZE(other), k = 0;
    while (k < n && k < m &&
           PyUnicode_Compare(PyTuple_GET_ITEM(path, k),
                             PyTuple_GET_ITEM(other, k)) == 0) {
        k++;
    }
    return PyTuple_GetSlice(path, 0, k < n ? k + 1 : n);
}

#define STRUCTURE_HINT                                                        \
    "; the source must have the target's structure (a Ref's place may "       \
    "hold a Ref, a Value/Index or a plain value)"

/* The source does not have the target's structure (jax_exc: what jaxlib's
 * flatten_up_to said, or NULL): name the first path where they differ,
 * comparing the leaf paths of both in order.  `prefix`: the path of
 * `target` within the argument (by path), else (). */
static void
structure_error(refx_state *st, PyObject *target, PyObject *source,
                PyObject *prefix, PyObject *jax_exc)
{
    PyObject *tp = leaf_paths(st, target, prefix);
    PyObject *sp = tp != NULL ? leaf_paths(st, source, prefix) : NULL;
    if (sp == NULL) {
        goto done;
    }
    Py_ssize_t nt = PyList_GET_SIZE(tp), ns = PyList_GET_SIZE(sp), j = 0;
    for (Py_ssize_t i = 0; i < nt; i++) {
        PyObject *t = PyList_GET_ITEM(tp, i);
        if (j >= ns) {
            refx_raise_at_path(PyExc_ValueError, t,
                               "update_refs: the source's structure differs "
                               "from the target's at {path}: the target has "
                               "a leaf there, the source has no more "
                               "leaves" STRUCTURE_HINT);
            goto done;
        }
        PyObject *s = PyList_GET_ITEM(sp, j);
        if (!has_prefix(s, t)) {
            PyObject *cut = cut_at_difference(t, s);
            if (cut != NULL) {
                refx_raise_at_path(PyExc_ValueError, cut,
                                   "update_refs: the source's structure "
                                   "differs from the target's at {path}: the "
                                   "target has a leaf at %R, the source at "
                                   "%R" STRUCTURE_HINT,
                                   t, s);
                Py_DECREF(cut);
            }
            goto done;
        }
        /* the source may hold a pytree where the target has a Ref */
        while (j < ns && has_prefix(PyList_GET_ITEM(sp, j), t)) {
            j++;
        }
    }
    if (j < ns) {
        PyObject *s = PyList_GET_ITEM(sp, j);
        PyObject *cut = nt > 0
                            ? cut_at_difference(s, PyList_GET_ITEM(tp, nt - 1))
                            : PyTuple_GetSlice(s, 0, 1);
        if (cut != NULL) {
            refx_raise_at_path(PyExc_ValueError, cut,
                               "update_refs: the source's structure differs "
                               "from the target's at {path}: the source has a "
                               "leaf at %R, the target none" STRUCTURE_HINT,
                               s);
            Py_DECREF(cut);
        }
        goto done;
    }
    /* same paths, other kinds of node (a tuple for a list, say) */
    refx_raise_at_path(PyExc_ValueError, prefix,
                       "update_refs: the source's structure differs from the "
                       "target's at {path}: %S" STRUCTURE_HINT,
                       jax_exc != NULL ? jax_exc : Py_None);
done:
    Py_XDECREF(tp);
    Py_XDECREF(sp);
}

/* `source` flattened up to the structure of `treedef` (a list aligned
 * with the target's leaves), or NULL with a structure error. */
static PyObject *
flatten_up_to(refx_state *st, PyObject *treedef, PyObject *target,
              PyObject *source, PyObject *prefix)
{
    PyObject *method = PyObject_GetAttr(treedef, st->str_flatten_up_to);
    if (method == NULL) {
        return NULL;
    }
    PyObject *leaves = refx_call_jax(method, &source, 1);
    Py_DECREF(method);
    if (leaves == NULL) {
        if (PyErr_ExceptionMatches(PyExc_ValueError) ||
            PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyObject *exc = refx_take_exception();
            structure_error(st, target, source, prefix, exc);
            Py_XDECREF(exc);
        }
        return NULL;
    }
    if (!PyList_Check(leaves)) {
        Py_SETREF(leaves, PySequence_List(leaves));
    }
    return leaves;
}

static int
collect_by_leaf(update_plan *p)
{
    refx_state *st = p->st;
    PyObject *treedef = NULL, *root = NULL;
    p->tl = refx_flatten_leaves(st, p->target, st->pred_refx, &treedef);
    if (p->tl == NULL) {
        return -1;
    }
    root = PyTuple_New(0);
    if (root != NULL) {
        p->sl = flatten_up_to(st, treedef, p->target, p->source, root);
    }
    Py_XDECREF(root);
    Py_DECREF(treedef);
    if (p->sl == NULL) {
        return -1;
    }
    if (PyList_GET_SIZE(p->sl) != PyList_GET_SIZE(p->tl)) {
        REFX_BUG("flatten_up_to gave another number of leaves");
        return -1;
    }
    return 0;
}

static int
add_position(update_plan *p, PyObject *t, PyObject *s, PyObject *path)
{
    if (PyList_Append(p->tl, t) < 0 || PyList_Append(p->sl, s) < 0 ||
        PyList_Append(p->paths, path) < 0) {
        return -1;
    }
    return 0;
}

/* By path, a target entry that is a subtree (holding Refs, say): one
 * position per leaf of it, aligned with the source's value there. */
static int
expand_entry(update_plan *p, PyObject *path, PyObject *entry, PyObject *value)
{
    refx_state *st = p->st;
    PyObject *treedef = NULL, *tleaves = NULL, *sleaves = NULL, *paths = NULL;
    int res = -1;
    tleaves = refx_flatten(st, entry, st->pred_refx, &treedef);
    if (tleaves == NULL) {
        goto error;
    }
    if (value != p->missing) {
        sleaves = flatten_up_to(st, treedef, entry, value, path);
        if (sleaves == NULL) {
            goto error;
        }
    }
    paths = leaf_paths(st, entry, path);
    if (paths == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tleaves); i++) {
        PyObject *s =
            sleaves != NULL ? PyList_GET_ITEM(sleaves, i) : p->missing;
        if (add_position(p, PyList_GET_ITEM(tleaves, i), s,
                         PyList_GET_ITEM(paths, i)) < 0) {
            goto error;
        }
    }
    res = 0;
error:
    Py_XDECREF(treedef);
    Py_XDECREF(tleaves);
    Py_XDECREF(sleaves);
    Py_XDECREF(paths);
    return res;
}

static int
collect_by_path(update_plan *p)
{
    PyObject *t = p->target, *s = p->source;
    Py_ssize_t n = PyDict_GET_SIZE(t), matched = 0, pos = 0;
    p->tl = PyList_New(0);
    p->sl = PyList_New(0);
    p->paths = PyList_New(0);
    /* a fresh object: no source value can be it */
    p->missing = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (p->tl == NULL || p->sl == NULL || p->paths == NULL ||
        p->missing == NULL) {
        return -1;
    }
    refx_dict_cursor cur;
    refx_cursor_init(&cur, s);
    PyObject *bpath, *bentry;
    while (PyDict_Next(t, &pos, &bpath, &bentry)) {
        /* owned: looking the path up may run Python code (a key's __eq__)
         * that mutates either dict */
        PyObject *path = Py_NewRef(bpath), *entry = Py_NewRef(bentry);
        PyObject *value = refx_cursor_get(&cur, path);
        int r = -1;
        if (value != NULL || !PyErr_Occurred()) {
            if (value != NULL) {
                matched++;
            }
            else {
                value = Py_NewRef(p->missing); /* checked in plan_position */
            }
            r = is_leaf(p->st, entry);
            if (r > 0) {
                r = add_position(p, entry, value, path);
            }
            else if (r == 0) {
                r = expand_entry(p, path, entry, value);
            }
        }
        Py_DECREF(path);
        Py_DECREF(entry);
        Py_XDECREF(value);
        if (r < 0) {
            return -1;
        }
    }
    if (PyDict_GET_SIZE(t) != n) {
        PyErr_SetString(PyExc_RuntimeError,
                        "update_refs: target changed size during the call");
        return -1;
    }
    if (matched != PyDict_GET_SIZE(s)) {
        /* name a source path the target does not have */
        Py_ssize_t spos = 0;
        PyObject *k, *v;
        while (PyDict_Next(s, &spos, &k, &v)) {
            Py_INCREF(k);
            int r = PyDict_Contains(t, k);
            if (r == 0) {
                PyErr_Format(PyExc_ValueError,
                             "update_refs: path %R is in the source but not "
                             "in the target",
                             k);
            }
            Py_DECREF(k);
            if (r <= 0) {
                return -1;
            }
        }
        PyErr_SetString(PyExc_RuntimeError,
                        "update_refs: source changed size during the call");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* the plan                                                             */
/* ------------------------------------------------------------------ */

/* Take the value of every source Ref, at one moment: this loop allocates
 * no Python object and so runs no Python code.  A value refx.jit left
 * pending (a Flat, flatvalue.c) is made after it, once per Flat, from the
 * Flat taken at the moment (kept in its Ref if the Ref still holds it). */
static int
plan_snapshot(update_plan *p)
{
    Py_ssize_t n = PyList_GET_SIZE(p->sl);
    p->snap = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(PyObject *));
    if (p->snap == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *s = PyList_GET_ITEM(p->sl, j);
        if (Ref_Check(p->st, s)) {
            p->snap[j] = Py_NewRef(((RefObject *)s)->held);
        }
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *f = p->snap[j];
        if (f == NULL || Py_TYPE(f) != p->st->Flat_Type) {
            continue;
        }
        /* the moment's value, whatever the Ref holds by now */
        PyObject *made =
            refx_ref_made(p->st, (RefObject *)PyList_GET_ITEM(p->sl, j), f);
        if (made == NULL) {
            return -1;
        }
        Py_INCREF(f);
        for (Py_ssize_t i = j; i < n; i++) {
            if (p->snap[i] == f) {
                Py_SETREF(p->snap[i], Py_NewRef(made));
            }
        }
        Py_DECREF(f);
        Py_DECREF(made);
    }
    return 0;
}

/* 1 if a Python scalar may stand for a 0-d array of dtype `dtype`: same
 * kind of number (a bool for bool, an int for an integer dtype, ...), so
 * nothing is cast; 0 if not; -1 with an error. */
static int
scalar_fits(PyObject *scalar, PyObject *dtype)
{
    PyObject *kind = PyObject_GetAttrString(dtype, "kind");
    if (kind == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -1;
        }
        PyErr_Clear();
        return 0; /* an extended dtype (a PRNG key): no scalar fits */
    }
    const char *k = PyUnicode_Check(kind) ? PyUnicode_AsUTF8(kind) : "";
    int r = k == NULL              ? -1
            : PyBool_Check(scalar) ? strcmp(k, "b") == 0
            : PyLong_Check(scalar)
                ? (strcmp(k, "i") == 0 || strcmp(k, "u") == 0)
            : PyFloat_Check(scalar)   ? strcmp(k, "f") == 0
            : PyComplex_Check(scalar) ? strcmp(k, "c") == 0
                                      : 0;
    Py_DECREF(kind);
    return r;
}

/* By path, where the Ref holds an array: the new value must be an array of
 * its shape and dtype, or a Python scalar of its kind for a 0-d array (a
 * step counter in a file), so a checkpoint of the wrong model does not
 * load and nothing is cast silently. */
static int
check_shape(update_plan *p, Py_ssize_t j, PyObject *old, PyObject *new)
{
    refx_state *st = p->st;
    PyObject *oshape = NULL, *odtype = NULL, *nshape = NULL, *ndtype = NULL;
    int res = -1;
    if (new == old) {
        return 0; /* the value it holds: nothing changes */
    }
    oshape = PyObject_GetAttr(old, st->str_shape);
    odtype = oshape != NULL ? PyObject_GetAttr(old, st->str_dtype) : NULL;
    if (odtype == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            goto error;
        }
        PyErr_Clear(); /* not an array: nothing to check */
        res = 0;
        goto error;
    }
    /* exact types: numpy's float64 and complex128 subclass Python's, and
     * must be judged as the arrays they are (by dtype) */
    int scalar = PyFloat_CheckExact(new) || PyLong_CheckExact(new) ||
                 PyBool_Check(new) || PyComplex_CheckExact(new);
    if (scalar) {
        int fits = PyTuple_Check(oshape) && PyTuple_GET_SIZE(oshape) == 0
                       ? scalar_fits(new, odtype)
                       : 0;
        if (fits == 0) {
            fail_at(p, j,
                    "the source is a Python %.200s; the target Ref holds an "
                    "array of shape %R and dtype %S (a Python scalar stands "
                    "only for a 0-d array of its own kind)",
                    Py_TYPE(new)->tp_name, oshape, odtype);
        }
        res = fits == 1 ? 0 : -1;
        goto error;
    }
    /* A new value of the type of the array held (a numpy or jax array,
     * the common case) is an array; any other type needs the isinstance
     * test, which for jax.Array (an ABC) runs Python code. */
    int is_array = st->array_types == NULL || (Py_IS_TYPE(new, Py_TYPE(old)) &&
                                               refx_is_plain_value(st, old))
                       ? 1
                       : PyObject_IsInstance(new, st->array_types);
    if (is_array < 0) {
        goto error;
    }
    nshape = is_array ? PyObject_GetAttr(new, st->str_shape) : NULL;
    ndtype = nshape != NULL ? PyObject_GetAttr(new, st->str_dtype) : NULL;
    if (ndtype == NULL) {
        if (!is_array || PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            fail_at(p, j,
                    "the source is a %.200s, not an array; the target Ref "
                    "holds an array of shape %R and dtype %S",
                    Py_TYPE(new)->tp_name, oshape, odtype);
        }
        goto error;
    }
    int eq = PyObject_RichCompareBool(nshape, oshape, Py_EQ);
    if (eq == 1) {
        eq = PyObject_RichCompareBool(ndtype, odtype, Py_EQ);
        if (eq == 0) {
            fail_at(p, j,
                    "the source has dtype %S but the target Ref holds dtype "
                    "%S",
                    ndtype, odtype);
            goto error;
        }
    }
    else if (eq == 0) {
        fail_at(p, j,
                "the source has shape %R but the target Ref holds shape %R",
                nshape, oshape);
        goto error;
    }
    res = eq == 1 ? 0 : -1;
error:
    Py_XDECREF(oshape);
    Py_XDECREF(odtype);
    Py_XDECREF(nshape);
    Py_XDECREF(ndtype);
    return res;
}

/* Plan to write `value` into `ref` (position j): shape (by path) first;
 * the write check is refx_write_all's, in plan_apply. */
static int
plan_add(update_plan *p, Py_ssize_t j, RefObject *ref, PyObject *value)
{
    Py_INCREF(value); /* the checks may run Python code */
    PyObject *now = p->by_path ? Py_XNewRef(refx_ref_value(p->st, ref))
                               : Py_NewRef(Py_None);
    if (now == NULL || (p->by_path && check_shape(p, j, now, value) < 0)) {
        Py_XDECREF(now);
        Py_DECREF(value);
        return -1;
    }
    Py_DECREF(now);
    p->wrefs[p->nitems] = ref;
    p->wvalues[p->nitems] = value;
    p->wpos[p->nitems] = j;
    p->nitems++;
    return 0;
}

/* A source Ref or Value/Index stands for a Ref of `type` and `collection`:
 * the target Ref must be of the same class and collection. */
static int
check_like_target(update_plan *p, Py_ssize_t j, RefObject *ref,
                  PyTypeObject *type, PyObject *collection, const char *what)
{
    if (type != Py_TYPE(ref)) {
        fail_at(p, j,
                "source %s stands for a %.200s but the target Ref is a "
                "%.200s",
                what, type->tp_name, Py_TYPE(ref)->tp_name);
        return -1;
    }
    if (collection == ref->collection) {
        return 0;
    }
    /* both owned across __eq__, which may run any code */
    PyObject *sc = Py_NewRef(collection);
    PyObject *rc = Py_NewRef(ref->collection);
    int eq = PyObject_RichCompareBool(sc, rc, Py_EQ);
    if (eq == 0) {
        fail_at(p, j,
                "source %s has collection %R but the target Ref has "
                "collection %R",
                what, sc, rc);
    }
    Py_DECREF(sc);
    Py_DECREF(rc);
    return eq > 0 ? 0 : -1;
}

static int
plan_index(update_plan *p, Py_ssize_t j, PyObject *t, DerefObject *d)
{
    PyObject *key = PyLong_FromSsize_t(d->index);
    if (key == NULL) {
        return -1;
    }
    PyObject *owner = PyDict_GetItemWithError(p->value_owner, key);
    Py_DECREF(key);
    if (owner == NULL) {
        if (!PyErr_Occurred()) {
            fail_at(p, j,
                    "Index(%zd) comes before any Value with index %zd; an "
                    "Index must follow its Value",
                    d->index, d->index);
        }
        return -1;
    }
    if (owner != t) {
        fail_at(p, j,
                "source has Index(%zd) but the target Ref here is not the one "
                "Value %zd updates; target and source must share the same "
                "Refs",
                d->index, d->index);
        return -1;
    }
    return check_like_target(p, j, (RefObject *)t,
                             refx_deref_ref_type(p->st, d), d->collection,
                             "Index");
}

static int
plan_value(update_plan *p, Py_ssize_t j, RefObject *ref, refx_ptrmap_entry *te,
           int tfound, ValueObject *v)
{
    DerefObject *d = &v->base;
    PyObject *key = PyLong_FromSsize_t(d->index);
    if (key == NULL) {
        return -1;
    }
    PyObject *prev = PyDict_SetDefault(p->value_owner, key, (PyObject *)ref);
    Py_DECREF(key);
    if (prev == NULL) {
        return -1;
    }
    if (prev != (PyObject *)ref) {
        fail_at(p, j,
                "source has two Values with index %zd; was it deref'ed as "
                "one tree?",
                d->index);
        return -1;
    }
    if (tfound && te->obj != NULL) {
        fail_at(p, j,
                "the target repeats a Ref here but the source has a new Value "
                "(index %zd), not an Index; target and source must share the "
                "same Refs",
                d->index);
        return -1;
    }
    if (check_like_target(p, j, ref, refx_deref_ref_type(p->st, d),
                          d->collection, "Value") < 0) {
        return -1;
    }
    te->obj = (PyObject *)v; /* borrowed: the maps never own their objs */
    return plan_add(p, j, ref, v->value);
}

/* A source Ref or a plain value: the same object must come back wherever
 * the target repeats its Ref (sharing is by identity). */
static int
plan_ref_or_plain(update_plan *p, Py_ssize_t j, RefObject *ref,
                  refx_ptrmap_entry *te, int tfound, PyObject *s, int s_ref)
{
    if (tfound && te->obj != NULL) {
        if (te->obj != s) {
            fail_at(p, j,
                    "the target repeats a Ref here but the source has %s "
                    "that is not the object at the Ref's first position; "
                    "sharing is by identity: give the same object at every "
                    "position of a shared Ref (or, by path, leave the "
                    "repeats out)",
                    s_ref ? "a Ref" : "a value");
            return -1;
        }
        return 0;
    }
    PyObject *value = s;
    if (s_ref) {
        if (check_like_target(p, j, ref, Py_TYPE(s),
                              ((RefObject *)s)->collection, "Ref") < 0) {
            return -1;
        }
        int sfound;
        refx_ptrmap_entry *se = refx_ptrmap_get(&p->sources, s, &sfound);
        if (se == NULL) {
            return -1;
        }
        if (sfound && se->obj != (PyObject *)ref) {
            fail_at(p, j,
                    "the source repeats a Ref here but the target has a "
                    "different Ref; target and source must share alike");
            return -1;
        }
        se->obj = (PyObject *)ref;
        value = p->snap[j];
    }
    te->obj = s;
    return plan_add(p, j, ref, value);
}

/* Check position j and add what it writes to the plan. */
static int
plan_position(update_plan *p, Py_ssize_t j)
{
    refx_state *st = p->st;
    PyObject *t = PyList_GET_ITEM(p->tl, j), *s = PyList_GET_ITEM(p->sl, j);
    if (s == p->missing) {
        /* by path, no source value: fine for NOTHING and plain leaves; a
         * Ref must get its value at another path (plan_check_missing) */
        if (Ref_Check(st, t)) {
            int found;
            if (refx_ptrmap_get(&p->targets, t, &found) == NULL) {
                return -1;
            }
            p->nmissing++;
        }
        return 0;
    }
    int s_ref = Ref_Check(st, s), s_deref = Deref_Check(st, s);
    if (t == st->nothing || s == st->nothing) {
        if (t != s) {
            fail_at(p, j, "target has %s but source has %s", kind_of(st, t),
                    kind_of(st, s));
            return -1;
        }
        return 0;
    }
    if (Deref_Check(st, t)) {
        fail_at(p, j,
                "target has %s (a deref'ed Ref), not a Ref: update_refs "
                "writes into Refs; pass the tree of Refs, not its deref'ed "
                "form (refx.get_partition(model, ...), not of "
                "refx.deref(model))",
                kind_of(st, t));
        return -1;
    }
    if (!Ref_Check(st, t)) {
        if (s_ref || s_deref) {
            fail_at(p, j, "target has %s, not a Ref, but source has %s",
                    kind_of(st, t), kind_of(st, s));
            return -1;
        }
        int leaf = is_leaf(st, s);
        if (leaf == 0) {
            fail_structure_at(p, j,
                              "the target has a leaf (%.200s) there, the "
                              "source a pytree node (%.200s)" STRUCTURE_HINT,
                              Py_TYPE(t)->tp_name, Py_TYPE(s)->tp_name);
        }
        return leaf > 0 ? 0 : -1; /* plain on both sides: nothing to write */
    }
    if (s_ref || s_deref) {
        int m = s_ref ? MODE_REF : MODE_DEREF;
        if (p->mode != MODE_NONE && p->mode != m) {
            fail_at(p, j,
                    "source has %s but earlier positions hold %s; a source "
                    "may not mix Refs with Values/Indexes",
                    kind_of(st, s),
                    p->mode == MODE_REF ? "Refs" : "Values/Indexes");
            return -1;
        }
        p->mode = m;
    }
    RefObject *ref = (RefObject *)t;
    int tfound;
    refx_ptrmap_entry *te = refx_ptrmap_get(&p->targets, t, &tfound);
    if (te == NULL) {
        return -1;
    }
    if (Index_Check(st, s)) {
        return plan_index(p, j, t, (DerefObject *)s);
    }
    if (Value_Check(st, s)) {
        return plan_value(p, j, ref, te, tfound, (ValueObject *)s);
    }
    return plan_ref_or_plain(p, j, ref, te, tfound, s, s_ref);
}

/* By path: every Ref whose path the source left out got its value at
 * another of its paths. */
static int
plan_check_missing(update_plan *p)
{
    Py_ssize_t n = PyList_GET_SIZE(p->tl);
    for (Py_ssize_t j = 0; p->nmissing > 0 && j < n; j++) {
        PyObject *t = PyList_GET_ITEM(p->tl, j);
        if (PyList_GET_ITEM(p->sl, j) != p->missing || !Ref_Check(p->st, t)) {
            continue;
        }
        int found;
        refx_ptrmap_entry *te = refx_ptrmap_get(&p->targets, t, &found);
        if (te == NULL) {
            return -1;
        }
        if (te->obj == NULL) {
            fail_at(p, j,
                    "the source has no value for the Ref here (the path is "
                    "missing from the source, and so are the Ref's other "
                    "paths)");
            return -1;
        }
    }
    return 0;
}

/* Write every planned value, all or nothing (refx_write_all: every write
 * checked, then all stored, old values released after the last store); a
 * refused write is a ValueError at its position's path. */
static int
plan_apply(update_plan *p)
{
    Py_ssize_t failed;
    if (refx_write_all(p->st, p->wrefs, p->wvalues, p->nitems, p->trace,
                       &failed, NULL) == 0) {
        return 0;
    }
    if (failed >= 0 && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyObject *exc = refx_take_exception();
        fail_at(p, p->wpos[failed], "%S", exc);
        Py_XDECREF(exc);
    }
    return -1;
}

static void
plan_fini(update_plan *p)
{
    /* the maps' objs are borrowed: drop them without DECREF */
    refx_ptrmap_fini(&p->targets);
    refx_ptrmap_fini(&p->sources);
    for (Py_ssize_t k = 0; k < p->nitems; k++) {
        Py_XDECREF(p->wvalues[k]);
    }
    PyMem_Free(p->wrefs);
    PyMem_Free(p->wvalues);
    PyMem_Free(p->wpos);
    if (p->snap != NULL) {
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(p->sl); j++) {
            Py_XDECREF(p->snap[j]);
        }
        PyMem_Free(p->snap);
    }
    Py_XDECREF(p->value_owner);
    Py_XDECREF(p->trace);
    Py_XDECREF(p->tl);
    Py_XDECREF(p->sl);
    Py_XDECREF(p->paths);
    Py_XDECREF(p->missing);
}

/* ------------------------------------------------------------------ */
/* update_refs                                                          */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    refx_update_refs__doc__,
    "update_refs($module, target, source, /)\n"
    "--\n\n"
    "Write the values of `source` into the Refs of `target`.\n\n"
    "`target` is a tree (or Partition) of Refs; `source` a tree of the same\n"
    "structure holding Refs, deref'ed Values/Indexes, or plain values at "
    "the\n"
    "Refs' places, or, when `target` is a Partition, a dict keyed by path\n"
    "(which may leave out NOTHING paths and repeats of a shared Ref, and "
    "must\n"
    "match the shape and dtype of each array a Ref holds).  Where the "
    "target\n"
    "shares a Ref the source must share too (by identity).  Every position "
    "is\n"
    "checked, including the trace-level write check, before any Ref is\n"
    "written: on error no Ref has changed.");

static PyObject *
refx_update_refs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    update_plan p = {.st = st};
    PyObject *res = NULL;
    refx_ptrmap_init(&p.targets);
    refx_ptrmap_init(&p.sources);
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "update_refs() takes 2 arguments (target, source) but "
                     "%zd were given",
                     nargs);
        goto error;
    }
    if (refx_require_trees(st, "update_refs") < 0) {
        goto error;
    }
    p.target = args[0];
    p.source = args[1];
    p.by_path = Partition_Check(st, p.target) && PyDict_Check(p.source);
    /* inside a refx transform, closed-over Refs are written and read as
     * .value does: through their stand-ins (ref.c) */
    if ((p.by_path ? collect_by_path(&p) : collect_by_leaf(&p)) < 0 ||
        refx_substitute_captured(st, &p.tl, Py_True) < 0 ||
        refx_substitute_captured(st, &p.sl, Py_False) < 0 ||
        plan_snapshot(&p) < 0) {
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(p.tl);
    p.trace = refx_current_trace(st);
    p.value_owner = PyDict_New();
    size_t nalloc = (size_t)(n > 0 ? n : 1);
    p.wrefs = PyMem_Malloc(nalloc * sizeof(RefObject *));
    p.wvalues = PyMem_Malloc(nalloc * sizeof(PyObject *));
    p.wpos = PyMem_Malloc(nalloc * sizeof(Py_ssize_t));
    if (p.trace == NULL || p.value_owner == NULL || p.wrefs == NULL ||
        p.wvalues == NULL || p.wpos == NULL) {
        if (p.wrefs == NULL || p.wvalues == NULL || p.wpos == NULL) {
            PyErr_NoMemory();
        }
        goto error;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        if (plan_position(&p, j) < 0) {
            goto error;
        }
    }
    if (plan_check_missing(&p) < 0) {
        goto error;
    }
    if (plan_apply(&p) < 0) {
        goto error;
    }
    res = Py_NewRef(Py_None);
error:
    plan_fini(&p);
    return res;
}

PyMethodDef refx_update_functions[] = {
    {"update_refs", (PyCFunction)(void (*)(void))refx_update_refs,
     METH_FASTCALL, refx_update_refs__doc__},
    {NULL, NULL, 0, NULL},
};
