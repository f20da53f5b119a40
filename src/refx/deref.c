/*
 * deref.c: deref, reref and clone.
 *
 * deref(tree) makes a tree of Refs safe to hand to JAX.  The tree is
 * flattened by JAX (Refs are leaves), the distinct Refs are numbered from
 * 0 in leaf order, the first occurrence of Ref number i becomes
 * Value(ref.value, i, ref.collection), each later occurrence
 * Index(i, ref.collection), and the tree is unflattened with the same
 * treedef.  Other leaves pass through untouched; values are never copied.
 *
 *   One moment.  All values must be read at one moment: never half of
 *   another thread's update_refs (with values read while allocating, 358
 *   of 3,000 derefs racing a writer thread returned a mix, issue 10).  An
 *   allocation is the only way Python code could run inside the loop (it
 *   may start a garbage collection, whose finalizers run Python code and
 *   may let another thread in), so the loop runs with the collector paused
 *   (PyGC_Disable; it is restored before returning, errors included).
 *   With that, nothing but this call runs from the first value read to the
 *   last.  (CPython 3.12+ only collects at the next bytecode boundary, so
 *   there the pause costs nothing and changes nothing.)
 *
 *   Tracked later.  The Values and Refs these calls make are tracked by
 *   the collector when what they hold could lead back to them (a
 *   jax.Array can: see ref.c's essay on GC).  Tracked from birth, they
 *   were found alive by the collections the call's own allocations start
 *   (in the unflatten, say), reachable only from the result being built,
 *   and promoted to older generations: at 3,000 Refs enough of them to
 *   set off a full collection of the whole heap every ~75 calls, which
 *   made deref 2.2x slower with the collector on (measured with
 *   gc.callbacks).  So each is made untracked (a plain Ref is born so:
 *   refx_ref_create_untracked; slot->track, or reref's track[], says it
 *   must be tracked) and tracked when the call ends, on
 *   every exit once it may have reached Python code (the unflatten runs
 *   custom nodes' functions, which could keep it).  Until then the
 *   collector does not see it, which is safe: it only makes what it
 *   references look referenced from outside.
 *
 *   Identity.  "Is this Ref new?" is answered by marks in the Ref itself:
 *   each deref/clone call takes a fresh epoch number and stamps every Ref
 *   it numbers with (epoch, number).  That costs one load per leaf, where a
 *   hash table keyed by address costs a cache miss per leaf once the table
 *   outgrows the cache (measured: 1.67x of the flatten+unflatten floor at
 *   100k Refs with a table; commit 8102970).  Since no other code runs
 *   while the loop does, no other call can stamp a Ref in the meantime
 *   (the loop used to be able to, and then redid itself with a map).
 *
 *   Reused Values.  A Value is immutable, so a Value that says the same as
 *   the one deref would make may be given instead.  Each Ref keeps the last
 *   Value made of it (RefObject.last) and deref gives it again when its
 *   value, collection and kind are the same objects as the Ref's now and
 *   its number is this call's (value_of).  Nothing is trusted from when it
 *   was kept: all four are compared on every use, so a write, a new
 *   attribute or another position in another tree gives a new Value.  The
 *   kept Value only costs memory when it holds what the Ref no longer
 *   does: every store of a new value drops it (ref.c, ref_store), and a
 *   donating refx.jit drops it before counting who holds the array (jit.c),
 *   so a dropped deref'ed tree never keeps an array undonated.  Kinds with
 *   instance attributes are new tuples per call and are never kept.  Why:
 *   at 100,000 Refs the cost of deref was cache misses on the arrays (the
 *   new Value's reference to each, and again when the result is freed),
 *   not instructions; a reused Value touches neither (flat list of 100,000
 *   Refs: 5.2x -> 1.9x the flatten+unflatten floor, same run, issue 19).
 *
 *   Memoized flattens.  A program derefs, clones and rerefs trees of the
 *   same structure call after call, and jaxlib's flatten (a treedef built
 *   node by node, dict keys sorted, a registry lookup and, for reref, a
 *   call of the leaf predicate per node) was up to half of each.  So they
 *   flatten as refx.jit flattens its arguments (flatmemo.c): against
 *   two memos of structures that came more than once, for trees of Refs
 *   (deref, clone: st->ref_tree_memo) and for deref'ed trees (reref, with
 *   Value/Index as leaves: st->reref_memo), which give the leaves and the
 *   memo's treedef when the tree has one's structure; otherwise jaxlib
 *   flattens (refx_memo_flatten_eager says when a memo is made).  Only
 *   outside every transform (memo_allowed): a memo made in a trace would
 *   keep that trace's tracers (a module static closing over one) past its
 *   end.  The output is unflattened with the memo's treedef, so these
 *   memos are strict where refx.jit's is not: a module's static
 *   attributes must be the memo's own objects, not equal ones (a static
 *   set to 2.0 where it was 2 comes out as 2.0).  The memos hold treedefs
 *   (dict keys, node aux data, leaf types: never a leaf) of the last few
 *   structures until others replace them.  (deref at ~30 Refs: 1.07x ->
 *   0.66x the flatten+unflatten floor; reref 1.50x -> 0.85x, at ~100,000
 *   Refs 2.12x -> 1.63x; benchmarks/NOTES.md.)
 *
 *   Already deref'ed input.  Value and Index are pytree nodes, so a plain
 *   flatten would walk into them; refx_flatten_leaves redoes the flatten
 *   with them as leaves when the tree held any, and the first one is
 *   named in the error.
 *
 * reref(tree) is the inverse.  It flattens with Value/Index as leaves and
 * then, as update_refs does, plans and applies.  The plan walks the leaves
 * in order and checks them all: Value(v, i, c) must have i == the number
 * of Values seen (it will make the i-th new Ref), Index(i, c) must name a
 * Value already seen with the same collection and kind, and a value
 * holding tracers of another trace (a deref'ed tree that escaped a
 * finished jit) is refused, as Ref() refuses it.  The plan also makes each
 * plain Value's new Ref as soon as that Value passes, while the array is
 * in the cache (see reref_plan); the Refs stay unpublished until the
 * application builds the tree from them, and a refused input releases
 * those it made, which nothing saw (a plain Ref has no finalizer; a
 * subclass's Ref, whose __del__ could see it, is made by the application).  Every new Ref belongs to the trace current at the
 * call: reref inside jit makes Refs that jit's body may write.
 *
 * clone(tree) is reref(deref(tree)) in one call: the same numbering, with
 * one new Ref per distinct Ref made from the values as read.  Their values
 * are then checked as reref checks them (Python code, after the loop).
 *
 * Functions in this file: the numbering (number_ref), flatten_ref_tree,
 * refx_deref and deref_leaves (value_of), refx_reref (reref_plan_leaf with
 * reref_plan_value and reref_plan_index, then reref_apply), refx_clone and
 * clone_leaves.
 */
#include "refx.h"

/* ------------------------------------------------------------------ */
/* numbering distinct Refs                                              */
/* ------------------------------------------------------------------ */

typedef struct {
    RefObject *ref;  /* owned: the leaves list is rewritten in place */
    PyObject *obj;   /* owned: the shared Index (deref), the new Ref (clone) */
    PyObject *kind;  /* owned: the Ref's kind (NULL: a plain Ref) */
    PyObject *stale; /* owned: the Ref's last Value this call replaced */
    Py_ssize_t first; /* leaf position of its first occurrence */
    int track; /* its Value (deref) or new Ref (clone) awaits tracking */
} numbered;

typedef struct {
    uint64_t epoch;
    numbered *slots;
    Py_ssize_t count, cap;
} numbering;

static void
numbering_init(refx_state *st, numbering *nb)
{
    nb->epoch = ++st->epoch;
    nb->slots = NULL;
    nb->count = nb->cap = 0;
}

static void
numbering_fini(numbering *nb)
{
    for (Py_ssize_t i = 0; i < nb->count; i++) {
        Py_DECREF(nb->slots[i].ref);
        Py_XDECREF(nb->slots[i].obj);
        Py_XDECREF(nb->slots[i].kind);
        Py_XDECREF(nb->slots[i].stale);
    }
    PyMem_Free(nb->slots);
    nb->slots = NULL;
    nb->count = nb->cap = 0;
}

/* Untrack `o` if it is tracked; 1 if so (it must be tracked again by
 * track_again when the call ends: see "Tracked later"). */
static inline int
defer_tracking(PyObject *o)
{
    if (!PyObject_GC_IsTracked(o)) {
        return 0;
    }
    PyObject_GC_UnTrack(o);
    return 1;
}

/* Track `o` again, unless something did already (a write to a Ref
 * tracks it; PyObject_GC_Track on a tracked object is a fatal error). */
static inline void
track_again(PyObject *o)
{
    if (!PyObject_GC_IsTracked(o)) {
        PyObject_GC_Track(o);
    }
}

/* Track again what the numbered slots made (items: deref's leaves, whose
 * Value for slot k sits at its first position; NULL: clone's new Refs,
 * in slot->obj). */
static void
numbering_track(numbering *nb, PyObject *const *items)
{
    for (Py_ssize_t k = 0; k < nb->count; k++) {
        numbered *slot = &nb->slots[k];
        if (slot->track) {
            track_again(items != NULL ? items[slot->first] : slot->obj);
            slot->track = 0;
        }
    }
}

/* The number of `ref` in this call; *is_new says whether it was just
 * given one.  -1 with MemoryError set. */
static inline Py_ssize_t
number_ref(numbering *nb, RefObject *ref, Py_ssize_t pos, int *is_new)
{
    if (ref->mark_epoch == nb->epoch) {
        *is_new = 0;
        return ref->mark_index;
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
    Py_ssize_t k = nb->count++;
    nb->slots[k].ref = (RefObject *)Py_NewRef(ref);
    nb->slots[k].obj = NULL;
    nb->slots[k].kind = NULL;
    nb->slots[k].stale = NULL;
    nb->slots[k].first = pos;
    nb->slots[k].track = 0;
    ref->mark_epoch = nb->epoch;
    ref->mark_index = k;
    *is_new = 1;
    return k;
}

/* May a flatten go through a memo here?  Only outside every transform:
 * a memo keeps its treedef, whose aux data made inside a trace may hold
 * that trace's tracers (a static closing over one) past its end.  1 yes,
 * 0 no, -1 error. */
static int
memo_allowed(refx_state *st)
{
    if (st->jit_eval_trace == NULL) {
        return 0;
    }
    PyObject *wr = refx_current_trace(st);
    if (wr == NULL) {
        return -1;
    }
    int r = PyWeakref_Check(wr) &&
            refx_weakref_is_a(wr, (PyTypeObject *)st->jit_eval_trace);
    Py_DECREF(wr);
    return r;
}

/* A flatten through `*slot` when memo_allowed, else jaxlib's. */
static PyObject *
memo_flatten(refx_state *st, PyObject **slot, PyObject *tree, PyObject *pred,
             PyObject **treedef)
{
    int allowed = memo_allowed(st);
    if (allowed < 0) {
        return NULL;
    }
    return allowed ? refx_memo_flatten_eager(st, slot, tree, pred, treedef)
                   : refx_flatten(st, tree, pred, treedef);
}

/* Flatten a tree of Refs (Value/Index as leaves if it holds any, so they
 * can be named), through the Ref-tree memo (see "Memoized flattens").  The
 * leaves list is ours alone, to rewrite in place. */
static PyObject *
flatten_ref_tree(refx_state *st, const char *fname, PyObject *tree,
                 PyObject **treedef)
{
    uint64_t seen = st->deref_nodes_seen;
    PyObject *leaves =
        memo_flatten(st, &st->ref_tree_memo, tree, NULL, treedef);
    if (leaves != NULL && st->deref_nodes_seen != seen) {
        /* a Value/Index was flattened as a node (never on a memo hit: a
         * tree holding one is not memoized); again, with them as leaves
         * (refx_flatten_leaves' test, for the same reason) */
        Py_DECREF(leaves);
        Py_CLEAR(*treedef);
        leaves = refx_flatten(st, tree, st->pred_deref, treedef);
    }
    if (leaves == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        if (Deref_Check(st, leaf)) {
            refx_raise_at_leaf(
                st, PyExc_ValueError, tree, st->pred_deref, i,
                "%s: %s found at {path}; expected a tree of Refs (was it "
                "already deref'ed?)",
                fname, Value_Check(st, leaf) ? "Value" : "Index");
            goto error;
        }
    }
    if (Py_REFCNT(leaves) != 1) { /* not ours alone: work on a copy */
        Py_SETREF(leaves, PyList_GetSlice(leaves, 0, PY_SSIZE_T_MAX));
        if (leaves == NULL) {
            goto error;
        }
    }
    /* inside a refx transform, closed-over Refs are read as .value reads
     * them: through their stand-ins (before the one-moment loop: the hook
     * is Python code) */
    if (refx_substitute_captured(st, &leaves, Py_False) < 0) {
        goto error;
    }
    return leaves;
error:
    Py_DECREF(leaves);
    Py_CLEAR(*treedef);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* deref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    refx_deref__doc__,
    "deref($module, tree, /)\n"
    "--\n\n"
    "Replace the Refs of `tree` by Value and Index nodes, giving a pure "
    "pytree.\n\n"
    "Distinct Refs are numbered in leaf order from 0: the first occurrence "
    "of\n"
    "Ref i becomes Value(ref.value, i, ref.collection), later occurrences\n"
    "Index(i, ref.collection).  Other leaves pass through; values are not\n"
    "copied, and all are read at one moment (a concurrent update_refs is\n"
    "seen whole or not at all).  Values are immutable: a Ref unchanged since\n"
    "the last deref (same value, collection, kind and number) gives the same\n"
    "Value object again.  Call it before a tree of Refs crosses a JAX\n"
    "transform, and `reref` on the other side.  A Value or Index in `tree` "
    "is\n"
    "a ValueError.");

/* A Ref's kind rides in the deref'ed tree's aux data, which jax.jit
 * hashes: a subclass's instance attributes must be hashable.  Checked
 * after the loop (hashing runs Python code); the kinds of Refs without
 * attributes are hashable by construction. */
static int
check_kinds(refx_state *st, PyObject *tree, numbering *nb)
{
    for (Py_ssize_t k = 0; k < nb->count; k++) {
        PyObject *kind = nb->slots[k].kind;
        if (kind == NULL || PyTuple_GET_SIZE(PyTuple_GET_ITEM(kind, 2)) == 0) {
            continue;
        }
        if (PyObject_Hash(kind) == -1) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyObject *exc = refx_take_exception();
                refx_raise_at_leaf(
                    st, PyExc_TypeError, tree, st->pred_deref,
                    nb->slots[k].first,
                    "deref: the %.200s at {path} has an instance attribute "
                    "that cannot be hashed (%S); a deref'ed Ref carries its "
                    "class, metadata and attributes in the tree's static "
                    "data, which jax.jit hashes",
                    Py_TYPE(nb->slots[k].ref)->tp_name, exc);
                Py_XDECREF(exc);
            }
            return -1;
        }
    }
    return 0;
}

/* The Value of `ref`, number k of this call: its last one if that still
 * says the same (see "Reused Values"), else a new one, then kept as its
 * last when its kind is the Ref's own (a kind with attributes is a new
 * tuple per call, so a kept Value could never match).  The Value it
 * replaces is released when the call ends (slot->stale), not inside the
 * loop.  New reference, or NULL with an error. */
static inline PyObject *
value_of(refx_state *st, RefObject *ref, Py_ssize_t k, numbered *slot)
{
    ValueObject *last = (ValueObject *)ref->last;
    PyObject *value = refx_ref_value(st, ref); /* no Python code runs */
    if (value == NULL) {
        return NULL;
    }
    if (last != NULL && last->value == value && last->base.index == k &&
        last->base.collection == ref->collection &&
        last->base.kind == slot->kind) {
        return Py_NewRef(last);
    }
    PyObject *new =
        refx_value_create_kind(st, value, k, ref->collection, slot->kind);
    if (new == NULL) {
        return NULL;
    }
    slot->track = defer_tracking(new);
    if (slot->kind == ref->kind) {
        slot->stale = ref->last;
        ref->last = Py_NewRef(new);
    }
    return new;
}

/* Replace the Refs of `leaves` (a list only we hold) in place, with the
 * collector paused (see "One moment").  Rewriting in place saves a second
 * list of n items.  The caller owns `nb` (zeroed), so that it can track
 * the Values when the call ends, and finalizes it. */
static int
deref_leaves(refx_state *st, PyObject *tree, PyObject *leaves, numbering *nbp)
{
    numbering_init(st, nbp);
    numbering nb = *nbp; /* a local copy for the loop; stored back below */
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    PyObject **items = &PyList_GET_ITEM(leaves, 0);
    int res = -1, gc_was_on = PyGC_Disable();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = items[i], *new;
        if (!Ref_Check(st, leaf)) {
            continue;
        }
        RefObject *ref = (RefObject *)leaf;
        int is_new;
        Py_ssize_t k = number_ref(&nb, ref, i, &is_new);
        if (k < 0) {
            goto done;
        }
        numbered *slot = &nb.slots[k];
        if (is_new) {
            int err;
            slot->kind = refx_ref_kind(st, ref, &err);
            if (err) {
                goto done;
            }
            new = value_of(st, ref, k, slot);
        }
        else {
            if (slot->obj == NULL) {
                slot->obj =
                    refx_index_create_kind(st, k, ref->collection, slot->kind);
                if (slot->obj == NULL) {
                    goto done;
                }
            }
            new = Py_NewRef(slot->obj);
        }
        if (new == NULL) {
            goto done;
        }
        items[i] = new;
        Py_DECREF(leaf); /* the Ref stays alive: the slot owns it */
    }
    if (gc_was_on) {
        PyGC_Enable();
        gc_was_on = 0;
    }
    res = check_kinds(st, tree, &nb);
done:
    if (gc_was_on) {
        PyGC_Enable();
    }
    *nbp = nb; /* the caller tracks the Values and finalizes */
    return res;
}

static PyObject *
refx_deref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *res = NULL;
    numbering nb = {0};
    if (refx_require_trees(st, "deref") < 0) {
        return NULL;
    }
    leaves = flatten_ref_tree(st, "deref", tree, &treedef);
    if (leaves == NULL || deref_leaves(st, tree, leaves, &nb) < 0) {
        goto error;
    }
    res = refx_unflatten(st, treedef, leaves);
error:
    if (leaves != NULL) {
        numbering_track(&nb, &PyList_GET_ITEM(leaves, 0));
    }
    numbering_fini(&nb);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

/* ------------------------------------------------------------------ */
/* reref                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    refx_reref__doc__,
    "reref($module, tree, /)\n"
    "--\n\n"
    "Rebuild Refs from a deref'ed tree, with sharing intact.\n\n"
    "Each Value becomes a new Ref(value, collection) belonging to the "
    "current\n"
    "JAX trace, each Index the Ref its Value made.  Values must be numbered\n"
    "0, 1, 2... in leaf order and every Index must follow its Value; a Ref "
    "in\n"
    "`tree`, or a value holding tracers of another trace, is a ValueError.");

/* reref is a plan, then its application, as update_refs is.  The plan
 * (reref_plan_leaf, one function per kind of leaf) walks the leaves once, in
 * order, checks everything and makes the Refs: Values numbered 0, 1, 2...,
 * each Index after its Value with the same collection and kind, no Ref, and
 * each Value's value as Ref() checks it (the tracer check, which may run
 * Python code); then, for a plain Ref, Value j's Ref, made right away,
 * while the value's memory is loaded for the check (at ~100,000 Refs a
 * second visit to each array, in a later pass, found it evicted: measured
 * with perf, the make step's stall on the array's reference count was the
 * largest cost).  The Refs stay unpublished (untracked, held only by the
 * plan) until reref_apply builds the output leaves and tree from them; a
 * reref refused for its input releases the Refs it made, which nothing ever
 * saw.  A subclass's Ref is made by reref_apply: its __del__ (run when a
 * refused call released it) could see and keep it. */
typedef struct {
    refx_state *st;
    PyObject *tree,
        *pred;            /* the argument and the leaf predicate, for errors */
    PyObject *leaves;     /* owned: Value/Index are leaves */
    PyObject *trace;      /* owned: the current trace's weakref */
    DerefObject **values; /* borrowed (`leaves` holds them): Value number j */
    PyObject **refs;      /* owned: the Ref made of Value j */
    char *track;          /* refs[j] awaits tracking (see "Tracked later") */
    Py_ssize_t *ref_at;   /* per leaf: the number of the Ref it becomes, or
                           * -1 (passes through): reref_apply reads this,
                           * not the leaves (a second miss per Value) */
    Py_ssize_t nvalues;
} reref_plan;

/* Make the Ref of Value j (its value, collection and kind). */
static int
make_ref(reref_plan *p, Py_ssize_t j)
{
    DerefObject *d = p->values[j];
    PyObject *value = ((ValueObject *)d)->value, *ref;
    int track;
    if (d->kind == NULL) {
        ref = refx_ref_create_untracked(p->st, value, d->collection, p->trace,
                                        &track);
    }
    else {
        ref = refx_ref_create_kind(p->st, d->kind, value, d->collection,
                                   p->trace);
        track = ref != NULL ? defer_tracking(ref) : 0;
    }
    if (ref == NULL) {
        return -1;
    }
    p->track[j] = (char)track;
    p->refs[j] = ref;
    return 0;
}

static int
reref_plan_value(reref_plan *p, Py_ssize_t i, ValueObject *v)
{
    refx_state *st = p->st;
    DerefObject *d = (DerefObject *)v;
    if (d->index != p->nvalues) {
        refx_raise_at_leaf(
            st, PyExc_ValueError, p->tree, p->pred, i,
            "reref: Value at {path} has index %zd, expected %zd; Values must "
            "be numbered 0, 1, 2... in leaf order (was the tree deref'ed as a "
            "whole?)",
            d->index, p->nvalues);
        return -1;
    }
    /* the value is checked as Ref() would check it */
    if (refx_check_value(st, v->value, p->trace) < 0) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *exc = refx_take_exception();
            refx_raise_at_leaf(st, PyExc_ValueError, p->tree, p->pred, i,
                               "reref: at {path}: %S", exc);
            Py_DECREF(exc);
        }
        return -1;
    }
    p->refs[p->nvalues] = NULL;
    p->track[p->nvalues] = 0;
    p->values[p->nvalues] = d;
    /* a plain Ref now, while the value is in the cache (a subclass's is
     * made by reref_apply: its __del__ may not see a refused call's Ref) */
    if (d->kind == NULL && make_ref(p, p->nvalues) < 0) {
        return -1;
    }
    p->nvalues++;
    return 0;
}

static int
reref_plan_index(reref_plan *p, Py_ssize_t i, DerefObject *d)
{
    refx_state *st = p->st;
    if (d->index >= p->nvalues) {
        refx_raise_at_leaf(
            st, PyExc_ValueError, p->tree, p->pred, i,
            "reref: Index(%zd) at {path} comes before any Value with index "
            "%zd; an Index must follow its Value in leaf order",
            d->index, d->index);
        return -1;
    }
    /* the Ref its Value makes has the Value's collection and kind */
    DerefObject *vd = p->values[d->index];
    if (vd->collection != d->collection) {
        int eq =
            PyObject_RichCompareBool(vd->collection, d->collection, Py_EQ);
        if (eq < 0) {
            return -1;
        }
        if (!eq) {
            refx_raise_at_leaf(st, PyExc_ValueError, p->tree, p->pred, i,
                               "reref: Index(%zd) at {path} has collection %R "
                               "but its Value has collection %R",
                               d->index, d->collection, vd->collection);
            return -1;
        }
    }
    /* kinds made by deref are shared objects: usually a pointer test; the
     * Value's is the Ref's own or that Ref's cache */
    PyObject *vk = vd->kind;
    if (vk != d->kind) {
        int eq = vk != NULL && d->kind != NULL
                     ? PyObject_RichCompareBool(vk, d->kind, Py_EQ)
                     : 0;
        if (eq < 0) {
            return -1;
        }
        if (!eq) {
            refx_raise_at_leaf(
                st, PyExc_ValueError, p->tree, p->pred, i,
                "reref: Index(%zd) at {path} stands for a %.200s with "
                "metadata %R but its Value for a %.200s with metadata %R",
                d->index, refx_deref_ref_type(st, d)->tp_name,
                d->kind != NULL ? PyTuple_GET_ITEM(d->kind, 1) : Py_None,
                refx_deref_ref_type(st, vd)->tp_name,
                vk != NULL ? PyTuple_GET_ITEM(vk, 1) : Py_None);
            return -1;
        }
    }
    return 0;
}

/* Check leaf i and plan what it becomes. */
static int
reref_plan_leaf(reref_plan *p, Py_ssize_t i)
{
    refx_state *st = p->st;
    PyObject *leaf = PyList_GET_ITEM(p->leaves, i);
    PyTypeObject *tp = Py_TYPE(leaf);
    p->ref_at[i] = -1;
    if (tp == st->Value_Type) {
        p->ref_at[i] = p->nvalues;
        return reref_plan_value(p, i, (ValueObject *)leaf);
    }
    if (tp == st->Index_Type) {
        p->ref_at[i] = ((DerefObject *)leaf)->index;
        return reref_plan_index(p, i, (DerefObject *)leaf);
    }
    if (Ref_Check(st, leaf)) {
        refx_raise_at_leaf(st, PyExc_ValueError, p->tree, p->pred, i,
                           "reref: Ref found at {path}; expected a deref'ed "
                           "tree of Values and Indexes (was it already "
                           "reref'ed?)");
        return -1;
    }
    return 0; /* passes through */
}

/* The output tree of a checked plan: Value j becomes its Ref (a
 * subclass's is made now), each Index the Ref its Value made, other leaves
 * pass through.  New reference. */
static PyObject *
reref_apply(reref_plan *p, PyObject *treedef)
{
    Py_ssize_t n = PyList_GET_SIZE(p->leaves);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    /* make_ref may run Python code (a subclass Ref): the list, NULL items
     * until filled, stays out of gc.get_objects() */
    PyObject_GC_UnTrack(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t k = p->ref_at[i];
        PyObject *new;
        if (k < 0) {
            new = Py_NewRef(PyList_GET_ITEM(p->leaves, i));
        }
        else {
            /* a Value comes before its Indexes: its position makes it */
            if (p->refs[k] == NULL && make_ref(p, k) < 0) {
                Py_DECREF(out);
                return NULL;
            }
            new = Py_NewRef(p->refs[k]);
        }
        PyList_SET_ITEM(out, i, new);
    }
    PyObject_GC_Track(out);
    PyObject *res = refx_unflatten(p->st, treedef, out);
    Py_DECREF(out);
    return res;
}

static PyObject *
refx_reref(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    reref_plan p = {.st = st, .tree = tree, .pred = st->pred_deref};
    PyObject *treedef = NULL, *res = NULL;
    if (refx_require_trees(st, "reref") < 0) {
        goto done;
    }
    p.leaves = memo_flatten(st, &st->reref_memo, tree, p.pred, &treedef);
    if (p.leaves == NULL) {
        goto done;
    }
    p.trace = refx_current_trace(st);
    if (p.trace == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(p.leaves);
    size_t cap = (size_t)(n > 0 ? n : 1);
    /* one block for the plan's four arrays (pointer-sized first) */
    if (cap > (PY_SSIZE_T_MAX - 1) / (3 * sizeof(void *) + 1)) {
        PyErr_NoMemory();
        goto done;
    }
    char *block = PyMem_Malloc(cap * (3 * sizeof(void *) + 1));
    if (block == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    p.values = (DerefObject **)block;
    p.refs = (PyObject **)(block + cap * sizeof(void *));
    p.ref_at = (Py_ssize_t *)(block + 2 * cap * sizeof(void *));
    p.track = block + 3 * cap * sizeof(void *);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (reref_plan_leaf(&p, i) < 0) {
            goto done;
        }
    }
    res = reref_apply(&p, treedef);
done:
    for (Py_ssize_t j = 0; j < p.nvalues; j++) {
        if (p.track[j]) {
            track_again(p.refs[j]); /* the output (or a custom node) may
                                       hold it; if not, it is freed now */
        }
        Py_XDECREF(p.refs[j]);
    }
    PyMem_Free(p.values); /* the whole block */
    Py_XDECREF(p.trace);
    Py_XDECREF(p.leaves);
    Py_XDECREF(treedef);
    return res;
}

/* ------------------------------------------------------------------ */
/* clone                                                                */
/* ------------------------------------------------------------------ */

PyDoc_STRVAR(
    refx_clone__doc__,
    "clone($module, tree, /)\n"
    "--\n\n"
    "Same as reref(deref(tree)), in one call: a copy of `tree` with new Refs\n"
    "(of the current trace) that share among themselves as the old ones did.");

/* The Refs of `leaves` (a list only we hold) replaced in place by new
 * Refs, as deref_leaves does; then every new Ref's value is checked (this
 * runs Python code, so it comes after the loop).  The caller owns `nb`,
 * as for deref_leaves. */
static int
clone_leaves(refx_state *st, PyObject *tree, PyObject *leaves, PyObject *trace,
             numbering *nbp)
{
    numbering_init(st, nbp);
    numbering nb = *nbp; /* a local copy for the loop; stored back below */
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    PyObject **items = &PyList_GET_ITEM(leaves, 0);
    int res = -1, gc_was_on = PyGC_Disable();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = items[i];
        if (!Ref_Check(st, leaf)) {
            continue;
        }
        RefObject *ref = (RefObject *)leaf;
        int is_new;
        Py_ssize_t k = number_ref(&nb, ref, i, &is_new);
        if (k < 0) {
            goto done;
        }
        numbered *slot = &nb.slots[k];
        if (is_new) {
            int err;
            slot->kind = refx_ref_kind(st, ref, &err);
            if (err) {
                goto done;
            }
            PyObject *value = refx_ref_value(st, ref); /* no Python code */
            if (value == NULL) {
                goto done;
            }
            if (slot->kind == NULL) {
                slot->obj = refx_ref_create_untracked(
                    st, value, ref->collection, trace, &slot->track);
            }
            else {
                slot->obj = refx_ref_create_kind(st, slot->kind, value,
                                                 ref->collection, trace);
                if (slot->obj != NULL) {
                    slot->track = defer_tracking(slot->obj);
                }
            }
            if (slot->obj == NULL) {
                goto done;
            }
        }
        items[i] = Py_NewRef(slot->obj);
        Py_DECREF(leaf); /* the old Ref stays alive: the slot owns it */
    }
    if (gc_was_on) {
        PyGC_Enable();
        gc_was_on = 0;
    }
    /* the value checks run Python code: after the loop */
    res = 0;
    for (Py_ssize_t k = 0; k < nb.count && res == 0; k++) {
        RefObject *r = (RefObject *)nb.slots[k].obj;
        PyObject *value = refx_ref_value(st, r);
        if (value == NULL || refx_check_value(st, value, trace) < 0) {
            res = -1;
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                /* name the Ref's first position in the tree */
                Py_ssize_t at = 0;
                while (at < n && items[at] != (PyObject *)r) {
                    at++;
                }
                PyObject *exc = refx_take_exception();
                refx_raise_at_leaf(st, PyExc_ValueError, tree, st->pred_deref,
                                   at, "clone: at {path}: %S", exc);
                Py_DECREF(exc);
            }
        }
    }
done:
    if (gc_was_on) {
        PyGC_Enable();
    }
    *nbp = nb; /* the caller tracks the new Refs and finalizes */
    return res;
}

static PyObject *
refx_clone(PyObject *module, PyObject *tree)
{
    refx_state *st = refx_get_state(module);
    PyObject *leaves = NULL, *treedef = NULL, *trace = NULL, *res = NULL;
    numbering nb = {0};
    if (refx_require_trees(st, "clone") < 0) {
        return NULL;
    }
    leaves = flatten_ref_tree(st, "clone", tree, &treedef);
    if (leaves == NULL) {
        goto error;
    }
    trace = refx_current_trace(st);
    if (trace == NULL || clone_leaves(st, tree, leaves, trace, &nb) < 0) {
        goto error;
    }
    res = refx_unflatten(st, treedef, leaves);
error:
    numbering_track(&nb, NULL);
    numbering_fini(&nb);
    Py_XDECREF(trace);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

PyMethodDef refx_deref_functions[] = {
    {"deref", refx_deref, METH_O, refx_deref__doc__},
    {"reref", refx_reref, METH_O, refx_reref__doc__},
    {"clone", refx_clone, METH_O, refx_clone__doc__},
    {NULL, NULL, 0, NULL},
};
