/*
 * update.c: update_refs(target, source).
 *
 * Writes the values of `source` into the Refs of `target`, position by
 * position.  Positions come from one of two alignments:
 *
 *   by path  when `target` is a Partition and `source` a dict (a
 *            Partition, or e.g. a checkpoint {path: array}): each target
 *            path is looked up in the source (walked in lockstep while the
 *            orders agree).  The source may leave out a path where the
 *            target holds NOTHING, or repeats a Ref that the source gives
 *            a value at another path (a checkpoint stores a tied weight
 *            once); every source path must be a target path;
 *   by leaf  otherwise: both trees are flattened with Ref/Value/Index/
 *            NOTHING as leaves and must have the same number of leaves.
 *
 * At each position the target holds a Ref, NOTHING (the source must hold
 * NOTHING too) or a plain leaf (skipped when the source's is plain too).
 * The source holds, for a Ref target, one of:
 *
 *   a Ref            its value is written ("Ref mode");
 *   Value / Index    as made by deref ("deref mode"): Value(v, i, c) writes
 *                    v, Index(i) must sit where the target has the same Ref
 *                    as at Value i's position, and c must equal the Ref's
 *                    collection;
 *   a plain value    written as is.
 *
 * A source may not mix Refs with Values/Indexes.  Sharing must line up:
 * where the target repeats a Ref, the source must repeat the same source
 * Ref, give an Index to the Value written there, or repeat the identical
 * plain object; and one source Ref or Value may not feed two different
 * target Refs.
 *
 * All or nothing.  Phase 1 walks every position and checks everything,
 * including the trace-level write check of each distinct target Ref,
 * collecting a plan of (Ref, new value) pairs.  Phase 2 stores the plan and
 * cannot fail, and runs no Python code: the old values are released after
 * the last store.  So a call that raises has changed no Ref, and no other
 * thread (nor a __del__) sees an update half-applied.  Phase 1 may run
 * Python code (collection __eq__, the tracer check), which is why the
 * identity tables borrow only objects the flattened leaf lists keep alive.
 *
 * Functions in this file: collect_pairs_* (the two alignments),
 * refx_update_refs.
 */
#include "refx.h"
#include "ptrmap.h"

typedef struct {
    refx_state *st;
    PyObject *target, *source; /* the original trees, for error paths */
    int by_path;
    PyObject *paths;   /* by path: list of paths, one per position */
    PyObject *missing; /* by path: stands for "no such source path" */
} update_ctx;

/* repr of position j's path (new ref) */
static PyObject *
position_path(update_ctx *c, Py_ssize_t j)
{
    if (c->by_path) {
        return PyObject_Repr(PyList_GET_ITEM(c->paths, j));
    }
    return refx_leaf_path_repr(c->st, c->target, c->st->pred_refx, j);
}

/* ValueError "update_refs: <msg with %U for the path>" */
static void
fail_at(update_ctx *c, Py_ssize_t j, const char *fmt, ...)
{
    PyObject *path = position_path(c, j);
    if (path == NULL) {
        return;
    }
    va_list va;
    va_start(va, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (msg != NULL) {
        PyErr_Format(PyExc_ValueError, "update_refs: at %U: %U", path, msg);
        Py_DECREF(msg);
    }
    Py_DECREF(path);
}

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

/* Fill *tl and *sl with aligned lists of target and source leaves. */
static int
collect_by_leaf(update_ctx *c, PyObject **tl, PyObject **sl)
{
    refx_state *st = c->st;
    PyObject *ttd = NULL, *std = NULL;
    /* The target is usually a tree of Refs: flatten it without the leaf
     * predicate (~25% of a flatten) unless it turns out to hold
     * Value/Index/NOTHING nodes (see deref_nodes_seen in refx.h). */
    uint64_t d0 = st->deref_nodes_seen, z0 = st->nothing_nodes_seen;
    *tl = refx_flatten(st, c->target, NULL, &ttd);
    if (*tl == NULL) {
        return -1;
    }
    Py_DECREF(ttd);
    if (st->deref_nodes_seen != d0 || st->nothing_nodes_seen != z0) {
        Py_CLEAR(*tl);
        *tl = refx_flatten(st, c->target, st->pred_refx, &ttd);
        if (*tl == NULL) {
            return -1;
        }
        Py_DECREF(ttd);
    }
    *sl = refx_flatten(st, c->source, st->pred_refx, &std);
    if (*sl == NULL) {
        return -1;
    }
    Py_DECREF(std);
    Py_ssize_t nt = PyList_GET_SIZE(*tl), ns = PyList_GET_SIZE(*sl);
    if (nt != ns) {
        Py_ssize_t j = nt < ns ? nt : ns;
        PyObject *path =
            j < nt ? refx_leaf_path_repr(st, c->target, st->pred_refx, j)
                   : refx_leaf_path_repr(st, c->source, st->pred_refx, j);
        if (path != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "update_refs: target has %zd leaves but source has "
                         "%zd; they first differ at %s leaf %zd, %U",
                         nt, ns, j < nt ? "target" : "source", j, path);
            Py_DECREF(path);
        }
        return -1;
    }
    return 0;
}

static int
collect_by_path(update_ctx *c, PyObject **tl, PyObject **sl)
{
    PyObject *t = c->target, *s = c->source;
    Py_ssize_t n = PyDict_GET_SIZE(t), matched = 0;
    *tl = PyList_New(n);
    *sl = PyList_New(n);
    c->paths = PyList_New(n);
    /* a fresh object: no source value can be it */
    c->missing = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (*tl == NULL || *sl == NULL || c->paths == NULL || c->missing == NULL) {
        return -1;
    }
    Py_ssize_t tpos = 0, spos = 0, j = 0;
    int lockstep = 1;
    PyObject *path, *tv;
    while (PyDict_Next(t, &tpos, &path, &tv)) {
        if (j >= n) {
            PyErr_SetString(PyExc_RuntimeError,
                            "update_refs: target changed size during the "
                            "call");
            return -1;
        }
        /* own everything before comparing keys, which may run Python code
         * that mutates either dict and frees borrowed items */
        PyList_SET_ITEM(*tl, j, Py_NewRef(tv));
        PyList_SET_ITEM(c->paths, j, Py_NewRef(path));
        PyObject *key = NULL, *sv = NULL, *bsv;
        if (lockstep && PyDict_Next(s, &spos, &key, &bsv)) {
            if (key == path) {
                sv = Py_NewRef(bsv);
            }
            else {
                Py_INCREF(bsv);
                Py_INCREF(key);
                Py_INCREF(path);
                int eq = PyObject_RichCompareBool(key, path, Py_EQ);
                Py_DECREF(key);
                Py_DECREF(path);
                if (eq < 0) {
                    Py_DECREF(bsv);
                    return -1;
                }
                if (eq) {
                    sv = bsv;
                }
                else {
                    Py_DECREF(bsv);
                    lockstep = 0;
                }
            }
        }
        if (sv == NULL) {
            sv = Py_XNewRef(PyDict_GetItemWithError(s, path));
            if (sv == NULL && PyErr_Occurred()) {
                return -1;
            }
        }
        if (sv == NULL) {
            sv = Py_NewRef(c->missing); /* checked in phase 1 */
        }
        else {
            matched++;
        }
        PyList_SET_ITEM(*sl, j, sv);
        j++;
    }
    if (j != n) {
        PyErr_SetString(PyExc_RuntimeError,
                        "update_refs: target changed size during the call");
        return -1;
    }
    if (matched != PyDict_GET_SIZE(s)) {
        /* name a source path the target does not have */
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(s, &pos, &k, &v)) {
            Py_INCREF(k);
            int r = PyDict_Contains(t, k);
            if (r <= 0) {
                if (r == 0) {
                    PyErr_Format(PyExc_ValueError,
                                 "update_refs: path %R is in the source but "
                                 "not in the target",
                                 k);
                }
                Py_DECREF(k);
                return -1;
            }
            Py_DECREF(k);
        }
        PyErr_SetString(PyExc_RuntimeError,
                        "update_refs: source changed size during the call");
        return -1;
    }
    return 0;
}

typedef struct {
    RefObject *ref;  /* borrowed (kept alive by the leaf lists) */
    PyObject *value; /* owned: phase 1 may run Python code that replaces a
                        source Ref's value */
} plan_item;

enum { MODE_NONE, MODE_REF, MODE_DEREF };

PyDoc_STRVAR(
    update_refs_doc,
    "update_refs($module, target, source, /)\n"
    "--\n\n"
    "Write the values of `source` into the Refs of `target`.\n\n"
    "`target` is a tree (or Partition) of Refs; `source` a tree of the same\n"
    "shape holding Refs, deref'ed Values/Indexes, or plain values (a dict\n"
    "keyed by path when `target` is a Partition, which may leave out NOTHING\n"
    "paths and repeats of a shared Ref).  Where the target shares a\n"
    "Ref, the source must share too.  Every position is checked, including\n"
    "the trace-level write check, before any Ref is written: on error no Ref\n"
    "has changed.");

static PyObject *
refx_update_refs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *tl = NULL, *sl = NULL, *trace = NULL, *by_index = NULL;
    PyObject *res = NULL;
    plan_item *plan = NULL;
    Py_ssize_t nplan = 0;
    refx_ptrmap tmap, smap;
    refx_ptrmap_init(&tmap);
    refx_ptrmap_init(&smap);
    update_ctx c = {st, NULL, NULL, 0, NULL, NULL};
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
    c.target = args[0];
    c.source = args[1];
    c.by_path = Partition_Check(st, c.target) && PyDict_Check(c.source);
    if ((c.by_path ? collect_by_path(&c, &tl, &sl)
                   : collect_by_leaf(&c, &tl, &sl)) < 0) {
        goto error;
    }
    trace = refx_current_trace(st);
    by_index = PyDict_New();
    Py_ssize_t n = PyList_GET_SIZE(tl);
    plan = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(plan_item));
    if (trace == NULL || by_index == NULL || plan == NULL) {
        if (plan == NULL) {
            PyErr_NoMemory();
        }
        goto error;
    }
    int mode = MODE_NONE;
    Py_ssize_t nmissing = 0;

    /* phase 1: check every position, build the plan */
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *t = PyList_GET_ITEM(tl, j), *s = PyList_GET_ITEM(sl, j);
        if (s == c.missing) {
            /* by path, no source value: fine for NOTHING and plain leaves;
             * a Ref must get its value at another path (checked below) */
            if (Ref_Check(st, t)) {
                int found;
                if (refx_ptrmap_get(&tmap, t, &found) == NULL) {
                    goto error;
                }
                nmissing++;
            }
            continue;
        }
        int s_ref = Ref_Check(st, s), s_deref = Deref_Check(st, s);
        if (t == st->nothing || s == st->nothing) {
            if (t != s) {
                fail_at(&c, j, "target has %s but source has %s",
                        kind_of(st, t), kind_of(st, s));
                goto error;
            }
            continue;
        }
        if (!Ref_Check(st, t)) {
            if (s_ref || s_deref) {
                fail_at(&c, j, "target has %s, not a Ref, but source has %s",
                        kind_of(st, t), kind_of(st, s));
                goto error;
            }
            continue; /* plain leaf on both sides: nothing to write */
        }
        if (s_ref || s_deref) {
            int m = s_ref ? MODE_REF : MODE_DEREF;
            if (mode != MODE_NONE && mode != m) {
                fail_at(&c, j,
                        "source has %s but earlier positions hold %s; a "
                        "source may not mix Refs with Values/Indexes",
                        kind_of(st, s),
                        mode == MODE_REF ? "Refs" : "Values/Indexes");
                goto error;
            }
            mode = m;
        }
        RefObject *ref = (RefObject *)t;
        int tfound;
        refx_ptrmap_entry *te = refx_ptrmap_get(&tmap, t, &tfound);
        if (te == NULL) {
            goto error;
        }
        PyObject *newvalue;
        if (Index_Check(st, s)) {
            DerefObject *d = (DerefObject *)s;
            PyObject *key = PyLong_FromSsize_t(d->index);
            if (key == NULL) {
                goto error;
            }
            PyObject *owner = PyDict_GetItemWithError(by_index, key);
            Py_DECREF(key);
            if (owner == NULL) {
                if (!PyErr_Occurred()) {
                    fail_at(&c, j,
                            "Index(%zd) comes before any Value with index "
                            "%zd; an Index must follow its Value",
                            d->index, d->index);
                }
                goto error;
            }
            if (owner != t) {
                fail_at(&c, j,
                        "source has Index(%zd) but the target Ref here is "
                        "not the one Value %zd updates; target and source "
                        "must share the same Refs",
                        d->index, d->index);
                goto error;
            }
            continue;
        }
        if (Value_Check(st, s)) {
            DerefObject *d = (DerefObject *)s;
            PyObject *key = PyLong_FromSsize_t(d->index);
            if (key == NULL) {
                goto error;
            }
            PyObject *prev = PyDict_SetDefault(by_index, key, t);
            Py_DECREF(key);
            if (prev == NULL) {
                goto error;
            }
            if (prev != t) {
                fail_at(&c, j,
                        "source has two Values with index %zd; was it "
                        "deref'ed as one tree?",
                        d->index);
                goto error;
            }
            if (tfound && te->obj != NULL) {
                fail_at(&c, j,
                        "the target repeats a Ref here but the source has a "
                        "new Value (index %zd), not an Index; target and "
                        "source must share the same Refs",
                        d->index);
                goto error;
            }
            if (d->collection != ref->collection) {
                /* owned across __eq__, which may re-init the Ref and free
                 * its collection mid-comparison */
                PyObject *rc = Py_NewRef(ref->collection);
                int eq = PyObject_RichCompareBool(d->collection, rc, Py_EQ);
                Py_DECREF(rc);
                if (eq < 0) {
                    goto error;
                }
                if (!eq) {
                    fail_at(&c, j,
                            "source Value has collection %R but the target "
                            "Ref has collection %R",
                            d->collection, ref->collection);
                    goto error;
                }
            }
            newvalue = ((ValueObject *)s)->value;
        }
        else {
            /* a source Ref or a plain value: the same object must come
             * back wherever the target repeats its Ref */
            if (tfound && te->obj != NULL) {
                if (te->obj != s) {
                    fail_at(&c, j,
                            "the target repeats a Ref here but the source "
                            "has %s different from the one at its first "
                            "position; target and source must share alike",
                            s_ref ? "a Ref" : "a value");
                    goto error;
                }
                continue;
            }
            if (s_ref) {
                int sfound;
                refx_ptrmap_entry *se = refx_ptrmap_get(&smap, s, &sfound);
                if (se == NULL) {
                    goto error;
                }
                if (sfound && se->obj != t) {
                    fail_at(&c, j,
                            "the source repeats a Ref here but the target "
                            "has a different Ref; target and source must "
                            "share alike");
                    goto error;
                }
                se->obj = t; /* borrowed: not released (see below) */
                newvalue = ((RefObject *)s)->value;
            }
            else {
                newvalue = s;
            }
        }
        te->obj = s; /* borrowed: these maps never own their objs */
        /* owned from here: the check may run Python code (a custom node's
         * flatten) that replaces a source Ref's value and frees this one */
        Py_INCREF(newvalue);
        if (refx_check_write(st, ref, newvalue, trace) < 0) {
            Py_DECREF(newvalue);
            PyObject *et, *ev, *etb;
            PyErr_Fetch(&et, &ev, &etb);
            PyErr_NormalizeException(&et, &ev, &etb);
            if (PyErr_GivenExceptionMatches(et, PyExc_ValueError)) {
                fail_at(&c, j, "%S", ev);
                Py_XDECREF(et);
                Py_XDECREF(ev);
                Py_XDECREF(etb);
            }
            else {
                PyErr_Restore(et, ev, etb);
            }
            goto error;
        }
        plan[nplan].ref = ref;
        plan[nplan].value = newvalue;
        nplan++;
    }

    /* every Ref with a missing source path got a value at another path */
    for (Py_ssize_t j = 0; nmissing > 0 && j < n; j++) {
        PyObject *t = PyList_GET_ITEM(tl, j);
        if (PyList_GET_ITEM(sl, j) != c.missing || !Ref_Check(st, t)) {
            continue;
        }
        int found;
        refx_ptrmap_entry *te = refx_ptrmap_get(&tmap, t, &found);
        if (te == NULL) {
            goto error;
        }
        if (te->obj == NULL) {
            fail_at(&c, j,
                    "the source has no value for the Ref here (the path is "
                    "missing from the source, and so are the Ref's other "
                    "paths)");
            goto error;
        }
    }

    /* phase 2: write; nothing here can fail.  The old values are released
     * only after every store: releasing one may run a __del__ that lets
     * another thread in, which then saw (or wrote over) a half-applied
     * update.  plan[k].value takes the old value; the cleanup drops it. */
    for (Py_ssize_t k = 0; k < nplan; k++) {
        PyObject *old = Py_NewRef(plan[k].ref->value);
        refx_ref_store(st, plan[k].ref, plan[k].value);
        Py_SETREF(plan[k].value, old); /* the Ref holds the new value */
    }
    res = Py_NewRef(Py_None);
error:
    /* the maps' objs are borrowed: drop them without DECREF */
    refx_ptrmap_fini(&tmap);
    refx_ptrmap_fini(&smap);
    for (Py_ssize_t k = 0; k < nplan; k++) {
        Py_XDECREF(plan[k].value);
    }
    PyMem_Free(plan);
    Py_XDECREF(by_index);
    Py_XDECREF(trace);
    Py_XDECREF(tl);
    Py_XDECREF(sl);
    Py_XDECREF(c.paths);
    Py_XDECREF(c.missing);
    return res;
}

PyMethodDef refx_update_functions[] = {
    {"update_refs", (PyCFunction)(void (*)(void))refx_update_refs,
     METH_FASTCALL, update_refs_doc},
    {NULL, NULL, 0, NULL},
};
