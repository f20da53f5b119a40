/*
 * ref.c: the Ref type, the write check, the deref'ed forms Value and
 * Index, and NOTHING.  What a Ref is besides its value and collection
 * (class, metadata, attributes: its kind) is kinds.c's.
 *
 * Ref.  A Ref owns three objects:
 *
 *   value       anything; read freely, written only through the checks
 *               below.
 *   collection  hashable, fixed at construction (None by default).
 *   trace       a weakref to the JAX trace that was current when the Ref
 *               was made.  JAX gives every trace one precomputed weakref
 *               (Trace._weakref), and `trace_state.value` returns it, so
 *               "same trace" is pointer identity of two weakrefs.  Holding
 *               the weakref, never the trace, keeps a Ref from keeping a
 *               finished trace (and its tracers) alive; once that trace is
 *               gone the weakref is dead and matches no current trace.
 *
 * Who may write.  `ref.value = x` (and update_refs) succeed only when the
 * current trace is the Ref's own: a Ref made outside jit/grad/vmap can't be
 * written inside one, nor a Ref made inside jit outside of it.  The value
 * itself is checked by refx._compat.check_value unless its type is known
 * never to hold tracers (arrays, scalars): it may hold tracers of the Ref's
 * trace or of a trace enclosing it (a jit tracer inside grad, say), never
 * of an inner or finished trace.  Reading is always allowed.
 *
 * refx.mutable.  Inside `with refx.mutable(f)` a write (the setter,
 * update_refs, a transform's write-back: everything that goes through
 * refx_check_write on an initialized Ref) must also be accepted by f, and
 * by the filter of every enclosing block.  The blocks a thread is in are a
 * tuple of filters in a ContextVar (st->mutable_var, so per thread and per
 * asyncio task; refx/_mutable.py pushes and pops it); outside every block
 * it is unset and the check costs one PyContextVar_Get.  Making a Ref
 * (__init__, reref, a transform lifting Refs into its trace) is not a
 * write.
 *
 * A refusal is data.  refx_check_write says which of its three checks
 * refused (refx_refusal: the trace, refx.mutable, the value), so the code
 * that rewords a refusal with the Ref's place (jit.c's fail_refused) and
 * _write_refs' _core._WriteRefused (position, reason) never read the
 * message's text.
 *
 * GC.  A Ref starts untracked when neither its value nor its collection
 * could ever lead back to it (may_close_cycle: scalars, str, numpy arrays,
 * tuples the collector already untracked), and a write of anything else
 * tracks it, as CPython's dicts do.  A jax.Array counts as "could": it has
 * a __dict__, so `a.me = ref` closes a cycle.  Tracking Refs that cannot
 * be in a cycle is not free: with the GC enabled that made reref 2.3x its
 * flatten+unflatten floor at 3k Refs holding numpy arrays (measured;
 * commit 0c2d3da).  Python subclasses (which have a __dict__) are always
 * tracked.
 *
 * Initialisation.  __new__ makes a Ref holding None; __init__ sets its
 * value and collection once (`initialized`), so subclasses can call
 * super().__init__(value, collection) from their own __init__.  A second
 * __init__ (or __setstate__) on a live Ref is a TypeError: the collection
 * is read-only.  Pickle and copy go through __reduce__ ->
 * (copyreg.__newobj__, (cls,), state) and __setstate__, so a subclass with
 * another __init__ signature, its __dict__, and a Ref inside its own value
 * all come back (deepcopy memoises the new Ref before copying its state).
 * A Ref whose metadata declares a sharding (`sharding=...`, not None) has
 * its value placed on it when __init__, __setstate__ or replace makes it
 * (ref_place: one hook call into refx/_sharding.py); reref, clone and the
 * transforms rebuild Refs without it (refx.jit constrains shardings
 * itself, at trace time).
 *
 * A Ref is a pytree leaf: it is not registered with JAX.  Equality and
 * hash are identity.  Ref supports cyclic GC, weak references and
 * subclassing; its __init__ does the work so subclasses can call
 * super().__init__(value, collection).
 *
 * Value and Index.  deref turns the first occurrence of a Ref into
 * Value(value, index, collection) and every later one into
 * Index(index, collection); both derive from Deref.  They are immutable and
 * registered with JAX by refx/_compat.py using the C functions at the end
 * of this file: a Value has one child (its value), an Index none, and both
 * carry the aux data (index, collection), a tuple that hashes and compares
 * by value so a deref'ed tree's treedef is a stable jit cache key.  The
 * ((children), aux) pair that jaxlib asks for is built on first flatten
 * and cached in `flat`, so a tree flattened at every step allocates
 * nothing for these nodes after the first time.
 *
 * GC.  Value and Index are tracked only when what they hold could lead
 * back to them (the rule of Refs, above); for a deref'ed model of numpy
 * arrays or scalars that is no node at all.
 *
 * NOTHING.  A singleton registered as a pytree node with no children: it
 * marks "this path belongs to another partition".
 *
 * Functions in this file: refx_collection_of; the write check
 * (refx_is_plain_value, refx_check_value, check_mutable, refx_check_write)
 * and refx_write_all; may_close_cycle/ref_needs_tracking (GC); the Ref:
 * refx_ref_create (ref_make), refx_ref_create_kind,
 * refx_ref_create_untracked, ref_store/refx_ref_store, ref_new,
 * ref_place (declared shardings), ref_initialize, parse_ref_args,
 * ref_init, traverse/clear/dealloc, the value/collection/metadata getters
 * and the value setter, refx_short_repr, ref_repr, ref_replace,
 * ref_reduce/ref_setstate (pickle, copy), refx_treescope_repr_get,
 * ref_init_subclass; Deref, Value, Index: refx_value_create(_kind),
 * refx_index_create(_kind), refx_deref_ref_type, refx_parse_index,
 * value_new/index_new, GC, getters, richcompare/hash, reprs, pickle;
 * NOTHING; the pytree flatten/unflatten functions; refx_init_ref_types.
 */
#include "refx.h"
#include <structmember.h>

/* ------------------------------------------------------------------ */
/* helpers                                                              */
/* ------------------------------------------------------------------ */

PyObject *
refx_collection_of(refx_state *st, PyObject *leaf)
{
    if (Ref_Check(st, leaf)) {
        return ((RefObject *)leaf)->collection;
    }
    if (Deref_Check(st, leaf)) {
        return ((DerefObject *)leaf)->collection;
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* the write check                                                      */
/* ------------------------------------------------------------------ */

/* Values of these types hold no tracers and no references back to user
 * objects (scalars, str, bytes, and the shim's plain_types: numpy and JAX
 * arrays, which have no __dict__). */
int
refx_is_plain_value(refx_state *st, PyObject *value)
{
    PyTypeObject *tp = Py_TYPE(value);
    if (value == Py_None || tp == &PyFloat_Type || tp == &PyLong_Type ||
        tp == &PyBool_Type || tp == &PyComplex_Type || tp == &PyUnicode_Type ||
        tp == &PyBytes_Type) {
        return 1;
    }
    PyObject *plain = st->plain_types;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plain); i++) {
        if ((PyObject *)tp == PyTuple_GET_ITEM(plain, i)) {
            return 1;
        }
    }
    return 0;
}

/* Is every object `v` holds a plain value (refx_is_plain_value) inside
 * containers whose contents are all items: an exact tuple, list or dict, a
 * Partition, a Value (its value) or Index or NOTHING, or a tuple subclass
 * with no storage of its own (a namedtuple: optax's states)?  Then it holds no tracer, whatever its pytree
 * registration makes leaves of: items are all a container can hold.  1 if
 * so; 0 when unsure (another type, deeper than 16), and the Python check
 * decides.  Runs no Python code.  Without it an optimiser state kept in one
 * Ref went through the Python check (a flatten and an isinstance per leaf)
 * at every write-back of refx.jit. */
static int
holds_only_plain(refx_state *st, PyObject *v, int depth)
{
    if (refx_is_plain_value(st, v)) {
        return 1;
    }
    if (depth > 16) {
        return 0;
    }
    PyTypeObject *tp = Py_TYPE(v);
    if (tp == &PyList_Type ||
        (PyTuple_Check(v) && tp->tp_basicsize == PyTuple_Type.tp_basicsize &&
         tp->tp_dictoffset == 0)) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(v); i++) {
            if (!holds_only_plain(st, PySequence_Fast_GET_ITEM(v, i),
                                  depth + 1)) {
                return 0;
            }
        }
        return 1;
    }
    if (tp == st->Flat_Type) { /* a value refx.jit leaves pending: its
                                 leaves are all it holds but aux data */
        PyObject *leaves = refx_flat_leaves(v);
        return leaves != NULL && holds_only_plain(st, leaves, depth + 1);
    }
    if (tp == st->Value_Type) { /* a deref'ed state (optax over a Partition
                                  of Values): its value is its one child */
        return holds_only_plain(st, ((ValueObject *)v)->value, depth + 1);
    }
    if (tp == st->Index_Type || v == st->nothing) {
        return 1; /* no children */
    }
    if (tp == &PyDict_Type || tp == st->Partition_Type) {
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (!holds_only_plain(st, item, depth + 1)) {
                return 0;
            }
        }
        return 1;
    }
    return 0;
}

/* 0 if a Ref of trace `trace` (a weakref) may hold `value`: its tracers, if
 * any, belong to that trace or to one enclosing it; -1 with ValueError
 * otherwise.  Values of plain types, and containers of them only, are not
 * looked at by the Python check. */
int
refx_check_value(refx_state *st, PyObject *value, PyObject *trace)
{
    if (holds_only_plain(st, value, 0)) {
        return 0;
    }
    PyObject *args[2] = {value, trace};
    PyObject *r = refx_call_jax(st->check_value, args, 2);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* 0 if the refx.mutable blocks this context is in (see the essay) all
 * accept `ref`; -1 with ValueError (or the filter's error) otherwise. */
static int
check_mutable(refx_state *st, RefObject *ref)
{
    PyObject *blocks = NULL;
    if (PyContextVar_Get(st->mutable_var, NULL, &blocks) < 0) {
        return -1;
    }
    if (blocks == NULL) {
        return 0;
    }
    int r = 0;
    if (!PyTuple_Check(blocks)) {
        REFX_BUG("refx.mutable's context variable holds a non-tuple");
        r = -1;
    }
    for (Py_ssize_t i = 0; r == 0 && i < PyTuple_GET_SIZE(blocks); i++) {
        PyObject *f = PyTuple_GET_ITEM(blocks, i);
        int m = refx_filter_match(st, f, (PyObject *)ref);
        if (m == 0) {
            PyErr_Format(
                PyExc_ValueError,
                "refx.mutable: this %s (collection %R) may not be written "
                "inside refx.mutable(%R); only the Refs that filter accepts "
                "may be written in the block",
                _PyType_Name(Py_TYPE(ref)),
                ref->collection != NULL ? ref->collection : Py_None, f);
        }
        r = m == 1 ? 0 : -1;
    }
    Py_DECREF(blocks);
    return r;
}

/* 0 if `ref` may be set to `value` while `current_trace` (a weakref) is
 * current; -1 with ValueError (or the error a check raised) otherwise, and
 * *why (unless NULL) names the check: the callers that reword a refusal
 * (jit.c) choose their words by it, never by the message's text. */
int
refx_check_write(refx_state *st, RefObject *ref, PyObject *value,
                 PyObject *current_trace, refx_refusal *why)
{
    refx_refusal r = REFX_WRITE_OK;
    if (ref->trace != current_trace) {
        /* the seed's words, then which Ref and what to do */
        PyErr_Format(
            PyExc_ValueError,
            REFX_TRACE_SEED
            ": this %s "
            "(collection %R) was created %s, and may only be written there. "
            "Pass the tree holding it to the transform as an argument "
            "(refx.jit, refx.grad and the other refx transforms do this), or "
            "deref it outside and reref it inside",
            _PyType_Name(Py_TYPE(ref)),
            ref->collection != NULL ? ref->collection : Py_None,
            PyWeakref_Check(ref->trace) && refx_weakref_is_dead(ref->trace)
                ? "in a JAX trace that has finished"
                : "in another JAX trace (outside the current transform, or "
                  "inside a transform that has finished)");
        r = REFX_REFUSED_TRACE;
    }
    else if (ref->initialized && check_mutable(st, ref) < 0) {
        r = REFX_REFUSED_MUTABLE;
    }
    else if (refx_check_value(st, value, ref->trace) < 0) {
        r = REFX_REFUSED_VALUE;
    }
    if (why != NULL) {
        *why = r;
    }
    return r == REFX_WRITE_OK ? 0 : -1;
}

/* Write values[k] into refs[k] for every k < n, all or nothing: every
 * write is checked first (refx_check_write, in order); then all are stored
 * with no Python code running, and the old values are released only after
 * the last store (releasing one may run a __del__ that lets another thread
 * in, which would see, or write over, a half-done write).  0 on success;
 * -1 with an error and no Ref written, *failed the index of the write a
 * check refused or raised for (-1 for no write's: out of memory) and *why
 * (unless NULL) its reason.  The caller keeps refs and values alive across
 * the call, since the checks may run Python code.  A Ref given twice ends
 * with its last value.  update_refs' apply, refx.jit's write-back and the
 * transforms' (_write_refs) all write through here. */
int
refx_write_all(refx_state *st, RefObject *const *refs, PyObject *const *values,
               Py_ssize_t n, PyObject *trace, Py_ssize_t *failed,
               refx_refusal *why)
{
    PyObject *small[16], **olds = small;
    *failed = -1;
    if (why != NULL) {
        *why = REFX_WRITE_OK;
    }
    if (n > (Py_ssize_t)(sizeof(small) / sizeof(small[0]))) {
        olds = PyMem_Malloc((size_t)n * sizeof(PyObject *));
        if (olds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (refx_check_write(st, refs[k], values[k], trace, why) < 0) {
            *failed = k;
            if (olds != small) {
                PyMem_Free(olds);
            }
            return -1;
        }
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        olds[k] = Py_NewRef(refs[k]->held);
        refx_ref_store(st, refs[k], values[k]);
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_DECREF(olds[k]);
    }
    if (olds != small) {
        PyMem_Free(olds);
    }
    return 0;
}

/* Could `o` ever lead back to the object holding it?  Not if it takes no
 * part in the GC (scalars, str, numpy arrays), nor if it is an exact tuple
 * the collector already untracked (its items can never change).  Anything
 * else may, even if it is not tracked yet: an empty dict is untracked
 * until it holds a container, and a jax.Array has a __dict__.  This is
 * CPython's own _PyObject_GC_MAY_BE_TRACKED. */
static inline int
may_close_cycle(PyObject *o)
{
    return o != NULL && PyObject_IS_GC(o) &&
           (!PyTuple_CheckExact(o) || PyObject_GC_IsTracked(o));
}

/* Could a Ref holding value and collection be part of a reference cycle?
 * (The trace weakref leads nowhere: a weakref visits only its callback.) */
static inline int
ref_needs_tracking(PyObject *value, PyObject *collection)
{
    return may_close_cycle(collection) || may_close_cycle(value);
}

/* ------------------------------------------------------------------ */
/* Ref                                                                  */
/* ------------------------------------------------------------------ */

/* A new Ref of class tp, not yet tracked if tp is Ref itself (a
 * subclass's tp_alloc tracks it); see refx_ref_create. */
static RefObject *
ref_make(refx_state *st, PyTypeObject *tp, PyObject *value,
         PyObject *collection, PyObject *trace)
{
    RefObject *self;
    /* Owned before allocating: the allocation may run the GC, whose
     * finalizers may set the Ref these came from and free them (deref and
     * clone pass another Ref's value and collection, borrowed). */
    Py_INCREF(value);
    Py_INCREF(collection);
    if (tp == st->Ref_Type) {
        self = PyObject_GC_New(RefObject, tp); /* not tracked yet */
        if (self != NULL) {
            self->weakreflist = NULL;
            self->mark_epoch = 0;
            self->mark_index = 0;
            self->metadata = NULL;
            self->kind = NULL;
            self->last = NULL;
        }
    }
    else {
        self = (RefObject *)tp->tp_alloc(tp, 0); /* zeroed and tracked */
    }
    if (self == NULL) {
        Py_DECREF(value);
        Py_DECREF(collection);
        return NULL;
    }
    self->held = value;
    self->collection = collection;
    self->trace = Py_NewRef(trace);
    self->initialized = 1;
    self->serial = ++refx_ref_serial;
    return self;
}

PyObject *
refx_ref_create(refx_state *st, PyTypeObject *tp, PyObject *value,
                PyObject *collection, PyObject *trace)
{
    RefObject *self = ref_make(st, tp, value, collection, trace);
    if (self != NULL && !PyObject_GC_IsTracked((PyObject *)self) &&
        ref_needs_tracking(value, collection)) {
        PyObject_GC_Track(self);
    }
    return (PyObject *)self;
}

/* A new plain Ref left untracked; *track says whether the caller must
 * track it (PyObject_GC_Track) once the call that made it ends: reref and
 * clone make thousands at once (deref.c, "Tracked later"), and tracking
 * one as it is born only to untrack it costs a write to the collector's
 * list each way. */
PyObject *
refx_ref_create_untracked(refx_state *st, PyObject *value,
                          PyObject *collection, PyObject *trace, int *track)
{
    RefObject *self = ref_make(st, st->Ref_Type, value, collection, trace);
    if (self != NULL) {
        *track = ref_needs_tracking(value, collection);
    }
    return (PyObject *)self;
}

/* A new Ref of `kind` (NULL: a plain Ref), without running the class's
 * __init__: that is how reref, clone and replace rebuild typed Refs. */
PyObject *
refx_ref_create_kind(refx_state *st, PyObject *kind, PyObject *value,
                     PyObject *collection, PyObject *trace)
{
    if (kind == NULL) {
        return refx_ref_create(st, st->Ref_Type, value, collection, trace);
    }
    PyTypeObject *tp = (PyTypeObject *)PyTuple_GET_ITEM(kind, 0);
    PyObject *metadata = PyTuple_GET_ITEM(kind, 1);
    PyObject *attrs = PyTuple_GET_ITEM(kind, 2);
    PyObject *self = refx_ref_create(st, tp, value, collection, trace);
    if (self == NULL) {
        return NULL;
    }
    RefObject *ref = (RefObject *)self;
    if (PyTuple_GET_SIZE(metadata) != 0) {
        ref->metadata = Py_NewRef(metadata);
        if (!PyObject_GC_IsTracked(self) && may_close_cycle(metadata)) {
            PyObject_GC_Track(self); /* metadata may lead back to it */
        }
    }
    if (PyTuple_GET_SIZE(attrs) == 0) {
        ref->kind = Py_NewRef(kind); /* (type, metadata, ()): reusable */
        return self;
    }
    PyObject *d = PyObject_GenericGetDict(self, NULL);
    if (d == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(attrs); i++) {
        PyObject *pair = PyTuple_GET_ITEM(attrs, i);
        if (PyDict_SetItem(d, PyTuple_GET_ITEM(pair, 0),
                           PyTuple_GET_ITEM(pair, 1)) < 0) {
            Py_DECREF(d);
            Py_DECREF(self);
            return NULL;
        }
    }
    Py_DECREF(d);
    return self;
}

/* Store a new value (owned by the caller's reference), tracking the Ref
 * if the value could close a cycle.  The Value deref kept (self->last)
 * holds the old value: dropped too, so no array outlives its Ref's write
 * (freeing it runs no Python code: it holds the old value, which the
 * caller still holds or releases next, and the Ref's own collection and
 * kind). */
static inline void
ref_store(refx_state *st, RefObject *self, PyObject *value)
{
    Py_CLEAR(self->last);
    Py_XSETREF(self->held, Py_NewRef(value));
    if (!PyObject_GC_IsTracked((PyObject *)self) &&
        (ref_needs_tracking(value, self->collection) ||
         may_close_cycle(self->metadata))) {
        PyObject_GC_Track(self);
    }
}

void
refx_ref_store(refx_state *st, RefObject *self, PyObject *value)
{
    ref_store(st, self, value);
}

PyObject *
refx_ref_made(refx_state *st, RefObject *self, PyObject *flat)
{
    Py_INCREF(flat);
    PyObject *made = refx_flat_value(st, flat);
    if (made != NULL && self->held == flat) {
        /* the same value, made: no write (no check; no Value deref kept
         * as `last` was made of the Flat) */
        Py_SETREF(self->held, Py_NewRef(made));
    }
    Py_DECREF(flat);
    return made;
}

PyObject *
refx_ref_value(refx_state *st, RefObject *self)
{
    /* a loop, though making a pending value runs no Python code
     * (flatmemo.c, refx_value_memo_lazy): a Flat put in some other way
     * (reached through gc.get_referents) may run some */
    while (self->held != NULL && Py_TYPE(self->held) == st->Flat_Type) {
        PyObject *made = refx_ref_made(st, self, self->held);
        if (made == NULL) {
            return NULL;
        }
        Py_DECREF(made);
    }
    return self->held != NULL ? self->held : Py_None;
}

static PyObject *
ref_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL || refx_require_jax(st, "Ref") < 0) {
        return NULL;
    }
    PyObject *trace = refx_current_trace(st);
    if (trace == NULL) {
        return NULL;
    }
    /* __init__ (or __setstate__) fills value and collection */
    PyObject *self = refx_ref_create(st, tp, Py_None, Py_None, trace);
    Py_DECREF(trace);
    if (self != NULL) {
        ((RefObject *)self)->initialized = 0;
    }
    return self;
}

/* ------------------------------------------------------------------ */
/* declared shardings                                                   */
/* ------------------------------------------------------------------ */

/* The value a new Ref with `metadata` should hold for `value` (a new
 * reference, or NULL with an error).  When the metadata has a "sharding"
 * entry that is not None and refx._compat installed the `place` hook, the
 * hook decides: place(value, sharding, fname) puts the value on that
 * sharding under the active mesh (device_put outside a trace, a sharding
 * constraint on a tracer) and returns it unchanged without one; see
 * refx/_sharding.py.  Any other Ref gets `value` itself, at the cost of
 * one NULL test (no metadata) or a scan of its few metadata names.  Called
 * by __init__/__setstate__ (ref_initialize) and replace, after the value
 * passed the write check: the placed value derives from it in the current
 * trace, so it passes too. */
static PyObject *
ref_place(refx_state *st, PyObject *value, PyObject *metadata,
          const char *fname)
{
    if (metadata == NULL || st->place == NULL) {
        return Py_NewRef(value);
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(metadata); i++) {
        PyObject *pair = PyTuple_GET_ITEM(metadata, i);
        PyObject *sharding = PyTuple_GET_ITEM(pair, 1);
        if (sharding == Py_None ||
            !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(pair, 0),
                                             "sharding") != 0) {
            continue;
        }
        PyObject *name = PyUnicode_FromString(fname);
        if (name == NULL) {
            return NULL;
        }
        PyObject *args[3] = {value, sharding, name};
        PyObject *res = refx_call_jax(st->place, args, 3);
        Py_DECREF(name);
        return res;
    }
    return Py_NewRef(value);
}

/* ------------------------------------------------------------------ */
/* Ref: init, GC, attributes, repr, replace, pickle, subclasses         */
/* ------------------------------------------------------------------ */

/* The one way value, collection and metadata are first set: by __init__
 * or __setstate__ on a Ref fresh from __new__.  The value is checked as
 * any write is (the trace, tracers in the value).  Steals `metadata`. */
static int
ref_initialize(RefObject *self, const char *fname, PyObject *value,
               PyObject *collection, PyObject *metadata)
{
    if (self->initialized) {
        PyErr_Format(PyExc_TypeError,
                     "%s: this Ref is already initialized; its collection "
                     "and metadata are read-only (set .value to change its "
                     "value, or make a new Ref with .replace())",
                     fname);
        goto error;
    }
    if (refx_check_hashable(collection, "Ref", "collection") < 0) {
        goto error;
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        goto error;
    }
    PyObject *trace = refx_current_trace(st);
    if (trace == NULL) {
        goto error;
    }
    int r = refx_check_write(st, self, value, trace, NULL);
    Py_DECREF(trace);
    if (r < 0) {
        goto error;
    }
    PyObject *placed = ref_place(st, value, metadata, fname);
    if (placed == NULL) {
        goto error;
    }
    Py_XSETREF(self->collection, Py_NewRef(collection));
    Py_XSETREF(self->metadata, metadata);
    Py_CLEAR(self->kind);
    ref_store(st, self, placed);
    Py_DECREF(placed);
    self->initialized = 1;
    return 0;
error:
    Py_XDECREF(metadata);
    return -1;
}

/* Split Ref()'s arguments: value and collection (positional or keyword),
 * every other keyword is metadata.  0, or -1 with TypeError. */
static int
parse_ref_args(PyObject *args, PyObject *kwds, const char *fname,
               PyObject **value, PyObject **collection, PyObject **metadata)
{
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    *value = nargs > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
    *collection = nargs > 1 ? PyTuple_GET_ITEM(args, 1) : NULL;
    *metadata = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError,
                     "%s takes at most 2 positional arguments (value, "
                     "collection), %zd given; metadata is keyword-only",
                     fname, nargs);
        return -1;
    }
    PyObject *rest = NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        rest = PyDict_Copy(kwds);
        if (rest == NULL) {
            return -1;
        }
        const char *names[2] = {"value", "collection"};
        PyObject **slots[2] = {value, collection};
        for (int i = 0; i < 2; i++) {
            PyObject *v = PyDict_GetItemString(rest, names[i]);
            if (v == NULL) {
                continue;
            }
            if (*slots[i] != NULL) {
                PyErr_Format(PyExc_TypeError,
                             "%s got multiple values for argument '%s'", fname,
                             names[i]);
                Py_DECREF(rest);
                return -1;
            }
            *slots[i] = v; /* borrowed: kwds keeps it alive */
            if (PyDict_DelItemString(rest, names[i]) < 0) {
                Py_DECREF(rest);
                return -1;
            }
        }
    }
    if (*value == NULL) {
        PyErr_Format(PyExc_TypeError, "%s missing required argument 'value'",
                     fname);
        Py_XDECREF(rest);
        return -1;
    }
    if (*collection == NULL) {
        *collection = Py_None;
    }
    *metadata = refx_metadata_from_dict(rest, fname);
    Py_XDECREF(rest);
    return *metadata == NULL && PyErr_Occurred() ? -1 : 0;
}

static int
ref_init(PyObject *op, PyObject *args, PyObject *kwds)
{
    RefObject *self = REFX_REF_CAST(op);
    PyObject *value, *collection, *metadata;
    if (parse_ref_args(args, kwds, "Ref()", &value, &collection, &metadata) <
        0) {
        return -1;
    }
    return ref_initialize(self, "Ref.__init__", value, collection, metadata);
}

static int
ref_traverse(PyObject *op, visitproc visit, void *arg)
{
    RefObject *self = REFX_REF_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->held);
    Py_VISIT(self->collection);
    Py_VISIT(self->trace);
    Py_VISIT(self->metadata);
    Py_VISIT(self->kind);
    Py_VISIT(self->last);
    return 0;
}

static int
ref_clear(PyObject *op)
{
    RefObject *self = REFX_REF_CAST(op);
    Py_CLEAR(self->last);
    Py_CLEAR(self->held);
    Py_CLEAR(self->collection);
    Py_CLEAR(self->trace);
    Py_CLEAR(self->metadata);
    Py_CLEAR(self->kind);
    return 0;
}

static void
ref_dealloc(PyObject *op)
{
    RefObject *self = REFX_REF_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* the trashcan bounds the C recursion when freeing a chain such as
     * Ref(Ref(Ref(...))): a million levels overflowed the stack */
    Py_TRASHCAN_BEGIN(self, ref_dealloc);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    ref_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
    Py_TRASHCAN_END;
}

/* Closed-over Refs.  While a refx transform traces `fun`, a Ref that `fun`
 * reads or writes without receiving it (closed over) stands for a Ref of
 * the trace: refx/_lift.py's hook records it (the transform is then traced
 * again with it as a hidden input) or returns its stand-in, whose value is
 * the traced one.  Outside such traces (refx_capture_depth == 0) nothing
 * here runs. */
Py_ssize_t refx_capture_depth = 0;
uint64_t refx_ref_serial = 0;

/* The stand-in of `self` (new reference), Py_None, or NULL with an error.
 * The hook gets the Ref's own value (reading .value would ask it again). */
PyObject *
refx_ref_captured(RefObject *self, PyObject *writing)
{
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    if (st->capture_hook == NULL) {
        return Py_NewRef(Py_None);
    }
    PyObject *value = refx_ref_value(st, self);
    if (value == NULL) {
        return NULL;
    }
    PyObject *args[3] = {(PyObject *)self, writing, value};
    PyObject *res = PyObject_Vectorcall(st->capture_hook, args, 3, NULL);
    if (res != NULL && res != Py_None && !Ref_Check(st, res)) {
        Py_DECREF(res);
        REFX_BUG("the capture hook returned neither None nor a Ref");
        return NULL;
    }
    return res;
}

/* The C functions that read or write Refs without .value (deref, clone,
 * update_refs) take the stand-ins in their place, as .value does: inside a
 * refx transform, a closed-over model is then read live by
 * `refx.deref(model)` (its value a constant of the first trace otherwise:
 * a silent stale read) and written by `update_refs(model, new)` (a refusal
 * otherwise: the Ref belongs to the enclosing trace). */
int
refx_substitute_captured(refx_state *st, PyObject **leaves, PyObject *writing)
{
    if (refx_capture_depth <= 0) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(*leaves); i++) {
        PyObject *leaf = PyList_GET_ITEM(*leaves, i);
        if (!Ref_Check(st, leaf)) {
            continue;
        }
        PyObject *sub = refx_ref_captured((RefObject *)leaf, writing);
        if (sub == NULL) {
            return -1;
        }
        if (sub == Py_None || i >= PyList_GET_SIZE(*leaves)) {
            Py_DECREF(sub);
            continue;
        }
        if (Py_REFCNT(*leaves) != 1) { /* not ours alone: work on a copy */
            PyObject *copy = PyList_GetSlice(*leaves, 0, PY_SSIZE_T_MAX);
            if (copy == NULL) {
                Py_DECREF(sub);
                return -1;
            }
            Py_SETREF(*leaves, copy);
        }
        Py_SETREF(PyList_GET_ITEM(*leaves, i), sub);
    }
    return 0;
}

static int ref_set_value(PyObject *op, PyObject *value, void *closure);

static PyObject *
ref_get_value(PyObject *op, void *Py_UNUSED(closure))
{
    RefObject *self = REFX_REF_CAST(op);
    if (refx_capture_depth > 0) {
        PyObject *inner = refx_ref_captured(self, Py_False);
        if (inner == NULL) {
            return NULL;
        }
        if (inner != Py_None) {
            refx_state *st = refx_state_from_type(Py_TYPE(self));
            PyObject *v =
                st != NULL ? refx_ref_value(st, (RefObject *)inner) : NULL;
            Py_XINCREF(v);
            Py_DECREF(inner);
            return v;
        }
        Py_DECREF(inner);
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    PyObject *v = st != NULL ? refx_ref_value(st, self) : NULL;
    return Py_XNewRef(v);
}

static int
ref_set_value(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    RefObject *self = REFX_REF_CAST(op);
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete Ref.value");
        return -1;
    }
    if (refx_capture_depth > 0) {
        PyObject *inner = refx_ref_captured(self, Py_True);
        if (inner == NULL) {
            return -1;
        }
        if (inner != Py_None) {
            int r = ref_set_value(inner, value, NULL);
            Py_DECREF(inner);
            return r;
        }
        Py_DECREF(inner);
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return -1;
    }
    PyObject *trace = refx_current_trace(st);
    if (trace == NULL) {
        return -1;
    }
    refx_refusal why = REFX_WRITE_OK;
    int r = refx_check_write(st, self, value, trace, &why);
    Py_DECREF(trace);
    if (r < 0) {
        if (refx_capture_depth > 0 && why == REFX_REFUSED_MUTABLE) {
            /* inside a refx transform: the Ref rides on the error, so the
             * transform can say where the Ref sits (refx/_lift.py) */
            refx_raise_refused(st, -1, why, (PyObject *)self);
        }
        return -1;
    }
    ref_store(st, self, value);
    return 0;
}

static PyObject *
ref_get_collection(PyObject *op, void *Py_UNUSED(closure))
{
    RefObject *self = REFX_REF_CAST(op);
    return Py_NewRef(self->collection != NULL ? self->collection : Py_None);
}

static PyObject *
ref_get_metadata(PyObject *op, void *Py_UNUSED(closure))
{
    RefObject *self = REFX_REF_CAST(op);
    return refx_pairs_to_mapping(self->metadata);
}

/* refx._inspect.short_repr(value): arrays as dtype[shape] */
PyObject *
refx_short_repr(PyObject *value)
{
    PyObject *mod = PyImport_ImportModule("refx._inspect");
    if (mod == NULL) {
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(mod, "short_repr");
    PyObject *res = fn != NULL ? PyObject_CallOneArg(fn, value) : NULL;
    Py_XDECREF(fn);
    Py_DECREF(mod);
    return res;
}

static PyObject *
ref_repr(PyObject *op)
{
    RefObject *self = REFX_REF_CAST(op);
    int rc = Py_ReprEnter((PyObject *)self);
    if (rc != 0) {
        return rc > 0 ? PyUnicode_FromFormat("%s(...)",
                                             _PyType_Name(Py_TYPE(self)))
                      : NULL;
    }
    PyObject *res = NULL;
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    PyObject *held = st != NULL ? refx_ref_value(st, self) : NULL;
    PyObject *value = held != NULL ? refx_short_repr(held) : NULL;
    PyObject *meta = value != NULL ? refx_pairs_repr(self->metadata) : NULL;
    if (meta != NULL) {
        res = PyUnicode_FromFormat(
            "%s(%U, collection=%R%U)", _PyType_Name(Py_TYPE(self)), value,
            self->collection != NULL ? self->collection : Py_None, meta);
    }
    Py_XDECREF(value);
    Py_XDECREF(meta);
    Py_ReprLeave((PyObject *)self);
    return res;
}

/* ref.replace(value=..., collection=..., **metadata): a new Ref of the
 * same class and attributes, with these changed (metadata merged). */
static PyObject *
ref_replace(PyObject *op, PyObject *args, PyObject *kwds)
{
    RefObject *self = REFX_REF_CAST(op);
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    PyObject *value = NULL, *collection = NULL, *changes = NULL;
    PyObject *merged = NULL, *metadata = NULL, *kind = NULL, *res = NULL;
    PyObject *trace = NULL;
    if (st == NULL) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "Ref.replace() takes keyword arguments only");
        return NULL;
    }
    if (kwds != NULL) {
        changes = PyDict_Copy(kwds);
        if (changes == NULL) {
            return NULL;
        }
        value = PyDict_GetItemString(changes, "value");
        collection = PyDict_GetItemString(changes, "collection");
        Py_XINCREF(value);
        Py_XINCREF(collection);
        if ((value != NULL && PyDict_DelItemString(changes, "value") < 0) ||
            (collection != NULL &&
             PyDict_DelItemString(changes, "collection") < 0)) {
            goto error;
        }
    }
    if (value == NULL) { /* read as .value reads it (a stand-in's, inside
                            a refx transform that closes over it) */
        value = ref_get_value((PyObject *)self, NULL);
        if (value == NULL) {
            goto error;
        }
    }
    if (collection == NULL) {
        collection = Py_NewRef(self->collection);
    }
    if (refx_check_hashable(collection, "Ref.replace", "collection") < 0) {
        goto error;
    }
    merged = refx_pairs_to_dict(self->metadata);
    if (merged == NULL ||
        (changes != NULL && PyDict_Update(merged, changes) < 0)) {
        goto error;
    }
    metadata = refx_metadata_from_dict(merged, "Ref.replace");
    if (metadata == NULL && PyErr_Occurred()) {
        goto error;
    }
    int err;
    PyObject *old_kind = refx_ref_kind(st, self, &err);
    if (err) {
        goto error;
    }
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        Py_XDECREF(old_kind);
        goto error;
    }
    kind =
        PyTuple_Pack(3, Py_TYPE(self), metadata != NULL ? metadata : empty,
                     old_kind != NULL ? PyTuple_GET_ITEM(old_kind, 2) : empty);
    Py_DECREF(empty);
    Py_XDECREF(old_kind);
    trace = refx_current_trace(st);
    if (kind == NULL || trace == NULL ||
        refx_check_value(st, value, trace) < 0) {
        goto error;
    }
    Py_SETREF(value, ref_place(st, value, metadata, "Ref.replace"));
    if (value == NULL) {
        goto error;
    }
    res = refx_ref_create_kind(st, kind, value, collection, trace);
error:
    Py_XDECREF(trace);
    Py_XDECREF(kind);
    Py_XDECREF(metadata);
    Py_XDECREF(merged);
    Py_XDECREF(changes);
    Py_XDECREF(value);
    Py_XDECREF(collection);
    return res;
}

/* (copyreg.__newobj__, (cls,), (value, collection, dict or None,
 * metadata pairs or None)): unpickling calls cls.__new__(cls), then
 * __setstate__, never the subclass's __init__. */
static PyObject *
ref_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    RefObject *self = REFX_REF_CAST(op);
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    /* the value as .value reads it (inside a refx transform that closes
     * over this Ref: its stand-in's, so copy.copy is live there too) */
    PyObject *value = ref_get_value(op, NULL);
    if (value == NULL) {
        return NULL;
    }
    PyObject *d = refx_ref_instance_dict(st, (PyObject *)self);
    PyObject *res =
        Py_BuildValue("O(O)(NONO)", st->copyreg_newobj, Py_TYPE(self), value,
                      self->collection != NULL ? self->collection : Py_None,
                      d != NULL ? d : Py_NewRef(Py_None),
                      self->metadata != NULL ? self->metadata : Py_None);
    return res;
}

static PyObject *
ref_setstate(PyObject *op, PyObject *state)
{
    RefObject *self = REFX_REF_CAST(op);
    if (self->initialized) {
        ref_initialize(self, "Ref.__setstate__", Py_None, Py_None, NULL);
        return NULL; /* refused: a live Ref */
    }
    if (!PyTuple_Check(state) || PyTuple_GET_SIZE(state) != 4 ||
        (PyTuple_GET_ITEM(state, 2) != Py_None &&
         !PyDict_Check(PyTuple_GET_ITEM(state, 2))) ||
        (PyTuple_GET_ITEM(state, 3) != Py_None &&
         !PyTuple_Check(PyTuple_GET_ITEM(state, 3)))) {
        PyErr_SetString(PyExc_TypeError,
                        "Ref.__setstate__: state must be (value, collection, "
                        "dict or None, metadata pairs or None)");
        return NULL;
    }
    PyObject *meta = PyTuple_GET_ITEM(state, 3), *metadata = NULL;
    if (meta != Py_None && PyTuple_GET_SIZE(meta) != 0) {
        /* through a dict: checks names and hashability, sorts */
        PyObject *d = refx_pairs_to_dict(NULL);
        for (Py_ssize_t i = 0; d != NULL && i < PyTuple_GET_SIZE(meta); i++) {
            PyObject *pair = PyTuple_GET_ITEM(meta, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) < 2 ||
                PyDict_SetItem(d, PyTuple_GET_ITEM(pair, 0),
                               PyTuple_GET_ITEM(pair, 1)) < 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError,
                                    "Ref.__setstate__: metadata must be "
                                    "(name, value, ...) entries");
                }
                Py_CLEAR(d);
            }
        }
        if (d == NULL) {
            return NULL;
        }
        metadata = refx_metadata_from_dict(d, "Ref.__setstate__");
        Py_DECREF(d);
        if (metadata == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (ref_initialize(self, "Ref.__setstate__", PyTuple_GET_ITEM(state, 0),
                       PyTuple_GET_ITEM(state, 1), metadata) < 0) {
        return NULL;
    }
    PyObject *d = PyTuple_GET_ITEM(state, 2);
    if (d != Py_None && PyDict_GET_SIZE(d) != 0) {
        PyObject *own = PyObject_GenericGetDict((PyObject *)self, NULL);
        if (own == NULL) {
            return NULL; /* a plain Ref has no __dict__ */
        }
        int r = PyDict_Update(own, d);
        Py_DECREF(own);
        if (r < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* treescope renders an object through its __treescope_repr__ only when
 * that is a bound *Python* method (types.MethodType), so it is an
 * attribute whose getter returns refx._inspect's renderer bound to self.
 * treescope itself is imported only by the renderer. */
PyObject *
refx_treescope_repr_get(PyObject *self, void *Py_UNUSED(closure))
{
    PyObject *mod = PyImport_ImportModule("refx._inspect");
    if (mod == NULL) {
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(mod, "treescope_method");
    PyObject *res = fn != NULL ? PyObject_CallOneArg(fn, self) : NULL;
    Py_XDECREF(fn);
    Py_DECREF(mod);
    return res;
}

static PyGetSetDef ref_getset[] = {
    {"value", ref_get_value, ref_set_value,
     "The referenced value.  Setting it is allowed only from the JAX trace\n"
     "the Ref was created in.",
     NULL},
    {"collection", ref_get_collection, NULL,
     "The Ref's collection (hashable, read-only).", NULL},
    {"metadata", ref_get_metadata, NULL,
     "The Ref's metadata (a read-only mapping; make a Ref with other\n"
     "metadata with .replace()).",
     NULL},
    REFX_TREESCOPE_GETSET,
    {NULL},
};

static PyMemberDef ref_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(RefObject, weakreflist),
     READONLY, NULL},
    {NULL},
};

/* Ref subclasses may not declare __slots__ (other than __dict__ and
 * __weakref__): refx carries a Ref's attributes through deref, reref,
 * clone, pickle and copy from its __dict__, and slots would be dropped
 * silently.  Then the next __init_subclass__ in the MRO runs. */
static PyObject *
ref_init_subclass(PyObject *cls, PyObject *args, PyObject *kwds)
{
    refx_state *st = refx_state_from_type((PyTypeObject *)cls);
    if (st == NULL) {
        return NULL;
    }
    PyObject *slots =
        PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, "__slots__");
    if (slots != NULL) {
        PyObject *names = PyUnicode_Check(slots) ? PyTuple_Pack(1, slots)
                                                 : PySequence_Tuple(slots);
        if (names == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
            PyObject *n = PyTuple_GET_ITEM(names, i);
            if (PyUnicode_Check(n) &&
                (PyUnicode_CompareWithASCIIString(n, "__dict__") == 0 ||
                 PyUnicode_CompareWithASCIIString(n, "__weakref__") == 0)) {
                continue;
            }
            PyErr_Format(PyExc_TypeError,
                         "%s: a Ref subclass may not declare __slots__ (%R): "
                         "refx carries a Ref's attributes through deref, "
                         "clone, pickle and copy from its __dict__, and "
                         "slots would be lost; use plain attributes or "
                         "metadata",
                         ((PyTypeObject *)cls)->tp_name, n);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(names);
    }
    PyObject *sup = PyObject_CallFunctionObjArgs(
        (PyObject *)&PySuper_Type, (PyObject *)st->Ref_Type, cls, NULL);
    if (sup == NULL) {
        return NULL;
    }
    PyObject *next = PyObject_GetAttrString(sup, "__init_subclass__");
    Py_DECREF(sup);
    if (next == NULL) {
        return NULL;
    }
    PyObject *res = PyObject_Call(next, args, kwds);
    Py_DECREF(next);
    return res;
}

static PyMethodDef ref_methods[] = {
    {"__init_subclass__", (PyCFunction)(void (*)(void))ref_init_subclass,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "Refuses __slots__ in a Ref subclass (see ref.c), then defers to the\n"
     "next __init_subclass__."},
    {"__reduce__", ref_reduce, METH_NOARGS,
     "Pickle and copy keep the class, value, collection and a subclass's\n"
     "__dict__; shared Refs stay shared."},
    {"__setstate__", ref_setstate, METH_O,
     "Set the state of a Ref fresh from __new__ (pickle, copy)."},
    {"replace", (PyCFunction)(void (*)(void))ref_replace,
     METH_VARARGS | METH_KEYWORDS,
     "replace($self, /, **changes)\n--\n\n"
     "A new Ref of the same class and attributes, with `value`,\n"
     "`collection` or metadata changed (metadata is merged): the new Ref\n"
     "shares nothing with this one and belongs to the current trace."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

PyDoc_STRVAR(
    ref_doc,
    "Ref(value, collection=None, **metadata)\n"
    "--\n\n"
    "A shared, mutable reference to a value.\n\n"
    "A Ref is a pytree leaf: the same Ref may sit at many places of a tree,\n"
    "and writing `ref.value` is seen through all of them.  Before a tree of\n"
    "Refs crosses a JAX transform, `deref` it; rebuild the Refs inside with\n"
    "`reref`.\n\n"
    "`collection` (hashable, default None) groups Refs for partitioning;\n"
    "`metadata` (keyword arguments with hashable values, read-only, e.g.\n"
    "sharding=('model', None)) travels with the Ref through deref/reref,\n"
    "clone, pickle and the transforms, as does its class: subclass Ref to\n"
    "type your variables.\n"
    "A Ref remembers the JAX trace it was created in and may only be written\n"
    "from that trace (ValueError otherwise); reading is always allowed.");

static PyType_Slot ref_slots[] = {
    {Py_tp_doc, (void *)ref_doc},
    {Py_tp_new, ref_new},
    {Py_tp_init, ref_init},
    {Py_tp_dealloc, ref_dealloc},
    {Py_tp_traverse, ref_traverse},
    {Py_tp_clear, ref_clear},
    {Py_tp_repr, ref_repr},
    {Py_tp_getset, ref_getset},
    {Py_tp_members, ref_members},
    {Py_tp_methods, ref_methods},
    {0, NULL},
};

/* Not Py_TPFLAGS_IMMUTABLETYPE: refx/_arrays.py sets the array operators
 * (__add__, __matmul__, __getitem__, __jax_array__, ...) on Ref from Python
 * at import, which an immutable type refuses. */
static PyType_Spec ref_spec = {
    .name = "refx.Ref",
    .basicsize = sizeof(RefObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = ref_slots,
};

/* ------------------------------------------------------------------ */
/* Deref, Value, Index                                                  */
/* ------------------------------------------------------------------ */

/* Track a new Value/Index only if what it holds could lead back to it
 * (see may_close_cycle): never for an atomic collection with a scalar or
 * numpy value, or none. */
static void
deref_maybe_track(DerefObject *self, PyObject *value)
{
    if (may_close_cycle(self->collection) || may_close_cycle(value) ||
        may_close_cycle(self->kind)) {
        PyObject_GC_Track(self);
    }
}

PyObject *
refx_value_create_kind(refx_state *st, PyObject *value, Py_ssize_t index,
                       PyObject *collection, PyObject *kind)
{
    /* owned before allocating: see refx_ref_create */
    Py_INCREF(value);
    Py_INCREF(collection);
    Py_XINCREF(kind);
    ValueObject *self = PyObject_GC_New(ValueObject, st->Value_Type);
    if (self == NULL) {
        Py_DECREF(value);
        Py_DECREF(collection);
        Py_XDECREF(kind);
        return NULL;
    }
    self->base.index = index;
    self->base.collection = collection;
    self->base.kind = kind;
    self->base.flat = NULL;
    self->value = value;
    deref_maybe_track(&self->base, value);
    return (PyObject *)self;
}

PyObject *
refx_value_create(refx_state *st, PyObject *value, Py_ssize_t index,
                  PyObject *collection)
{
    return refx_value_create_kind(st, value, index, collection, NULL);
}

PyObject *
refx_index_create_kind(refx_state *st, Py_ssize_t index, PyObject *collection,
                       PyObject *kind)
{
    Py_INCREF(collection); /* owned before allocating: see refx_ref_create */
    Py_XINCREF(kind);
    DerefObject *self = PyObject_GC_New(DerefObject, st->Index_Type);
    if (self == NULL) {
        Py_DECREF(collection);
        Py_XDECREF(kind);
        return NULL;
    }
    self->index = index;
    self->collection = collection;
    self->kind = kind;
    self->flat = NULL;
    deref_maybe_track(self, NULL);
    return (PyObject *)self;
}

PyObject *
refx_index_create(refx_state *st, Py_ssize_t index, PyObject *collection)
{
    return refx_index_create_kind(st, index, collection, NULL);
}

PyTypeObject *
refx_deref_ref_type(refx_state *st, DerefObject *d)
{
    return d->kind != NULL ? (PyTypeObject *)PyTuple_GET_ITEM(d->kind, 0)
                           : st->Ref_Type;
}

/* An index read from Python (Value/Index's argument or aux data): an int,
 * 0 <= i < 2**63.  0, or -1 with TypeError/ValueError. */
int
refx_parse_index(PyObject *o, const char *fname, Py_ssize_t *out)
{
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: index must be an int, not %.200s",
                     fname, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long i = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (i == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow != 0 || i > (long long)PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "%s: index must be >= 0 and < 2**63, got %R", fname, o);
        return -1;
    }
    if (i < 0) {
        PyErr_Format(PyExc_ValueError, "%s: index must be >= 0, got %lld",
                     fname, i);
        return -1;
    }
    *out = (Py_ssize_t)i;
    return 0;
}

static PyObject *
value_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"value",    "index",    "collection",
                             "ref_type", "metadata", NULL};
    PyObject *value, *index, *collection = Py_None, *ref_type = Py_None;
    PyObject *metadata = Py_None;
    Py_ssize_t i;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$OO:Value", kwlist,
                                     &value, &index, &collection, &ref_type,
                                     &metadata)) {
        return NULL;
    }
    if (refx_parse_index(index, "Value", &i) < 0 ||
        refx_check_hashable(collection, "Value", "collection") < 0) {
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL) {
        return NULL;
    }
    PyObject *kind = refx_kind_from_args(st, ref_type, metadata, "Value");
    if (kind == NULL && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *res = refx_value_create_kind(st, value, i, collection, kind);
    Py_XDECREF(kind);
    return res;
}

static PyObject *
index_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"index", "collection", "ref_type", "metadata",
                             NULL};
    PyObject *index, *collection = Py_None, *ref_type = Py_None;
    PyObject *metadata = Py_None;
    Py_ssize_t i;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$OO:Index", kwlist,
                                     &index, &collection, &ref_type,
                                     &metadata)) {
        return NULL;
    }
    if (refx_parse_index(index, "Index", &i) < 0 ||
        refx_check_hashable(collection, "Index", "collection") < 0) {
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL) {
        return NULL;
    }
    PyObject *kind = refx_kind_from_args(st, ref_type, metadata, "Index");
    if (kind == NULL && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *res = refx_index_create_kind(st, i, collection, kind);
    Py_XDECREF(kind);
    return res;
}

static int
deref_traverse(PyObject *op, visitproc visit, void *arg)
{
    DerefObject *self = REFX_DEREF_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->collection);
    Py_VISIT(self->kind);
    Py_VISIT(self->flat);
    return 0;
}

static int
deref_clear(PyObject *op)
{
    DerefObject *self = REFX_DEREF_CAST(op);
    Py_CLEAR(self->collection);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->flat);
    return 0;
}

static void
deref_dealloc(PyObject *op)
{
    DerefObject *self = REFX_DEREF_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, deref_dealloc); /* see ref_dealloc */
    deref_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
    Py_TRASHCAN_END;
}

static int
value_traverse(PyObject *op, visitproc visit, void *arg)
{
    ValueObject *self = REFX_VALUE_CAST(op);
    Py_VISIT(self->value);
    return deref_traverse(op, visit, arg);
}

static int
value_clear(PyObject *op)
{
    ValueObject *self = REFX_VALUE_CAST(op);
    Py_CLEAR(self->value);
    return deref_clear(op);
}

static void
value_dealloc(PyObject *op)
{
    ValueObject *self = REFX_VALUE_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, value_dealloc); /* see ref_dealloc */
    value_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
    Py_TRASHCAN_END;
}

static PyObject *
deref_get_index(PyObject *op, void *Py_UNUSED(closure))
{
    DerefObject *self = REFX_DEREF_CAST(op);
    return PyLong_FromSsize_t(self->index);
}

static PyObject *
deref_get_collection(PyObject *op, void *Py_UNUSED(closure))
{
    DerefObject *self = REFX_DEREF_CAST(op);
    return Py_NewRef(self->collection != NULL ? self->collection : Py_None);
}

static PyObject *
deref_get_ref_type(PyObject *op, void *Py_UNUSED(closure))
{
    DerefObject *self = REFX_DEREF_CAST(op);
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    return st != NULL ? Py_NewRef((PyObject *)refx_deref_ref_type(st, self))
                      : NULL;
}

static PyObject *
deref_get_metadata(PyObject *op, void *Py_UNUSED(closure))
{
    DerefObject *self = REFX_DEREF_CAST(op);
    return refx_pairs_to_mapping(
        self->kind != NULL ? PyTuple_GET_ITEM(self->kind, 1) : NULL);
}

static PyObject *
value_get_value(PyObject *op, void *Py_UNUSED(closure))
{
    ValueObject *self = REFX_VALUE_CAST(op);
    return Py_NewRef(self->value != NULL ? self->value : Py_None);
}

/* Value and Index compare by contents: same type, index, collection, kind
 * (and value for Value, with == after an identity check). */
static PyObject *
deref_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(a) != Py_TYPE(b)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    DerefObject *x = (DerefObject *)a, *y = (DerefObject *)b;
    int eq = x->index == y->index;
    if (eq && x->collection != y->collection) {
        eq = PyObject_RichCompareBool(x->collection, y->collection, Py_EQ);
        if (eq < 0) {
            return NULL;
        }
    }
    if (eq && x->kind != y->kind) {
        eq = x->kind != NULL && y->kind != NULL
                 ? PyObject_RichCompareBool(x->kind, y->kind, Py_EQ)
                 : 0;
        if (eq < 0) {
            return NULL;
        }
    }
    refx_state *st = refx_state_from_type(Py_TYPE(a));
    if (st == NULL) {
        return NULL;
    }
    if (eq && Py_TYPE(a) == st->Value_Type) {
        PyObject *va = ((ValueObject *)a)->value;
        PyObject *vb = ((ValueObject *)b)->value;
        if (va != vb) {
            eq = (va != NULL && vb != NULL)
                     ? PyObject_RichCompareBool(va, vb, Py_EQ)
                     : 0;
            if (eq < 0) {
                return NULL;
            }
        }
    }
    return Py_NewRef((eq == (op == Py_EQ)) ? Py_True : Py_False);
}

static Py_hash_t
index_hash(PyObject *op)
{
    DerefObject *self = REFX_DEREF_CAST(op);
    Py_hash_t h =
        PyObject_Hash(self->collection != NULL ? self->collection : Py_None);
    if (h == -1) {
        return -1;
    }
    Py_hash_t hk = self->kind != NULL ? PyObject_Hash(self->kind) : 0;
    if (hk == -1) {
        return -1;
    }
    Py_uhash_t x = (Py_uhash_t)h * 1000003u ^ (Py_uhash_t)self->index;
    x = (x ^ 0x5bd1e995u) * 1000003u ^ (Py_uhash_t)hk;
    return x == (Py_uhash_t)-1 ? -2 : (Py_hash_t)x;
}

static PyObject *
value_repr(PyObject *op)
{
    ValueObject *self = REFX_VALUE_CAST(op);
    int rc = Py_ReprEnter((PyObject *)self);
    if (rc != 0) {
        return rc > 0 ? PyUnicode_FromString("Value(...)") : NULL;
    }
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    PyObject *res = NULL, *kind = NULL;
    PyObject *value =
        st != NULL
            ? refx_short_repr(self->value != NULL ? self->value : Py_None)
            : NULL;
    if (value != NULL) {
        kind = refx_kind_repr(st, self->base.kind);
    }
    if (kind != NULL) {
        res = PyUnicode_FromFormat(
            "Value(%U, index=%zd, collection=%R%U)", value, self->base.index,
            self->base.collection != NULL ? self->base.collection : Py_None,
            kind);
    }
    Py_XDECREF(value);
    Py_XDECREF(kind);
    Py_ReprLeave((PyObject *)self);
    return res;
}

static PyObject *
index_repr(PyObject *op)
{
    DerefObject *self = REFX_DEREF_CAST(op);
    refx_state *st = refx_state_from_type(Py_TYPE(self));
    PyObject *kind = st != NULL ? refx_kind_repr(st, self->kind) : NULL;
    if (kind == NULL) {
        return NULL;
    }
    PyObject *res = PyUnicode_FromFormat(
        "Index(%zd, collection=%R%U)", self->index,
        self->collection != NULL ? self->collection : Py_None, kind);
    Py_DECREF(kind);
    return res;
}

static PyObject *deref_flat(DerefObject *self, PyObject *value);

/* Pickled as the pytree node it is: (_core._value_unflatten, (aux,
 * children)), so the kind comes back too. */
static PyObject *
deref_reduce(DerefObject *self, const char *unflatten, PyObject *value)
{
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &refx_module);
    if (module == NULL) {
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(module, unflatten);
    PyObject *flat = fn != NULL ? deref_flat(self, value) : NULL;
    PyObject *res = NULL;
    if (flat != NULL) {
        res = Py_BuildValue("O(OO)", fn, PyTuple_GET_ITEM(flat, 1),
                            PyTuple_GET_ITEM(flat, 0));
    }
    Py_XDECREF(fn);
    Py_XDECREF(flat);
    return res;
}

static PyObject *
value_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    ValueObject *self = REFX_VALUE_CAST(op);
    return deref_reduce(&self->base, "_value_unflatten",
                        self->value != NULL ? self->value : Py_None);
}

static PyObject *
index_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    DerefObject *self = REFX_DEREF_CAST(op);
    return deref_reduce(self, "_index_unflatten", NULL);
}

static PyGetSetDef deref_getset[] = {
    {"index", deref_get_index, NULL,
     "Position of the Ref among the distinct Refs of the deref'ed tree.",
     NULL},
    {"collection", deref_get_collection, NULL,
     "The collection of the Ref this stands for.", NULL},
    {"ref_type", deref_get_ref_type, NULL,
     "The class of the Ref this stands for (Ref or a subclass).", NULL},
    {"metadata", deref_get_metadata, NULL,
     "The metadata of the Ref this stands for (read-only mapping).", NULL},
    REFX_TREESCOPE_GETSET,
    {NULL},
};

static int
value_set_value(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(value),
                void *Py_UNUSED(closure))
{
    PyErr_SetString(
        PyExc_AttributeError,
        "a Value is a deref'ed Ref and cannot be written: reref the tree "
        "(refx.reref) and set .value on the Ref, or write deref'ed values "
        "back with refx.update_refs(target, source)");
    return -1;
}

static PyGetSetDef value_getset[] = {
    {"value", value_get_value, value_set_value,
     "The Ref's value (read-only: a Value is a deref'ed Ref).", NULL},
    {NULL},
};

static PyMethodDef value_methods[] = {
    {"__reduce__", value_reduce, METH_NOARGS, NULL},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

static PyMethodDef index_methods[] = {
    {"__reduce__", index_reduce, METH_NOARGS, NULL},
    {NULL},
};

PyDoc_STRVAR(deref_doc,
             "Base class of Value and Index, the deref'ed forms of a Ref.");

PyDoc_STRVAR(
    value_doc,
    "Value(value, index, collection=None, *, ref_type=None, metadata=None)\n"
    "--\n\n"
    "The first occurrence of a Ref in a deref'ed tree.\n\n"
    "A pytree node with one child (the value) and (index, collection) as\n"
    "static aux data, with the Ref's class and metadata too when it has\n"
    "them (ref_type, metadata).  `index` counts distinct Refs in leaf order\n"
    "from 0.");

PyDoc_STRVAR(
    index_doc,
    "Index(index, collection=None, *, ref_type=None, metadata=None)\n"
    "--\n\n"
    "A later occurrence of a Ref in a deref'ed tree: points at the Value\n"
    "with the same index.  A pytree node with no children.");

static PyType_Slot deref_slots[] = {
    {Py_tp_doc, (void *)deref_doc},   {Py_tp_dealloc, deref_dealloc},
    {Py_tp_traverse, deref_traverse}, {Py_tp_clear, deref_clear},
    {Py_tp_getset, deref_getset},     {0, NULL},
};

static PyType_Spec deref_spec = {
    .name = "refx.Deref",
    .basicsize = sizeof(DerefObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = deref_slots,
};

static PyType_Slot value_slots[] = {
    {Py_tp_doc, (void *)value_doc},
    {Py_tp_new, value_new},
    {Py_tp_dealloc, value_dealloc},
    {Py_tp_traverse, value_traverse},
    {Py_tp_clear, value_clear},
    {Py_tp_repr, value_repr},
    {Py_tp_richcompare, deref_richcompare},
    {Py_tp_getset, value_getset},
    {Py_tp_methods, value_methods},
    {0, NULL},
};

/* Value and Index are final: jaxlib registers node types exactly, so a
 * subclass would silently be a leaf. */
static PyType_Spec value_spec = {
    .name = "refx.Value",
    .basicsize = sizeof(ValueObject),
    .flags =
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = value_slots,
};

static PyType_Slot index_slots[] = {
    {Py_tp_doc, (void *)index_doc},
    {Py_tp_new, index_new},
    {Py_tp_dealloc, deref_dealloc},
    {Py_tp_traverse, deref_traverse},
    {Py_tp_clear, deref_clear},
    {Py_tp_repr, index_repr},
    {Py_tp_richcompare, deref_richcompare},
    {Py_tp_hash, index_hash},
    {Py_tp_methods, index_methods},
    {0, NULL},
};

static PyType_Spec index_spec = {
    .name = "refx.Index",
    .basicsize = sizeof(DerefObject),
    .flags =
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = index_slots,
};

/* ------------------------------------------------------------------ */
/* NOTHING                                                              */
/* ------------------------------------------------------------------ */

static PyObject *
nothing_repr(PyObject *Py_UNUSED(self))
{
    return PyUnicode_FromString("NOTHING");
}

static PyObject *
nothing_reduce(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString("NOTHING");
}

static void
nothing_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef nothing_methods[] = {
    {"__reduce__", nothing_reduce, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef nothing_getset[] = {
    REFX_TREESCOPE_GETSET,
    {NULL},
};

static PyType_Slot nothing_slots[] = {
    {Py_tp_doc,
     "The type of NOTHING, the placeholder for paths that belong "
     "to another partition."},
    {Py_tp_repr, nothing_repr},
    {Py_tp_dealloc, nothing_dealloc},
    {Py_tp_methods, nothing_methods},
    {Py_tp_getset, nothing_getset},
    {0, NULL},
};

static PyType_Spec nothing_spec = {
    .name = "refx.Nothing",
    .basicsize = sizeof(PyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = nothing_slots,
};

/* ------------------------------------------------------------------ */
/* pytree flatten/unflatten functions (registered by refx._compat)      */
/* ------------------------------------------------------------------ */

static PyObject *
deref_flat(DerefObject *self, PyObject *value)
{
    if (self->flat == NULL) {
        PyObject *children =
            value != NULL ? PyTuple_Pack(1, value) : PyTuple_New(0);
        PyObject *idx = PyLong_FromSsize_t(self->index);
        PyObject *aux = NULL;
        if (children != NULL && idx != NULL) {
            /* (index, collection), or (index, collection, kind) */
            aux = self->kind == NULL
                      ? PyTuple_Pack(2, idx, self->collection)
                      : PyTuple_Pack(3, idx, self->collection, self->kind);
        }
        if (aux != NULL) {
            self->flat = PyTuple_Pack(2, children, aux);
        }
        Py_XDECREF(children);
        Py_XDECREF(idx);
        Py_XDECREF(aux);
        if (self->flat == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(self->flat);
}

static PyObject *
value_flatten(PyObject *module, PyObject *v)
{
    refx_state *st = refx_get_state(module);
    if (Py_TYPE(v) != st->Value_Type) {
        PyErr_SetString(PyExc_TypeError, "_value_flatten expects a Value");
        return NULL;
    }
    st->deref_nodes_seen++;
    return deref_flat((DerefObject *)v, ((ValueObject *)v)->value);
}

static PyObject *
index_flatten(PyObject *module, PyObject *v)
{
    refx_state *st = refx_get_state(module);
    if (Py_TYPE(v) != st->Index_Type) {
        PyErr_SetString(PyExc_TypeError, "_index_flatten expects an Index");
        return NULL;
    }
    st->deref_nodes_seen++;
    return deref_flat((DerefObject *)v, NULL);
}

static PyObject *
value_unflatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "_value_unflatten(aux, children) takes 2 arguments");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    Py_ssize_t index;
    PyObject *collection, *kind;
    if (refx_parse_aux(st, args[0], "Value", &index, &collection, &kind) < 0) {
        return NULL;
    }
    PyObject *children =
        PySequence_Fast(args[1], "children must be a sequence");
    if (children == NULL) {
        return NULL;
    }
    PyObject *res = NULL;
    if (PySequence_Fast_GET_SIZE(children) != 1) {
        PyErr_Format(PyExc_ValueError, "Value: expected 1 child, got %zd",
                     PySequence_Fast_GET_SIZE(children));
    }
    else {
        res = refx_value_create_kind(st, PySequence_Fast_GET_ITEM(children, 0),
                                     index, collection, kind);
    }
    Py_DECREF(children);
    return res;
}

static PyObject *
index_unflatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "_index_unflatten(aux, children) takes 2 arguments");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    Py_ssize_t index;
    PyObject *collection, *kind;
    if (refx_parse_aux(st, args[0], "Index", &index, &collection, &kind) < 0) {
        return NULL;
    }
    return refx_index_create_kind(st, index, collection, kind);
}

static PyObject *
nothing_flatten(PyObject *module, PyObject *Py_UNUSED(v))
{
    refx_state *st = refx_get_state(module);
    st->nothing_nodes_seen++;
    return Py_BuildValue("(()O)", Py_None);
}

static PyObject *
nothing_unflatten(PyObject *module, PyObject *const *Py_UNUSED(args),
                  Py_ssize_t Py_UNUSED(nargs))
{
    return Py_NewRef(refx_get_state(module)->nothing);
}

PyMethodDef refx_ref_functions[] = {
    {"_value_flatten", value_flatten, METH_O,
     "_value_flatten($module, value, /)\n--\n\npytree flatten of Value."},
    {"_value_unflatten", (PyCFunction)(void (*)(void))value_unflatten,
     METH_FASTCALL,
     "_value_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of Value."},
    {"_index_flatten", index_flatten, METH_O,
     "_index_flatten($module, index, /)\n--\n\npytree flatten of Index."},
    {"_index_unflatten", (PyCFunction)(void (*)(void))index_unflatten,
     METH_FASTCALL,
     "_index_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of Index."},
    {"_nothing_flatten", nothing_flatten, METH_O,
     "_nothing_flatten($module, nothing, /)\n--\n\npytree flatten of "
     "NOTHING."},
    {"_nothing_unflatten", (PyCFunction)(void (*)(void))nothing_unflatten,
     METH_FASTCALL,
     "_nothing_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of NOTHING."},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ */
/* type creation                                                        */
/* ------------------------------------------------------------------ */

int
refx_init_ref_types(PyObject *module, refx_state *st)
{
    if (refx_add_type(module, &ref_spec, NULL, &st->Ref_Type, 1) < 0 ||
        refx_add_type(module, &deref_spec, NULL, &st->Deref_Type, 1) < 0 ||
        refx_add_type(module, &value_spec, (PyObject *)st->Deref_Type,
                      &st->Value_Type, 1) < 0 ||
        refx_add_type(module, &index_spec, (PyObject *)st->Deref_Type,
                      &st->Index_Type, 1) < 0 ||
        refx_add_type(module, &nothing_spec, NULL, &st->Nothing_Type, 1) < 0) {
        return -1;
    }
    st->nothing = PyType_GenericAlloc(st->Nothing_Type, 0);
    if (st->nothing == NULL) {
        return -1;
    }
    st->mutable_var = PyContextVar_New("refx.mutable", NULL);
    if (st->mutable_var == NULL ||
        PyModule_AddObjectRef(module, "_mutable_var", st->mutable_var) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "NOTHING", st->nothing);
}
