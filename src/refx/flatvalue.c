/*
 * flatvalue.c: a Ref's pytree value through refx.jit as its leaves.
 *
 * refx.jit hands the jax.jit function of a cache entry each distinct Ref's
 * value (jit.c, "call").  For an array that is one leaf.  For a value that
 * is a pytree (an optimiser state kept in one Ref, as users write it:
 * optax's namedtuples over a Partition of Values) jaxlib's C++ dispatch
 * flattened it on the way in and unflattened the written one on the way
 * out, and refx's own nodes in it (Partition, Value, Index, NOTHING) are
 * custom nodes to jaxlib: a call into the registry per node each way, a
 * node_data comparison per node in the signature, the nodes' vectors
 * allocated and freed.  Measured in instructions (callgrind, the depth-5
 * SGD step of bench_step.py), that state in one Ref cost refx.jit 113,000
 * instructions a call more than the same state in one Ref per array.
 *
 * So such a value crosses jax.jit as one node of our own, a Flat:
 *
 *     Flat(leaves, spec)    leaves: a tuple, the value's jaxlib leaves
 *                           spec:   a FlatSpec, the value's structure
 *
 * registered with JAX (refx/_wiring.py) with the leaves as its children
 * and the spec as its aux data.  A FlatSpec holds a value memo (flatmemo.c:
 * the value's treedef and the records of a walk that checks a tree against
 * it, refx's own nodes included) and compares and hashes as its treedef
 * does.  So jax.jit's signature for a Flat is the value's treedef (==,
 * exactly what it compared when it flattened the value itself) plus the
 * leaves' avals: the same retraces, for the same reasons.  The traced
 * function rebuilds the value from the Flat (once per trace,
 * refx/_jit.py) and hands back each written value that is a pytree as a
 * Flat of its own, built while tracing; jax.jit's unflatten of its output
 * then makes one Flat per written value (one registry call), and
 * jit_finish rebuilds the value from it in C (refx_value_memo_rebuild:
 * tuples, lists, dicts, namedtuples by their class, refx's nodes by their
 * C unflatten), before anything is written.
 *
 * On the way in the value is checked against the memo of the last value
 * seen at the same Ref number by the same JitFunction (jf->vmemo, a list:
 * per Ref number None (not tried), a FlatSpec, or False (passed as it
 * is)): a walk in C that gives jaxlib's leaves when the structure is the
 * memo's (flatmemo.c's argument: exact types, arities, dict keys, the
 * registry unchanged; aux data the same objects or of the same types and
 * ==, stricter than jaxlib's ==, since the traced function rebuilds the
 * value with the memo's aux objects); the FlatSpec object is then the memo's own,
 * so jax.jit's signature comparison is an identity test.  When it is not,
 * jaxlib flattens the value and a new memo is made from its answer.  A Ref
 * number whose memo has been made again three times in a row, each after
 * fewer than eight hits of the memo before (structures alternating: A B,
 * A A B, ...), or whose value has a node the memo does not take (a custom node other
 * than refx's, an nn.Module), passes its values as they are from then on,
 * as before this file.  What is passed is always either the value or a
 * Flat of exactly jaxlib's leaves and an equal treedef: the memo is a
 * hint, never trusted.  (A jax.jit cache hit for an equal treedef whose
 * aux objects differ, 1 where 1.0 was, runs the old trace, as jax.jit
 * always has; see docs/pitfalls.md on cache keys.)
 *
 * JitFunction.lower passes the values as they are (no Flat), so the
 * Lowered's args_info shows each value's own structure.
 *
 * Only the values refx.jit passes without donation go as Flats (donation
 * counts references to a value's arrays, jit.c value_donatable); written
 * values come back as Flats on every path.
 *
 * Pending values.  Rebuilding a written value and walking it again at the
 * next call is most of what a pytree value costs (in the depth-5 SGD step,
 * ~50,000 instructions a call: a Partition's key table, 20 Values, the
 * namedtuples, freeing the last ones).  So a written Flat may stay in its
 * Ref as it is, pending, and the next call passes it on untouched: a Ref's
 * slot (RefObject.held) holds either its value or such a Flat, and
 * everything but refx.jit's snapshot reads it through refx_ref_value,
 * which makes the value (and keeps it in the slot) on the first read.
 * A written Flat is left pending when
 *
 *   - its spec is the one this JitFunction passed that Ref number's value
 *     with (jf->vmemo): the trace hands a written value back with the spec
 *     it was given when their structures are the same, aux data compared
 *     strictly (_flat_out, refx_value_memo_same), so the next call's
 *     identity test hits;
 *   - the spec is lazy (refx_value_memo_lazy): making the value runs no
 *     Python code (plain namedtuples built by tuple.__new__, str dict keys,
 *     refx's nodes with str/int/None aux data), so it cannot fail but for
 *     memory, nobody can see it run late, and it may run inside deref's
 *     one moment; a value whose making runs code (a namedtuple with its own
 *     __new__, a collection with a Python __hash__) is made at the call,
 *     as before, so its errors stay the call's;
 *   - its leaves are concrete (not tracers of an enclosing trace).
 *
 * Readers: .value (and a capture stand-in's), repr, deref, clone,
 * update_refs (its snapshot makes them after the moment, once per Flat),
 * the capture hook, the clone check, the write check (holds_only_plain
 * looks at a Flat's leaves).  refx.jit itself: a Flat whose spec is not
 * the number's memo is made for the call (refx_flat_in), not in the Ref;
 * a donating call makes them into their Refs first (a Flat's leaves are
 * references more to the arrays), and the cache-miss description and
 * JitFunction.lower get them made.
 *
 * Functions in this file: FlatSpec (richcompare, hash), Flat (its pytree
 * flatten/unflatten), refx_flat_in (jit.c, per call),
 * refx_flat_restore_all (jit.c, the written values; may_pend),
 * refx_flat_value and refx_flat_leaves (ref.c, deref.c, update.c), _flat_out and _flat_restore (refx/_jit.py,
 * per trace), refx_init_flat.
 */
#include "refx.h"
#include <structmember.h>

/* A Ref number's memo is made again at most FLAT_MAX_MISSES times in a
 * row that each followed fewer than FLAT_PAYS hits of the memo before:
 * a memo costs about a flatten to make, so one hit a few times pays for
 * itself, one made for every other call (A A B A A B ...) does not. */
#define FLAT_MAX_MISSES 3
#define FLAT_PAYS 8

/* ------------------------------------------------------------------ */
/* FlatSpec                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *memo; /* a value memo (flatmemo.c): the 5-tuple */
    long misses;    /* memos made in a row for this Ref number, each after
                     * fewer than FLAT_PAYS hits of the one before */
    long hits;      /* this memo's hits */
    char lazy;      /* refx_value_memo_lazy(memo): a Flat of it may be left
                     * in a Ref, pending (see "Pending values") */
} FlatSpecObject;
#define SPEC_CAST(op) ((FlatSpecObject *)(op))
#define SPEC_TREEDEF(op) PyTuple_GET_ITEM(SPEC_CAST(op)->memo, 0)

typedef struct {
    PyObject_HEAD
    PyObject *leaves; /* tuple */
    PyObject *spec;   /* FlatSpec */
} FlatObject;
#define FLAT_CAST(op) ((FlatObject *)(op))

static PyObject *
spec_create(refx_state *st, PyObject *memo, long misses)
{
    FlatSpecObject *self = PyObject_GC_New(FlatSpecObject, st->FlatSpec_Type);
    if (self == NULL) {
        return NULL;
    }
    self->memo = Py_NewRef(memo);
    self->misses = misses;
    self->hits = 0;
    self->lazy = (char)refx_value_memo_lazy(st, memo);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
spec_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(SPEC_CAST(op)->memo);
    return 0;
}

static int
spec_clear(PyObject *op)
{
    Py_CLEAR(SPEC_CAST(op)->memo);
    return 0;
}

static void
spec_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    spec_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* == and hash: the treedef's (a cleared spec, reachable only through
 * gc.get_referents games, equals only itself) */
static PyObject *
spec_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(a) != Py_TYPE(b)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    int eq;
    if (a == b) {
        eq = 1;
    }
    else if (SPEC_CAST(a)->memo == NULL || SPEC_CAST(b)->memo == NULL) {
        eq = 0;
    }
    else {
        eq = PyObject_RichCompareBool(SPEC_TREEDEF(a), SPEC_TREEDEF(b), Py_EQ);
        if (eq < 0) {
            return NULL;
        }
    }
    return Py_NewRef((eq == (op == Py_EQ)) ? Py_True : Py_False);
}

static Py_hash_t
spec_hash(PyObject *op)
{
    if (SPEC_CAST(op)->memo == NULL) {
        return _Py_HashPointer(op);
    }
    return PyObject_Hash(SPEC_TREEDEF(op));
}

static PyObject *
spec_repr(PyObject *op)
{
    if (SPEC_CAST(op)->memo == NULL) {
        return PyUnicode_FromString("FlatSpec(<cleared>)");
    }
    return PyUnicode_FromFormat("FlatSpec(%R)", SPEC_TREEDEF(op));
}

static PyObject *
spec_get_treedef(PyObject *op, void *Py_UNUSED(closure))
{
    if (SPEC_CAST(op)->memo == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(SPEC_TREEDEF(op));
}

static PyGetSetDef spec_getset[] = {
    {"treedef", spec_get_treedef, NULL, "The value's treedef.", NULL},
    {NULL},
};

PyDoc_STRVAR(spec_doc,
             "The structure of a Ref's pytree value passed to jax.jit as its "
             "leaves\n(refx.jit's internals; see flatvalue.c).  Equal and "
             "hashed as its treedef.");

static PyType_Slot spec_slots[] = {
    {Py_tp_doc, (void *)spec_doc},
    {Py_tp_traverse, spec_traverse},
    {Py_tp_clear, spec_clear},
    {Py_tp_dealloc, spec_dealloc},
    {Py_tp_richcompare, spec_richcompare},
    {Py_tp_hash, spec_hash},
    {Py_tp_repr, spec_repr},
    {Py_tp_getset, spec_getset},
    {0, NULL},
};

static PyType_Spec spec_spec = {
    .name = "refx._core._FlatSpec",
    .basicsize = sizeof(FlatSpecObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = spec_slots,
};

/* ------------------------------------------------------------------ */
/* Flat                                                                 */
/* ------------------------------------------------------------------ */

/* steals nothing; `leaves` must be a tuple of the spec's leaf count */
static PyObject *
flat_create(refx_state *st, PyObject *leaves, PyObject *spec)
{
    FlatObject *self = PyObject_GC_New(FlatObject, st->Flat_Type);
    if (self == NULL) {
        return NULL;
    }
    self->leaves = Py_NewRef(leaves);
    self->spec = Py_NewRef(spec);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
flat_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(FLAT_CAST(op)->leaves);
    Py_VISIT(FLAT_CAST(op)->spec);
    return 0;
}

static int
flat_clear(PyObject *op)
{
    Py_CLEAR(FLAT_CAST(op)->leaves);
    Py_CLEAR(FLAT_CAST(op)->spec);
    return 0;
}

static void
flat_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    flat_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *
flat_repr(PyObject *op)
{
    FlatObject *f = FLAT_CAST(op);
    return PyUnicode_FromFormat(
        "Flat(<%zd leaves>, %R)",
        f->leaves != NULL ? PyTuple_GET_SIZE(f->leaves) : (Py_ssize_t)0,
        f->spec != NULL ? f->spec : Py_None);
}

static PyMemberDef flat_members[] = {
    {"leaves", T_OBJECT, offsetof(FlatObject, leaves), READONLY,
     "The value's leaves, a tuple."},
    {"spec", T_OBJECT, offsetof(FlatObject, spec), READONLY,
     "The value's structure, a FlatSpec."},
    {NULL},
};

PyDoc_STRVAR(flat_doc,
             "A Ref's pytree value as its leaves and structure, the form in "
             "which\nrefx.jit passes it through jax.jit (internals; see "
             "flatvalue.c).");

static PyType_Slot flat_slots[] = {
    {Py_tp_doc, (void *)flat_doc},
    {Py_tp_traverse, flat_traverse},
    {Py_tp_clear, flat_clear},
    {Py_tp_dealloc, flat_dealloc},
    {Py_tp_repr, flat_repr},
    {Py_tp_members, flat_members},
    {0, NULL},
};

static PyType_Spec flat_spec = {
    .name = "refx._core._Flat",
    .basicsize = sizeof(FlatObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = flat_slots,
};

/* ------------------------------------------------------------------ */
/* the value's way in and out                                           */
/* ------------------------------------------------------------------ */

/* May `v` be passed as a Flat?  The containers users keep in a Ref; any
 * other value (an array, a scalar, a custom node) goes as it is. */
static int
flat_candidate(refx_state *st, PyObject *v)
{
    PyTypeObject *tp = Py_TYPE(v);
    return PyTuple_Check(v) || tp == &PyList_Type || tp == &PyDict_Type ||
           tp == st->Partition_Type || tp == st->Value_Type;
}

/* A new Flat of `value` with a memo made from jaxlib's flatten of it, or
 * the value itself (a new reference) when it has a node the memo does not
 * take; *spec_out (when not NULL) gets the new spec, borrowed from the
 * Flat (NULL when none was made). */
static PyObject *
flat_fresh(refx_state *st, PyObject *value, long misses, PyObject **spec_out)
{
    if (spec_out != NULL) {
        *spec_out = NULL;
    }
    PyObject *treedef = NULL, *memo = NULL, *spec = NULL, *tuple = NULL;
    PyObject *res = NULL;
    Py_ssize_t regsize = PyDict_GET_SIZE(st->pytree_registry);
    PyObject *leaves = refx_flatten(st, value, NULL, &treedef);
    if (leaves == NULL) {
        return NULL;
    }
    memo = refx_value_memo(st, leaves, treedef, regsize);
    if (memo == NULL) {
        res = PyErr_Occurred() ? NULL : Py_NewRef(value);
        goto done;
    }
    spec = spec_create(st, memo, misses);
    tuple = spec != NULL ? PyList_AsTuple(leaves) : NULL;
    res = tuple != NULL ? flat_create(st, tuple, spec) : NULL;
    if (res != NULL && spec_out != NULL) {
        *spec_out = FLAT_CAST(res)->spec;
    }
done:
    Py_XDECREF(tuple);
    Py_XDECREF(spec);
    Py_XDECREF(memo);
    Py_XDECREF(treedef);
    Py_DECREF(leaves);
    return res;
}

static PyObject *flat_restore(refx_state *st, PyObject *v, int pending);

PyObject *
refx_flat_in(refx_state *st, PyObject **slots, Py_ssize_t k, PyObject *value)
{
    if (Py_TYPE(value) == st->Flat_Type) {
        /* a value left pending by this function's last write of this
         * number passes on as it is; any other is made first */
        PyObject *spec = FLAT_CAST(value)->spec;
        if (*slots != NULL && k < PyList_GET_SIZE(*slots) && spec != NULL &&
            PyList_GET_ITEM(*slots, k) == spec) {
            SPEC_CAST(spec)->hits++;
            return Py_NewRef(value);
        }
        PyObject *made = flat_restore(st, value, 1);
        PyObject *res = made != NULL && Py_TYPE(made) != st->Flat_Type
                            ? refx_flat_in(st, slots, k, made)
                            : NULL;
        if (made != NULL && res == NULL && !PyErr_Occurred()) {
            REFX_BUG("a Flat rebuilt into a Flat");
        }
        Py_XDECREF(made);
        return res;
    }
    if (!flat_candidate(st, value) || st->pytree_registry == NULL) {
        return Py_NewRef(value);
    }
    if (*slots == NULL) {
        *slots = PyList_New(0);
        if (*slots == NULL) {
            return NULL;
        }
    }
    /* held, as the spec below: Python code the walk runs (an aux __eq__)
     * may clear the JitFunction's cache, or let another thread do it */
    PyObject *list = Py_NewRef(*slots);
    while (PyList_GET_SIZE(list) <= k) {
        if (PyList_Append(list, Py_None) < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    PyObject *spec = Py_NewRef(PyList_GET_ITEM(list, k));
    long misses = 0;
    PyObject *res = NULL;
    if (spec == Py_False) {
        res = Py_NewRef(value);
        goto done;
    }
    if (Py_TYPE(spec) == st->FlatSpec_Type && SPEC_CAST(spec)->memo != NULL) {
        PyObject *leaves =
            refx_value_memo_leaves(st, SPEC_CAST(spec)->memo, value);
        if (leaves != NULL) {
            PyObject *tuple = PyList_AsTuple(leaves);
            Py_DECREF(leaves);
            res = tuple != NULL ? flat_create(st, tuple, spec) : NULL;
            Py_XDECREF(tuple);
            SPEC_CAST(spec)->hits++;
            goto done;
        }
        if (PyErr_Occurred()) {
            goto done;
        }
        misses = SPEC_CAST(spec)->hits < FLAT_PAYS
                     ? SPEC_CAST(spec)->misses + 1
                     : 0;
    }
    PyObject *fresh = NULL;
    if (misses <= FLAT_MAX_MISSES) {
        res = flat_fresh(st, value, misses, &fresh);
        if (res == NULL) {
            goto done;
        }
    }
    else {
        res = Py_NewRef(value);
    }
    /* the slot again: Python code may have shrunk the list meanwhile */
    if (PyList_GET_SIZE(list) > k) {
        PyObject *now = fresh != NULL ? fresh : Py_False;
        PyObject *old = PyList_GET_ITEM(list, k);
        PyList_SET_ITEM(list, k, Py_NewRef(now));
        Py_DECREF(old);
    }
done:
    Py_DECREF(spec);
    Py_DECREF(list);
    return res;
}

/* The value of Flat `v`, rebuilt (pending: one a Ref held, see
 * refx_value_memo_rebuild).  New reference. */
static PyObject *
flat_restore(refx_state *st, PyObject *v, int pending)
{
    FlatObject *f = FLAT_CAST(v);
    if (f->leaves == NULL || f->spec == NULL ||
        Py_TYPE(f->spec) != st->FlatSpec_Type ||
        SPEC_CAST(f->spec)->memo == NULL) {
        return REFX_BUG("a cleared Flat");
    }
    return refx_value_memo_rebuild(st, SPEC_CAST(f->spec)->memo, f->leaves,
                                   pending);
}

PyObject *
refx_flat_leaves(PyObject *flat)
{
    return FLAT_CAST(flat)->leaves;
}

PyObject *
refx_flat_value(refx_state *st, PyObject *v)
{
    return Py_TYPE(v) == st->Flat_Type ? flat_restore(st, v, 1) : Py_NewRef(v);
}

/* May written Flat `v`, for Ref number `k`, be left in its Ref pending?
 * If its spec is the one refx.jit passed that number's values with (the
 * trace reused it, flat_out_py), so the next call passes it on untouched;
 * if the spec is lazy (its rebuild runs no Python code) and its classes
 * still are (refx_value_memo_plain_now: a namedtuple given a __new__
 * since, found by the hostile review); and if its leaves
 * are all concrete (refx_is_plain_value: jax Arrays, not tracers of an
 * enclosing trace). */
static int
may_pend(refx_state *st, PyObject *v, PyObject *slots, PyObject *written,
         Py_ssize_t w)
{
    FlatObject *f = FLAT_CAST(v);
    if (slots == NULL || f->spec == NULL || f->leaves == NULL ||
        !SPEC_CAST(f->spec)->lazy ||
        !refx_value_memo_plain_now(st, SPEC_CAST(f->spec)->memo)) {
        return 0;
    }
    Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(written, w));
    if (k < 0 || k >= PyList_GET_SIZE(slots) ||
        PyList_GET_ITEM(slots, k) != f->spec) {
        PyErr_Clear();
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f->leaves); i++) {
        if (!refx_is_plain_value(st, PyTuple_GET_ITEM(f->leaves, i))) {
            return 0;
        }
    }
    return 1;
}

PyObject *
refx_flat_restore_all(refx_state *st, PyObject *values, PyObject *slots,
                      PyObject *written)
{
    Py_ssize_t n = PyList_GET_SIZE(values), first = 0;
    while (first < n &&
           Py_TYPE(PyList_GET_ITEM(values, first)) != st->Flat_Type) {
        first++;
    }
    if (first == n) { /* no Flat: the list itself, as most calls have it */
        return Py_NewRef(values);
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    PyObject_GC_UnTrack(out); /* NULL items until filled, and a rebuild
                               * may run Python code (a namedtuple's class) */
    Py_XINCREF(slots);        /* which may clear the JitFunction's cache */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        v = i >= first && Py_TYPE(v) == st->Flat_Type &&
                    !may_pend(st, v, slots, written, i)
                ? flat_restore(st, v, 0)
                : Py_NewRef(v);
        if (v == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    Py_XDECREF(slots);
    if (out != NULL) {
        PyObject_GC_Track(out);
    }
    return out;
}

/* ------------------------------------------------------------------ */
/* Python functions                                                     */
/* ------------------------------------------------------------------ */

static PyObject *
flat_flatten_py(PyObject *module, PyObject *f)
{
    refx_state *st = refx_get_state(module);
    if (Py_TYPE(f) != st->Flat_Type || FLAT_CAST(f)->leaves == NULL) {
        PyErr_SetString(PyExc_TypeError, "_flat_flatten expects a Flat");
        return NULL;
    }
    return PyTuple_Pack(2, FLAT_CAST(f)->leaves, FLAT_CAST(f)->spec);
}

static PyObject *
flat_unflatten_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs != 2 || Py_TYPE(args[0]) != st->FlatSpec_Type ||
        SPEC_CAST(args[0])->memo == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "_flat_unflatten(spec, children) takes a FlatSpec "
                        "and the children");
        return NULL;
    }
    PyObject *tuple = PySequence_Tuple(args[1]);
    if (tuple == NULL) {
        return NULL;
    }
    PyObject *res = NULL;
    if (PyTuple_GET_SIZE(tuple) !=
        PyLong_AsSsize_t(PyTuple_GET_ITEM(SPEC_CAST(args[0])->memo, 3))) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError,
                            "_flat_unflatten: as many children as the "
                            "spec's leaves expected");
        }
    }
    else {
        res = flat_create(st, tuple, args[0]);
    }
    Py_DECREF(tuple);
    return res;
}

/* _flat_out(values, inputs=None): each written value that is a pytree the
 * memo takes, as a Flat (while tracing: its leaves are tracers).  inputs,
 * when given, holds per value what the trace was given for its Ref (a Flat
 * or not): a value whose structure is the same as its input Flat's
 * (refx_value_memo_same) comes back with that input's spec, so that a
 * written value can be left pending and passed on untouched by the next
 * call (see "Pending values"). */
static PyObject *
flat_out_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *values = nargs >= 1 ? args[0] : NULL;
    PyObject *inputs = nargs >= 2 && args[1] != Py_None ? args[1] : NULL;
    if (nargs < 1 || nargs > 2 || !PyList_CheckExact(values) ||
        (inputs != NULL &&
         (!PyList_CheckExact(inputs) ||
          PyList_GET_SIZE(inputs) != PyList_GET_SIZE(values)))) {
        PyErr_SetString(PyExc_TypeError,
                        "_flat_out(values, inputs=None) expects a list (and "
                        "a list as long)");
        return NULL;
    }
    if (refx_require_jax(st, "refx.jit") < 0) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        PyObject *o =
            flat_candidate(st, v) ? flat_fresh(st, v, 0, NULL) : Py_NewRef(v);
        if (o == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *in = inputs != NULL && i < PyList_GET_SIZE(inputs)
                           ? PyList_GET_ITEM(inputs, i)
                           : NULL;
        if (in != NULL && Py_TYPE(in) == st->Flat_Type && o != v &&
            Py_TYPE(o) == st->Flat_Type) {
            PyObject *sin = FLAT_CAST(in)->spec, *sout = FLAT_CAST(o)->spec;
            int same = sin != NULL && SPEC_CAST(sin)->lazy &&
                               SPEC_CAST(sout)->lazy &&
                               SPEC_CAST(sin)->memo != NULL
                           ? refx_value_memo_same(SPEC_CAST(sin)->memo,
                                                  SPEC_CAST(sout)->memo)
                           : 0;
            if (same < 0) {
                Py_DECREF(o);
                Py_DECREF(out);
                return NULL;
            }
            if (same) {
                Py_INCREF(sin);
                Py_SETREF(FLAT_CAST(o)->spec, sin);
            }
        }
        PyList_SET_ITEM(out, i, o);
    }
    return out;
}

/* _flat_restore(values): the values with each Flat rebuilt (while
 * tracing: the values the traced function's Refs hold) */
static PyObject *
flat_restore_py(PyObject *module, PyObject *values)
{
    PyObject *seq = PySequence_List(values), *res = NULL;
    if (seq != NULL) {
        res = refx_flat_restore_all(refx_get_state(module), seq, NULL, NULL);
        Py_DECREF(seq);
    }
    return res;
}

static PyMethodDef flat_functions[] = {
    {"_flat_flatten", flat_flatten_py, METH_O,
     "_flat_flatten($module, flat, /)\n--\n\npytree flatten of a Flat."},
    {"_flat_unflatten", (PyCFunction)(void (*)(void))flat_unflatten_py,
     METH_FASTCALL,
     "_flat_unflatten($module, spec, children, /)\n--\n\n"
     "pytree unflatten of a Flat."},
    {"_flat_out", (PyCFunction)(void (*)(void))flat_out_py, METH_FASTCALL,
     "_flat_out($module, values, inputs=None, /)\n--\n\n"
     "The values, each pytree refx.jit passes as its leaves as a Flat."},
    {"_flat_restore", flat_restore_py, METH_O,
     "_flat_restore($module, values, /)\n--\n\n"
     "The values as a list, each Flat rebuilt into its value."},
    {NULL, NULL, 0, NULL},
};

int
refx_init_flat(PyObject *module, refx_state *st)
{
    if (refx_add_type(module, &spec_spec, NULL, &st->FlatSpec_Type, 1) < 0 ||
        refx_add_type(module, &flat_spec, NULL, &st->Flat_Type, 1) < 0) {
        return -1;
    }
    return PyModule_AddFunctions(module, flat_functions);
}
