/*
 * jit.c: the per-call path of refx.jit and refx.jit_partial, and Static.
 *
 * refx.jit(fun) returns a JitFunction: a C object with its own vectorcall
 * that turns a call with trees of Refs into a call of a plain jax.jit
 * function on one flat list of arrays, and writes back what `fun` wrote.
 * Everything that runs once per compilation (building that jax.jit
 * function, tracing `fun`, finding out what it wrote) is Python, in
 * refx/_jit.py over refx/_lift.py; everything that runs on every call is here.
 *
 * One call, in order:
 *
 *   split      positional/keyword arguments named static go into `statics`
 *              as (position or name, type, value): the type is there because
 *              jax.jit retraces for 1, 1.0 and True (it compares the type of
 *              a static argument, then ==), and so do we.  The rest are the
 *              dynamic arguments: a tuple, plus a dict when any keyword
 *              argument is dynamic.
 *   flatten    the dynamic arguments, once, with no leaf predicate: a Ref
 *              is a leaf because it is not a pytree node; Value/Index/
 *              NOTHING/Partition are ordinary nodes.  The arguments are
 *              walked against the memo of the last call's flatten
 *              (jf->memo, flatmemo.c), which gives jaxlib's leaves and the
 *              memo's own treedef when nothing changed; otherwise jaxlib
 *              flattens and the memo is made again.
 *   snapshot   ONE pass over the leaves that numbers the distinct Refs
 *              (the bound ones of jit_partial first) and takes a new
 *              reference to each one's value, and runs no Python code and
 *              allocates no GC object: another thread's update_refs or
 *              write cannot land half-way through it, so every call sees
 *              the Refs as they were at one instant.  Distinct Refs are
 *              told apart by the scratch marks in RefObject (see deref.c),
 *              stamped with a fresh epoch; since nothing else can run during
 *              the pass, no one can re-stamp them, so no fallback is needed.
 *   key        (treedef, has-kwargs, statics, sharing pattern, each distinct
 *              Ref's collection, their specs (class, metadata, attributes)
 *              when any is a subclass or has metadata).  The
 *              sharing pattern is a bytes object: per leaf, the number of
 *              its Ref or -1.  Shapes and dtypes are not in the key: the
 *              jax.jit function of an entry retraces for those itself.
 *   lookup     cache[key] -> entry; on a miss the Python builder makes one.
 *              The last (key, entry) is kept: a call whose parts equal that
 *              key (the same item-by-item == as the dict's) takes its entry
 *              without building or hashing a key of its own.
 *              An entry is (jitted, candidates, closure, positions,
 *              specs): the jax.jit function, the numbers of the Refs that
 *              may be donated (or None), and the Refs `fun` closes over
 *              (or None; see "Closed-over Refs" below).
 *   closure    the entry's closed-over Refs must sit where its trace saw
 *              them (positions: an argument Ref number, or -1 when not
 *              passed) with the same specs, or the entry is built again
 *              (closure_fits, refresh_entry); those not passed are numbered
 *              after the arguments' Refs (append_closure), and then every
 *              Ref's value is read again, all at one moment
 *              (reread_values).
 *   call       jitted(values, others): the distinct Refs' values in
 *              numbering order (a value that is a pytree as a Flat of its
 *              leaves, checked against the memo of the last value at its
 *              number: flatvalue.c), then the other leaves.  With donation,
 *              jitted(mask, donated, kept, others), `mask` a static bytes
 *              argument saying which candidates are donated this call.
 *              A trace that finds new closed-over Refs stops with
 *              _lift.Rediscover: the entry is built again with them and
 *              the call made again (call_entry).
 *   result     (Static(plan), written values, out).  The plan is made by
 *              the trace that compiled this executable and rides in the aux
 *              data of a Static (a node with no children), so each call
 *              gets the plan of its own trace, even when jax.jit retraced
 *              the entry for new shapes and `fun` wrote other Refs then:
 *                plan = (written: tuple of Ref numbers,
 *                        spec: None, or one item per output leaf,
 *                        out_treedef: None, or the output's treedef)
 *              With spec None, `out` is the output tree itself (it holds no
 *              Ref).  Otherwise `out` is a flat list and spec says, per
 *              output leaf: None (take the next item of `out`), an int k
 *              (the caller's Ref number k), a Ref (a Ref `fun` closed over,
 *              returned as is), or (j, type, collection) (a Ref made inside
 *              `fun`: the first occurrence of j takes the next item of `out`
 *              as its value, later ones the same new Ref; `type` is its
 *              spec: its class, or its kind when it has metadata or is a
 *              subclass, see ref_spec).
 *   outputs    built before anything is written, since building may fail:
 *              the written values that came back as Flats rebuilt
 *              (refx_flat_restore_all), then the outputs (jit_outputs).
 *   write      all or nothing, through refx_write_all as update_refs
 *              (jit_write_back): every written Ref is checked first (the
 *              trace-level check: a Ref of another trace that `fun` wrote
 *              is a ValueError naming its path), then all are stored with
 *              no Python code running, old values released after the last
 *              store.
 *
 * Donation.  donate_argnums/argnames donate the arrays of the Refs of those
 * arguments that `fun` writes: the candidates are the written ones (the
 * builder traces `fun` once to learn them).  A donated buffer is deleted by
 * the call, so a donated Ref must be given a new value: the trace returns
 * every donated Ref as written (after a retrace for new shapes that no
 * longer writes it, its input comes back, which XLA aliases).  A Ref is
 * donated only if nothing else holds its value (value_donatable: the
 * reference counts of the value and, for a dict/list/tuple/Partition/Value,
 * of every array in it) and the value appears once among all inputs: a
 * clone's Ref sharing the array, or a variable, keeps it undonated, so no
 * Ref and no variable ever holds a deleted array.  The whole write check
 * (trace level, refx.mutable) of donated Refs is done before the call,
 * since after it their old buffers are gone.
 *
 * Closed-over Refs.  A Ref `fun` reads or writes without receiving it is
 * found while the entry's function traces (ref.c's capture hook, refx/
 * _lift.py) and becomes a hidden input: the entry lists it, each call
 * reads its current value after the arguments', and a write comes back in
 * the plan like an argument Ref's (its number is past the arguments').
 *
 * jit_partial binds trees of Refs once: their distinct Refs (bound_refs),
 * their other leaves and their structure.  Each call reads the bound Refs'
 * current values in the snapshot pass and flattens only the remaining
 * arguments; the bound structure is constant, so it is not in the key, but
 * the bound Refs' collections and specs are (an attribute set on a bound
 * Ref after binding retraces).  It is kept constant by refusal: after an
 * nn.Module attribute changed anywhere, the next call flattens the bound
 * trees again and raises if they are no longer what was bound
 * (check_binding).
 *
 * Eager mode (JitFunction(..., eager=sentinel): the function an eager
 * refx.scan/cond/... call runs through, refx/_control.py).  Before anything
 * else a call checks that it runs outside every trace and not under
 * jax.disable_jit, and after the snapshot that every non-Ref leaf is one
 * JAX can take (others_traceable); if not, it returns the sentinel having
 * written nothing, and the transform runs the call its own way.  A call that
 * runs stamps `used` (the transforms' LRU evicts by it).
 *
 * Static(value) is a pytree node with no children whose aux data is
 * (type(value), value): part of every treedef and so of every jit cache
 * key, and of refx.jit's; with the type, for the reason given above.
 *
 * Functions in this file: Static, the JitFunction type (check_binding, split, snapshot,
 * key, call, finish: jit_outputs then jit_write_back), _make_refs/_ref_is_current/_write_refs (helpers for
 * the trace-time code), _install_jit, refx_init_jit.
 */
#include "refx.h"
#include "ptrmap.h"
#include <structmember.h>

/* ------------------------------------------------------------------ */
/* Static                                                               */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *value; /* owned, hashable */
    PyObject *flat;  /* lazily built ((), (type, value)) */
} StaticObject;
#define STATIC_CAST(op) ((StaticObject *)(op))

static PyObject *
static_create(refx_state *st, PyObject *value)
{
    Py_INCREF(value); /* owned before allocating: see refx_ref_create */
    StaticObject *self = PyObject_GC_New(StaticObject, st->Static_Type);
    if (self == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    self->value = value;
    self->flat = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
static_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"value", NULL};
    PyObject *value;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Static", kwlist, &value)) {
        return NULL;
    }
    if (refx_check_hashable(value, "Static", "value") < 0) {
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL) {
        return NULL;
    }
    return static_create(st, value);
}

static int
static_traverse(PyObject *op, visitproc visit, void *arg)
{
    StaticObject *self = STATIC_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->value);
    Py_VISIT(self->flat);
    return 0;
}

static int
static_clear(PyObject *op)
{
    StaticObject *self = STATIC_CAST(op);
    Py_CLEAR(self->value);
    Py_CLEAR(self->flat);
    return 0;
}

static void
static_dealloc(PyObject *op)
{
    StaticObject *self = STATIC_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    static_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
static_get_value(PyObject *op, void *Py_UNUSED(closure))
{
    StaticObject *self = STATIC_CAST(op);
    return Py_NewRef(self->value != NULL ? self->value : Py_None);
}

/* Equal when the values have the same type and compare equal (jax.jit's
 * rule for static arguments: 1, 1.0 and True are three keys). */
static PyObject *
static_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(a) != Py_TYPE(b)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *va = ((StaticObject *)a)->value,
             *vb = ((StaticObject *)b)->value;
    int eq = 0;
    if (va != NULL && vb != NULL && Py_TYPE(va) == Py_TYPE(vb)) {
        Py_INCREF(va);
        Py_INCREF(vb);
        eq = PyObject_RichCompareBool(va, vb, Py_EQ);
        Py_DECREF(va);
        Py_DECREF(vb);
        if (eq < 0) {
            return NULL;
        }
    }
    return Py_NewRef((eq == (op == Py_EQ)) ? Py_True : Py_False);
}

static Py_hash_t
static_hash(PyObject *op)
{
    StaticObject *self = STATIC_CAST(op);
    if (self->value == NULL) {
        return 0;
    }
    Py_hash_t h = PyObject_Hash(self->value);
    if (h == -1) {
        return -1;
    }
    Py_uhash_t x = (Py_uhash_t)h * 1000003u ^
                   (Py_uhash_t)(uintptr_t)Py_TYPE(self->value) >> 4;
    return x == (Py_uhash_t)-1 ? -2 : (Py_hash_t)x;
}

static PyObject *
static_repr(PyObject *op)
{
    StaticObject *self = STATIC_CAST(op);
    int rc = Py_ReprEnter((PyObject *)self);
    if (rc != 0) {
        return rc > 0 ? PyUnicode_FromString("Static(...)") : NULL;
    }
    PyObject *res = PyUnicode_FromFormat(
        "Static(%R)", self->value != NULL ? self->value : Py_None);
    Py_ReprLeave((PyObject *)self);
    return res;
}

static PyObject *
static_reduce(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    StaticObject *self = STATIC_CAST(op);
    return Py_BuildValue("O(O)", Py_TYPE(self),
                         self->value != NULL ? self->value : Py_None);
}

static PyObject *
static_flatten(PyObject *module, PyObject *s)
{
    refx_state *st = refx_get_state(module);
    if (Py_TYPE(s) != st->Static_Type) {
        PyErr_SetString(PyExc_TypeError, "_static_flatten expects a Static");
        return NULL;
    }
    StaticObject *self = (StaticObject *)s;
    if (self->flat == NULL) {
        PyObject *value = self->value != NULL ? self->value : Py_None;
        self->flat =
            Py_BuildValue("(()(OO))", (PyObject *)Py_TYPE(value), value);
        if (self->flat == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(self->flat);
}

static PyObject *
static_unflatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "_static_unflatten(aux, children) takes 2 arguments");
        return NULL;
    }
    PyObject *aux = args[0];
    if (!PyTuple_Check(aux) || PyTuple_GET_SIZE(aux) != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "Static: aux data must be (type, value)");
        return NULL;
    }
    return static_create(refx_get_state(module), PyTuple_GET_ITEM(aux, 1));
}

static PyGetSetDef static_getset[] = {
    {"value", static_get_value, NULL, "The static value.", NULL},
    {NULL},
};

static PyMethodDef static_methods[] = {
    {"__reduce__", static_reduce, METH_NOARGS, NULL},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

PyDoc_STRVAR(
    static_doc,
    "Static(value)\n"
    "--\n\n"
    "A pytree node with no children that carries a hashable value in its\n"
    "aux data.  Passing Static(v) to a jitted function makes v part of the\n"
    "compilation cache key (a new value retraces) rather than a traced\n"
    "array.  Two Statics are equal when their values have the same type and\n"
    "compare equal (jax.jit's rule for static arguments).  An unhashable\n"
    "value is a TypeError.");

static PyType_Slot static_slots[] = {
    {Py_tp_doc, (void *)static_doc},
    {Py_tp_new, static_new},
    {Py_tp_dealloc, static_dealloc},
    {Py_tp_traverse, static_traverse},
    {Py_tp_clear, static_clear},
    {Py_tp_repr, static_repr},
    {Py_tp_richcompare, static_richcompare},
    {Py_tp_hash, static_hash},
    {Py_tp_getset, static_getset},
    {Py_tp_methods, static_methods},
    {0, NULL},
};

/* final: jaxlib registers node types exactly */
static PyType_Spec static_spec = {
    .name = "refx.Static",
    .basicsize = sizeof(StaticObject),
    .flags =
        Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = static_slots,
};

/* ------------------------------------------------------------------ */
/* JitFunction                                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fun;
    PyObject *options;      /* dict of jax.jit options, for the builder */
    PyObject *cache;        /* dict: key -> (jitted, candidates) */
    PyObject *static_nums;  /* tuple of int (may be negative) */
    PyObject *static_names; /* tuple of str */
    PyObject *donate_nums;  /* tuple of int */
    PyObject *donate_names; /* tuple of str */
    /* jit_partial (NULL otherwise) */
    PyObject *bound;        /* tuple of the bound trees */
    PyObject *bound_refs;   /* tuple: their distinct Refs, numbering order */
    PyObject *bound_others; /* tuple: their non-Ref leaves, in order */
    PyObject *bound_desc;   /* (treedef, pattern tuple) for the builder */
    PyObject *name;         /* str, for messages */
    PyObject *kind;         /* str or NULL: the transform messages name
                             * ("refx.scan" for an eager refx.scan run
                             * through refx.jit), else refx.jit[_partial] */
    PyObject *last;         /* (key, entry) of the last cache lookup */
    PyObject *memo;         /* the last argument flatten (flatmemo.c) */
    PyObject *vmemo;        /* NULL, or per Ref number the memo of the last
                             * pytree value passed (flatvalue.c) */
    PyObject *eager;        /* NULL, or the object a call returns instead of
                             * running inside a trace, under
                             * jax.disable_jit, or when a leaf is one JAX
                             * cannot take (an eager refx transform then
                             * runs uncached) */
    uint64_t used;          /* eager: st->eager_clock at the last call run */
    uint64_t bound_epoch;   /* jit_partial: st->module_epoch when the bound
                             * trees were last found as bound */
    PyObject *dict;
    PyObject *weakreflist;
} JitObject;
#define JIT_CAST(op) ((JitObject *)(op))

/* Everything one call owns.  `refs` borrow: the leaves list and
 * jf->bound_refs keep them alive. */
typedef struct {
    refx_state *st;
    JitObject *jf;
    PyObject *dyn_args, *dyn_kwargs, *statics, *kwnames_dyn;
    PyObject *tree, *leaves, *treedef;
    Py_ssize_t nleaves, nbound, nrefs, nothers;
    Py_ssize_t nargrefs; /* nrefs before the closed-over Refs are added */
    Py_ssize_t cap;      /* room in refs and vals */
    uint64_t epoch;      /* the snapshot's stamp on the Refs' marks */
    int32_t *pattern;    /* per call leaf: Ref number or -1 */
    RefObject **refs;    /* distinct Refs, bound ones first */
    PyObject **vals;     /* owned snapshot of their values (NULL once moved) */
    PyObject **others;   /* borrowed non-Ref leaves of the call */
    PyObject *entry;     /* (jitted, candidates, closure, positions, specs,
                      * written) */
    PyObject *hold;  /* NULL, or a list owning the stand-ins used (below) */
    PyObject *bound; /* NULL, or jit_partial's bound Refs with stand-ins */
    PyObject *trace; /* eager: the (eval) trace's weakref, read once */
    PyObject *call_args[4];
    size_t ncall;
    int lowering; /* JitFunction.lower: values as they are, no Flat */
} call_ctx;

static void
ctx_fini(call_ctx *c)
{
    if (c->vals != NULL) {
        for (Py_ssize_t k = 0; k < c->nrefs; k++) {
            Py_XDECREF(c->vals[k]);
        }
    }
    PyMem_Free(c->vals);
    PyMem_Free(c->refs);
    PyMem_Free(c->pattern);
    PyMem_Free(c->others);
    for (size_t i = 0; i < c->ncall; i++) {
        Py_XDECREF(c->call_args[i]);
    }
    Py_XDECREF(c->entry);
    Py_XDECREF(c->hold);
    Py_XDECREF(c->bound);
    Py_XDECREF(c->trace);
    Py_XDECREF(c->dyn_args);
    Py_XDECREF(c->dyn_kwargs);
    Py_XDECREF(c->statics);
    Py_XDECREF(c->kwnames_dyn);
    Py_XDECREF(c->tree);
    Py_XDECREF(c->leaves);
    Py_XDECREF(c->treedef);
}

/* "refx.jit(name)" or "refx.jit_partial(name)" prefix pieces */
static const char *
jit_kind(JitObject *jf)
{
    if (jf->kind != NULL) {
        const char *k = PyUnicode_AsUTF8(jf->kind);
        if (k != NULL) {
            return k;
        }
        PyErr_Clear();
    }
    return jf->bound != NULL ? "refx.jit_partial" : "refx.jit";
}

static int
is_static_num(JitObject *jf, Py_ssize_t g, Py_ssize_t total)
{
    PyObject *nums = jf->static_nums;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(nums); i++) {
        Py_ssize_t m = PyLong_AsSsize_t(PyTuple_GET_ITEM(nums, i));
        if (m < 0) {
            m += total;
        }
        if (m == g) {
            return 1;
        }
    }
    return 0;
}

static int
name_in(PyObject *names, PyObject *name)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *n = PyTuple_GET_ITEM(names, i);
        if (n == name) {
            return 1;
        }
        int eq = PyUnicode_Compare(n, name);
        if (eq == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (eq == 0) {
            return 1;
        }
    }
    return 0;
}

/* (key, type(value), value), after checking value is hashable */
static PyObject *
static_item(JitObject *jf, PyObject *where, PyObject *value)
{
    if (PyObject_Hash(value) == -1) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s(%U): static argument %R is an unhashable %.200s; "
                         "static arguments must be hashable",
                         jit_kind(jf), jf->name, where,
                         Py_TYPE(value)->tp_name);
        }
        return NULL;
    }
    return PyTuple_Pack(3, where, (PyObject *)Py_TYPE(value), value);
}

/* Split the call into dynamic args (tuple), dynamic kwargs (dict or NULL)
 * and statics (tuple or NULL). */
static int
split_args(call_ctx *c, PyObject *const *args, Py_ssize_t nargs,
           PyObject *kwnames)
{
    JitObject *jf = c->jf;
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t nbound_args =
        jf->bound != NULL ? PyTuple_GET_SIZE(jf->bound) : 0;
    Py_ssize_t total = nbound_args + nargs;
    int any_static = PyTuple_GET_SIZE(jf->static_nums) > 0 ||
                     (nkw > 0 && PyTuple_GET_SIZE(jf->static_names) > 0);
    PyObject *statics = NULL, *dyn = NULL;
    if (!any_static) {
        c->dyn_args = PyTuple_New(nargs);
        if (c->dyn_args == NULL) {
            return -1;
        }
        for (Py_ssize_t i = 0; i < nargs; i++) {
            PyTuple_SET_ITEM(c->dyn_args, i, Py_NewRef(args[i]));
        }
    }
    else {
        statics = PyList_New(0);
        dyn = PyList_New(0);
        if (statics == NULL || dyn == NULL) {
            goto error;
        }
        for (Py_ssize_t i = 0; i < nargs; i++) {
            if (is_static_num(jf, nbound_args + i, total)) {
                PyObject *where = PyLong_FromSsize_t(nbound_args + i);
                PyObject *item =
                    where != NULL ? static_item(jf, where, args[i]) : NULL;
                Py_XDECREF(where);
                if (item == NULL || PyList_Append(statics, item) < 0) {
                    Py_XDECREF(item);
                    goto error;
                }
                Py_DECREF(item);
            }
            else if (PyList_Append(dyn, args[i]) < 0) {
                goto error;
            }
        }
        c->dyn_args = PyList_AsTuple(dyn);
        if (c->dyn_args == NULL) {
            goto error;
        }
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
        int s = name_in(jf->static_names, name);
        if (s < 0) {
            goto error;
        }
        if (s) {
            if (statics == NULL && (statics = PyList_New(0)) == NULL) {
                goto error;
            }
            PyObject *item = static_item(jf, name, v);
            if (item == NULL || PyList_Append(statics, item) < 0) {
                Py_XDECREF(item);
                goto error;
            }
            Py_DECREF(item);
            continue;
        }
        if (c->dyn_kwargs == NULL && (c->dyn_kwargs = PyDict_New()) == NULL) {
            goto error;
        }
        if (PyDict_SetItem(c->dyn_kwargs, name, v) < 0) {
            goto error;
        }
    }
    if (statics != NULL && PyList_GET_SIZE(statics) > 0) {
        c->statics = PyList_AsTuple(statics);
        if (c->statics == NULL) {
            goto error;
        }
    }
    Py_XDECREF(statics);
    Py_XDECREF(dyn);
    return 0;
error:
    Py_XDECREF(statics);
    Py_XDECREF(dyn);
    return -1;
}

/* Number the distinct Refs and take their values.  Runs no Python code and
 * allocates no GC object between the first value read and the last (see
 * the essay): the arrays are allocated first. */
static int
snapshot(call_ctx *c)
{
    refx_state *st = c->st;
    JitObject *jf = c->jf;
    Py_ssize_t n = PyList_GET_SIZE(c->leaves);
    PyObject *bound = c->bound != NULL ? c->bound : jf->bound_refs;
    Py_ssize_t nb = bound != NULL ? PyTuple_GET_SIZE(bound) : 0;
    Py_ssize_t cap = nb + n;
    c->nleaves = n;
    c->nbound = nb;
    c->pattern = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    c->refs = PyMem_Malloc((size_t)(cap > 0 ? cap : 1) * sizeof(RefObject *));
    c->vals = PyMem_Calloc((size_t)(cap > 0 ? cap : 1), sizeof(PyObject *));
    c->cap = cap > 0 ? cap : 1;
    c->others = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(PyObject *));
    if (c->pattern == NULL || c->refs == NULL || c->vals == NULL ||
        c->others == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (cap > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "refx.jit: too many leaves");
        return -1;
    }
    /* --- from here to the end of the loop: no Python code, no GC --- */
    uint64_t epoch = ++st->epoch;
    Py_ssize_t nrefs = 0, nothers = 0;
    for (Py_ssize_t k = 0; k < nb; k++) {
        RefObject *r = (RefObject *)PyTuple_GET_ITEM(bound, k);
        r->mark_epoch = epoch;
        r->mark_index = k;
        c->refs[k] = r;
        c->vals[k] = Py_NewRef(r->held); /* maybe pending: build_call */
    }
    nrefs = nb;
    PyObject **items = ((PyListObject *)c->leaves)->ob_item;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = items[i];
        if (!Ref_Check(st, leaf)) {
            c->pattern[i] = -1;
            c->others[nothers++] = leaf;
            continue;
        }
        RefObject *r = (RefObject *)leaf;
        if (r->mark_epoch == epoch) {
            c->pattern[i] = (int32_t)r->mark_index;
            continue;
        }
        r->mark_epoch = epoch;
        r->mark_index = nrefs;
        c->refs[nrefs] = r;
        c->vals[nrefs] = Py_NewRef(r->held);
        c->pattern[i] = (int32_t)nrefs;
        nrefs++;
    }
    /* --- end of the snapshot --- */
    c->nrefs = c->nargrefs = nrefs;
    c->epoch = epoch;
    c->nothers = nothers;
    return 0;
}

/* A Ref's spec: what rebuilds it inside a trace and keys the cache.  Its
 * type for a plain Ref (Ref, no metadata), else its kind (class, metadata,
 * attributes; see kinds.c).  New reference, or NULL with an error. */
static PyObject *
ref_spec(refx_state *st, RefObject *r)
{
    int err;
    PyObject *kind = refx_ref_kind(st, r, &err);
    if (kind != NULL || err) {
        return kind;
    }
    return Py_NewRef((PyObject *)Py_TYPE(r));
}

/* 0 if `spec` is a Ref class or a kind, else -1 with TypeError */
static int
check_spec(refx_state *st, PyObject *spec)
{
    if (PyType_Check(spec)) {
        if (PyType_IsSubtype((PyTypeObject *)spec, st->Ref_Type)) {
            return 0;
        }
        PyErr_SetString(PyExc_TypeError,
                        "refx.jit: a Ref spec must be a Ref "
                        "class or a kind");
        return -1;
    }
    return refx_check_kind(st, spec, "refx.jit");
}

static PyObject *
ref_from_spec(refx_state *st, PyObject *spec, PyObject *value,
              PyObject *collection, PyObject *trace)
{
    if (PyType_Check(spec)) {
        return refx_ref_create(st, (PyTypeObject *)spec, value, collection,
                               trace);
    }
    return refx_ref_create_kind(st, spec, value, collection, trace);
}

/* _ref_spec(ref): see ref_spec */
static PyObject *
ref_spec_py(PyObject *module, PyObject *ref)
{
    refx_state *st = refx_get_state(module);
    if (!Ref_Check(st, ref)) {
        PyErr_SetString(PyExc_TypeError, "_ref_spec expects a Ref");
        return NULL;
    }
    return ref_spec(st, (RefObject *)ref);
}

/* The cache key of this call (see the essay). */
static PyObject *
make_key(call_ctx *c)
{
    refx_state *st = c->st;
    Py_ssize_t nrefs = c->nrefs;
    PyObject *pattern = Py_None, *colls = Py_None, *types = Py_None;
    PyObject *key = NULL;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (c->nothers < c->nleaves) { /* some leaf is a Ref */
        Py_SETREF(pattern, PyBytes_FromStringAndSize(
                               (const char *)c->pattern,
                               c->nleaves * (Py_ssize_t)sizeof(int32_t)));
        if (pattern == NULL) {
            goto done;
        }
    }
    if (nrefs > 0) { /* every Ref, the bound ones of jit_partial too */
        Py_SETREF(colls, PyTuple_New(nrefs));
        if (colls == NULL) {
            goto done;
        }
        int all_plain = 1;
        for (Py_ssize_t k = 0; k < nrefs; k++) {
            RefObject *r = c->refs[k];
            PyTuple_SET_ITEM(colls, k, Py_NewRef(r->collection));
            all_plain &= Py_TYPE(r) == st->Ref_Type && r->metadata == NULL;
        }
        if (!all_plain) { /* classes, metadata and attributes: their specs */
            Py_SETREF(types, PyTuple_New(nrefs));
            if (types == NULL) {
                goto done;
            }
            for (Py_ssize_t k = 0; k < nrefs; k++) {
                PyObject *spec = ref_spec(st, c->refs[k]);
                if (spec == NULL) {
                    goto done;
                }
                PyTuple_SET_ITEM(types, k, spec);
            }
        }
    }
    key = PyTuple_Pack(
        6, c->treedef, c->dyn_kwargs != NULL ? Py_True : Py_False,
        c->statics != NULL ? c->statics : Py_None, pattern, colls, types);
done:
    Py_XDECREF(pattern);
    Py_XDECREF(colls);
    Py_XDECREF(types);
    return key;
}

/* What the builder needs beyond the key: (treedef, has_kwargs, statics,
 * pattern tuple, collections of all Refs, specs of all Refs (see
 * ref_spec), dynamic keyword names, values, others). */
static PyObject *
make_desc(call_ctx *c)
{
    PyObject *pattern = NULL, *colls = NULL, *types = NULL, *vals = NULL;
    PyObject *others = NULL, *names = NULL, *desc = NULL;
    PyObject *refs = NULL;
    Py_ssize_t nrefs = c->nargrefs;
    pattern = PyTuple_New(c->nleaves);
    colls = PyTuple_New(nrefs);
    types = PyTuple_New(nrefs);
    vals = PyList_New(nrefs);
    refs = PyTuple_New(nrefs);
    others = PyList_New(c->nothers);
    if (pattern == NULL || colls == NULL || types == NULL || vals == NULL ||
        refs == NULL || others == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < c->nleaves; i++) {
        PyObject *p = PyLong_FromLong(c->pattern[i]);
        if (p == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(pattern, i, p);
    }
    for (Py_ssize_t k = 0; k < nrefs; k++) {
        PyTuple_SET_ITEM(colls, k, Py_NewRef(c->refs[k]->collection));
        PyObject *spec = ref_spec(c->st, c->refs[k]);
        if (spec == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(types, k, spec);
        /* made: the entry builder reads the values themselves */
        PyObject *v = refx_flat_value(c->st, c->vals[k]);
        if (v == NULL) {
            goto done;
        }
        PyList_SET_ITEM(vals, k, v);
        PyTuple_SET_ITEM(refs, k, Py_NewRef((PyObject *)c->refs[k]));
    }
    for (Py_ssize_t i = 0; i < c->nothers; i++) {
        PyList_SET_ITEM(others, i, Py_NewRef(c->others[i]));
    }
    if (c->dyn_kwargs != NULL) {
        names = PyDict_Keys(c->dyn_kwargs);
        if (names == NULL) {
            goto done;
        }
    }
    else {
        names = PyList_New(0);
        if (names == NULL) {
            goto done;
        }
    }
    desc = PyTuple_Pack(10, c->treedef,
                        c->dyn_kwargs != NULL ? Py_True : Py_False,
                        c->statics != NULL ? c->statics : Py_None, pattern,
                        colls, types, names, vals, others, refs);
done:
    Py_XDECREF(refs);
    Py_XDECREF(pattern);
    Py_XDECREF(colls);
    Py_XDECREF(types);
    Py_XDECREF(vals);
    Py_XDECREF(others);
    Py_XDECREF(names);
    return desc;
}

/* Where Ref k sits among the arguments, e.g. "argument 0 at ('w',)"
 * (never fails: the message it goes into is the error that matters) */
static PyObject *
ref_path(call_ctx *c, Py_ssize_t k)
{
    refx_state *st = c->st;
    PyObject *res = NULL, *tree = c->tree, *bound = Py_False;
    Py_ssize_t leaf = -1;
    if (k >= c->nargrefs) {
        return PyUnicode_FromString("a Ref closed over by fun");
    }
    if (k < c->nbound) {
        PyObject *pat = PyTuple_GET_ITEM(c->jf->bound_desc, 1);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pat) && leaf < 0; i++) {
            if (PyLong_AsSsize_t(PyTuple_GET_ITEM(pat, i)) == k) {
                leaf = i;
            }
        }
        tree = c->jf->bound;
        bound = Py_True;
    }
    else {
        for (Py_ssize_t i = 0; i < c->nleaves && leaf < 0; i++) {
            if (c->pattern[i] == k) {
                leaf = i;
            }
        }
    }
    if (leaf >= 0 && st->jit_describe != NULL) {
        res = PyObject_CallFunction(
            st->jit_describe, "OOOOnO", (PyObject *)c->jf, tree,
            c->dyn_kwargs != NULL ? Py_True : Py_False,
            c->statics != NULL ? c->statics : Py_None, leaf, bound);
    }
    if (res == NULL) {
        PyErr_Clear();
        res = PyUnicode_FromFormat("Ref %zd", k);
    }
    return res;
}

/* ValueError for a write of Ref k that refx_check_write refused (`why`:
 * which check), worded by the reason: a refx.mutable refusal keeps its
 * message and adds where the Ref is; a trace-level one keeps only its first
 * clause (the seed's words), since where the Ref is says more than the
 * Ref's own account; a tracer check's message is kept whole.  An error that
 * is not a ValueError passes through unchanged. */
static void
fail_refused(call_ctx *c, Py_ssize_t k, const char *what, refx_refusal why)
{
    if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
        return;
    }
    PyObject *exc = refx_take_exception();
    PyObject *msg = exc != NULL ? PyObject_Str(exc) : NULL;
    Py_XDECREF(exc);
    PyObject *path = msg != NULL ? ref_path(c, k) : NULL;
    if (path != NULL && why == REFX_REFUSED_MUTABLE) {
        PyErr_Format(PyExc_ValueError,
                     "%U (%s(%U) %s the Ref of %U); nothing was written", msg,
                     jit_kind(c->jf), c->jf->name, what, path);
    }
    else if (path != NULL) {
        PyObject *head = why == REFX_REFUSED_TRACE
                             ? PyUnicode_FromString(REFX_TRACE_SEED)
                             : Py_NewRef(msg);
        if (head != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "%U: %s(%U) %s the Ref of %U, which belongs to "
                         "another JAX trace than the call's; nothing was "
                         "written (pass the Refs a function writes to it as "
                         "arguments)",
                         head, jit_kind(c->jf), c->jf->name, what, path);
            Py_DECREF(head);
        }
    }
    Py_XDECREF(path);
    Py_XDECREF(msg);
}

/* jax Arrays only: a numpy array or a pytree value is never donated */
static inline int
donatable(refx_state *st, PyObject *v)
{
    return st->jit_array_type != NULL &&
           (PyObject *)Py_TYPE(v) == st->jit_array_type;
}

/* May a Ref's value `v`, held `held` times (by its Ref and the snapshot),
 * be donated?  A jax Array, or an exact dict or list, a tuple (a
 * namedtuple: an optax state), a Partition or a deref'ed Value of such
 * values (Index and NOTHING hold none), with no
 * other holder anywhere: a clone's Ref sharing the array, or a variable of
 * the program, would keep a deleted array.  A container's items must be
 * held by it alone.  Anything else (a numpy array, a Python scalar, a
 * custom node C cannot look into) is not donated: donation is an
 * optimisation, and skipping it is always right. */
static int
value_donatable(refx_state *st, PyObject *v, Py_ssize_t held, int depth)
{
    if (Py_IS_TYPE(v, st->Nothing_Type) || Py_IS_TYPE(v, st->Index_Type)) {
        return 1; /* no arrays */
    }
    if (Py_REFCNT(v) != held) {
        return 0;
    }
    if (donatable(st, v)) {
        return 1;
    }
    if (depth > 16) {
        return 0;
    }
    if (PyDict_CheckExact(v) || Py_IS_TYPE(v, st->Partition_Type)) {
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (!value_donatable(st, item, 1, depth + 1)) {
                return 0;
            }
        }
        return 1;
    }
    if (PyList_CheckExact(v) || PyTuple_Check(v)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
        PyObject **items = PySequence_Fast_ITEMS(v);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!value_donatable(st, items[i], 1, depth + 1)) {
                return 0;
            }
        }
        return 1;
    }
    if (Value_Check(st, v)) { /* its flatten cache may hold the value too */
        ValueObject *val = (ValueObject *)v;
        return value_donatable(st, val->value, val->base.flat != NULL ? 2 : 1,
                               depth + 1);
    }
    return 0;
}

/* Inside another refx transform's capturing trace, a Ref that transform
 * closes over stands for its stand-in there (ref.c, refx/_lift.py): this
 * call must read and write the stand-in, as the rest of the trace does.
 * Returns the Ref to use (borrowed: c->hold owns it), or NULL. */
static RefObject *
stand_in(call_ctx *c, RefObject *r)
{
    if (refx_capture_depth == 0) {
        return r;
    }
    PyObject *sub = refx_ref_captured(r, Py_False);
    if (sub == NULL) {
        return NULL;
    }
    if (sub == Py_None) {
        Py_DECREF(sub);
        return r;
    }
    if (c->hold == NULL && (c->hold = PyList_New(0)) == NULL) {
        Py_DECREF(sub);
        return NULL;
    }
    int err = PyList_Append(c->hold, sub);
    Py_DECREF(sub);
    return err < 0 ? NULL : (RefObject *)sub;
}

/* jit_partial's bound Refs, each replaced by its stand-in (see stand_in):
 * called inside another refx transform that closes over them, the call
 * reads and writes what the rest of that trace does (reading the Refs
 * themselves gave that trace their first values as constants). */
static int
substitute_bound(call_ctx *c)
{
    PyObject *bound = c->jf->bound_refs;
    if (bound == NULL) {
        return 0;
    }
    Py_ssize_t nb = PyTuple_GET_SIZE(bound);
    for (Py_ssize_t k = 0; k < nb; k++) {
        PyObject *r = PyTuple_GET_ITEM(bound, k);
        RefObject *sub = stand_in(c, (RefObject *)r);
        if (sub == NULL) {
            return -1;
        }
        if ((PyObject *)sub == r) {
            continue;
        }
        if (c->bound == NULL) { /* a new tuple to edit (a whole slice of
                                   a tuple is the tuple itself) */
            c->bound = PyTuple_New(nb);
            if (c->bound == NULL) {
                return -1;
            }
            for (Py_ssize_t j = 0; j < nb; j++) {
                PyTuple_SET_ITEM(c->bound, j,
                                 Py_NewRef(PyTuple_GET_ITEM(bound, j)));
            }
        }
        Py_SETREF(PyTuple_GET_ITEM(c->bound, k), Py_NewRef((PyObject *)sub));
    }
    return 0;
}

/* Read every Ref's value again, all at one moment: no Python code runs in
 * the loop.  The snapshot read the arguments' Refs before the key compare
 * and before the closed-over Refs' stand-ins were looked up, and both may
 * run Python code (a static argument's __eq__, a trace, the capture hook,
 * another thread then): a write landing in between was seen for the
 * closed-over Refs but not for the arguments.  The values replaced are
 * released after the loop. */
static int
reread_values(call_ctx *c)
{
    PyObject *small[16], **olds = small;
    Py_ssize_t nold = 0;
    if (c->nrefs > (Py_ssize_t)(sizeof(small) / sizeof(small[0]))) {
        olds = PyMem_Malloc((size_t)c->nrefs * sizeof(PyObject *));
        if (olds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        PyObject *v = c->refs[k]->held;
        if (v != c->vals[k]) {
            olds[nold++] = c->vals[k];
            c->vals[k] = Py_NewRef(v);
        }
    }
    for (Py_ssize_t i = 0; i < nold; i++) {
        Py_XDECREF(olds[i]);
    }
    if (olds != small) {
        PyMem_Free(olds);
    }
    return 0;
}

/* The closed-over Refs the entry reads that are not among the arguments
 * (position -1): numbered after them; reread_values, next, reads their
 * values with the arguments'. */
static int
append_closure(call_ctx *c)
{
    for (Py_ssize_t k = c->nargrefs; k < c->nrefs; k++) {
        Py_CLEAR(c->vals[k]);
    }
    c->nrefs = c->nargrefs;
    PyObject *closure = PyTuple_GET_ITEM(c->entry, 2);
    PyObject *pos = PyTuple_GET_ITEM(c->entry, 3);
    if (closure == Py_None) {
        return 0;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(closure);
    if (c->nargrefs + n > c->cap) {
        Py_ssize_t cap = c->nargrefs + n;
        RefObject **refs =
            PyMem_Realloc(c->refs, (size_t)cap * sizeof(RefObject *));
        if (refs == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->refs = refs;
        PyObject **vals =
            PyMem_Realloc(c->vals, (size_t)cap * sizeof(PyObject *));
        if (vals == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->vals = vals;
        for (Py_ssize_t k = c->cap; k < cap; k++) {
            c->vals[k] = NULL;
        }
        c->cap = cap;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(pos, j)) >= 0) {
            continue; /* an argument's Ref, numbered already */
        }
        RefObject *r = stand_in(c, (RefObject *)PyTuple_GET_ITEM(closure, j));
        if (r == NULL) {
            return -1;
        }
        c->refs[c->nrefs] = r;    /* the entry (or c->hold) keeps it alive */
        c->vals[c->nrefs] = NULL; /* read by reread_values */
        c->nrefs++;
    }
    return 0;
}

/* Where closed-over Ref `r` is among this call's Refs, or -1 */
static Py_ssize_t
closure_position(call_ctx *c, RefObject *r)
{
    if (c->st->epoch == c->epoch) { /* the snapshot's marks still stand */
        return r->mark_epoch == c->epoch && r->mark_index < c->nargrefs
                   ? (Py_ssize_t)r->mark_index
                   : -1;
    }
    for (Py_ssize_t k = 0; k < c->nargrefs; k++) {
        if (c->refs[k] == r) {
            return k;
        }
    }
    return -1;
}

/* Does the entry's closure still describe this call?  Each closed-over Ref
 * must be where it was (passed as the same argument Ref, or not passed) and
 * of the same spec (class, metadata, attributes): otherwise the trace's
 * sharing or kinds are wrong for this call.  1 yes, 0 no, -1 error. */
static int
closure_fits(call_ctx *c)
{
    PyObject *closure = PyTuple_GET_ITEM(c->entry, 2);
    if (closure == Py_None) {
        return 1;
    }
    PyObject *pos = PyTuple_GET_ITEM(c->entry, 3);
    PyObject *specs = PyTuple_GET_ITEM(c->entry, 4);
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(closure); j++) {
        RefObject *r = (RefObject *)PyTuple_GET_ITEM(closure, j);
        RefObject *at = stand_in(c, r);
        if (at == NULL) {
            return -1;
        }
        if (closure_position(c, at) !=
            PyLong_AsSsize_t(PyTuple_GET_ITEM(pos, j))) {
            return 0;
        }
        PyObject *want = PyTuple_GET_ITEM(specs, j);
        if (Py_TYPE(r) == c->st->Ref_Type && r->metadata == NULL &&
            want == (PyObject *)c->st->Ref_Type) {
            continue;
        }
        PyObject *spec = ref_spec(c->st, r);
        if (spec == NULL) {
            return -1;
        }
        int eq =
            spec == want ? 1 : PyObject_RichCompareBool(spec, want, Py_EQ);
        Py_DECREF(spec);
        if (eq <= 0) {
            return eq;
        }
    }
    return 1;
}

/* Build this call's entry again, for `closure` (a tuple of closed-over
 * Refs): the builder traces with them as hidden inputs.  Replaces the
 * cached entry of this call's key (jf->last holds it). */
static int
refresh_entry(call_ctx *c, PyObject *closure)
{
    JitObject *jf = c->jf;
    PyObject *desc = make_desc(c);
    if (desc == NULL) {
        return -1;
    }
    PyObject *bargs[3] = {(PyObject *)jf, desc, closure};
    PyObject *entry = PyObject_Vectorcall(c->st->jit_builder, bargs, 3, NULL);
    Py_DECREF(desc);
    if (entry == NULL) {
        return -1;
    }
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 6) {
        Py_DECREF(entry);
        REFX_BUG("the jit builder did not return a 6-tuple entry");
        return -1;
    }
    PyObject *key = Py_NewRef(PyTuple_GET_ITEM(jf->last, 0));
    PyObject *last = PyTuple_Pack(2, key, entry);
    int r = last == NULL ? -1 : PyDict_SetItem(jf->cache, key, entry);
    Py_DECREF(key);
    if (r < 0) {
        Py_XDECREF(last);
        Py_DECREF(entry);
        return -1;
    }
    Py_XSETREF(jf->last, last);
    Py_XSETREF(c->entry, entry);
    return 0;
}

/* Build the arguments of the jitted call (candidates given by the entry). */
static int
build_call(call_ctx *c, PyObject *cand)
{
    refx_state *st = c->st;
    JitObject *jf = c->jf;
    for (size_t i = 0; i < c->ncall; i++) { /* a retry's: built again */
        Py_CLEAR(c->call_args[i]);
    }
    c->ncall = 0;
    if (append_closure(c) < 0 || reread_values(c) < 0) {
        return -1;
    }
    Py_ssize_t nbo =
        jf->bound_others != NULL ? PyTuple_GET_SIZE(jf->bound_others) : 0;
    PyObject *others = PyList_New(nbo + c->nothers);
    if (others == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < nbo; i++) {
        PyList_SET_ITEM(others, i,
                        Py_NewRef(PyTuple_GET_ITEM(jf->bound_others, i)));
    }
    for (Py_ssize_t i = 0; i < c->nothers; i++) {
        PyList_SET_ITEM(others, nbo + i, Py_NewRef(c->others[i]));
    }
    if (cand == Py_None) {
        PyObject *vals = PyList_New(c->nrefs);
        if (vals == NULL) {
            Py_DECREF(others);
            return -1;
        }
        /* NULL items until filled, and refx_flat_in may run Python code */
        PyObject_GC_UnTrack(vals);
        for (Py_ssize_t k = 0; k < c->nrefs; k++) {
            /* a pytree value as its leaves (flatvalue.c); a retry (closed-
             * over Refs found) builds the list again */
            PyObject *v = c->lowering
                              ? refx_flat_value(st, c->vals[k])
                              : refx_flat_in(st, &jf->vmemo, k, c->vals[k]);
            if (v == NULL) {
                Py_DECREF(vals);
                Py_DECREF(others);
                return -1;
            }
            PyList_SET_ITEM(vals, k, v);
        }
        PyObject_GC_Track(vals);
        c->call_args[0] = vals;
        c->call_args[1] = others;
        c->ncall = 2;
        return 0;
    }
    /* donation: a candidate is donated if its value is a jax Array that
     * appears once among all inputs; so a value left pending (a Flat,
     * whose leaves are references more) is made first, into its Ref */
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        if (Py_TYPE(c->vals[k]) != st->Flat_Type) {
            continue;
        }
        PyObject *v = refx_ref_made(st, c->refs[k], c->vals[k]);
        if (v == NULL) {
            Py_DECREF(others);
            return -1;
        }
        Py_SETREF(c->vals[k], v);
    }
    Py_ssize_t ncand = PyTuple_GET_SIZE(cand);
    PyObject *mask = NULL, *donated = NULL, *kept = NULL, *trace = NULL;
    char *isd = PyMem_Calloc((size_t)(c->nrefs > 0 ? c->nrefs : 1), 1);
    refx_ptrmap seen;
    refx_ptrmap_init(&seen);
    if (isd == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    /* count every input object: Ref values and other leaves */
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        int found;
        refx_ptrmap_entry *e = refx_ptrmap_get(&seen, c->vals[k], &found);
        if (e == NULL) {
            goto error;
        }
        e->value = found ? e->value + 1 : 1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(others); i++) {
        int found;
        refx_ptrmap_entry *e =
            refx_ptrmap_get(&seen, PyList_GET_ITEM(others, i), &found);
        if (e == NULL) {
            goto error;
        }
        e->value = found ? e->value + 1 : 1;
    }
    mask = PyBytes_FromStringAndSize(NULL, ncand);
    if (mask == NULL) {
        goto error;
    }
    char *m = PyBytes_AS_STRING(mask);
    for (Py_ssize_t j = 0; j < ncand; j++) {
        Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(cand, j));
        if (k < 0 || k >= c->nrefs) {
            if (!PyErr_Occurred()) {
                REFX_BUG("donation candidate out of range");
            }
            goto error;
        }
        int found;
        refx_ptrmap_entry *e = refx_ptrmap_get(&seen, c->vals[k], &found);
        if (e == NULL) {
            goto error;
        }
        /* the Value deref kept in the Ref holds its value too: dropped, so
         * only another holder (a deref'ed tree kept alive) keeps it */
        Py_CLEAR(c->refs[k]->last);
        m[j] = (char)(e->value == 1 && !isd[k] &&
                      value_donatable(st, c->vals[k], 2, 0));
        if (m[j]) {
            isd[k] = 1;
        }
    }
    /* a donated Ref is written whatever fun does: the whole write check
     * (trace level, refx.mutable) now, while its buffer still exists */
    trace = refx_current_trace(st);
    if (trace == NULL) {
        goto error;
    }
    int any = 0;
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        refx_refusal why = REFX_WRITE_OK;
        any |= isd[k];
        if (isd[k] &&
            refx_check_write(st, c->refs[k], c->vals[k], trace, &why) < 0) {
            fail_refused(c, k, "would donate (and so write)", why);
            goto error;
        }
    }
    /* and every other Ref the trace writes: a refusal after the call
     * would come too late for the donated buffers */
    PyObject *written = PyTuple_GET_ITEM(c->entry, 5);
    for (Py_ssize_t j = 0;
         any && written != Py_None && j < PyTuple_GET_SIZE(written); j++) {
        Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(written, j));
        refx_refusal why = REFX_WRITE_OK;
        if (k >= 0 && k < c->nrefs && !isd[k] &&
            refx_check_write(st, c->refs[k], c->vals[k], trace, &why) < 0) {
            fail_refused(c, k, "writes", why);
            goto error;
        }
    }
    donated = PyList_New(0);
    kept = PyList_New(0);
    if (donated == NULL || kept == NULL) {
        goto error;
    }
    for (Py_ssize_t j = 0; j < ncand; j++) {
        Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(cand, j));
        if (m[j] && PyList_Append(donated, c->vals[k]) < 0) {
            goto error;
        }
    }
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        if (!isd[k] && PyList_Append(kept, c->vals[k]) < 0) {
            goto error;
        }
    }
    c->call_args[0] = mask;
    c->call_args[1] = donated;
    c->call_args[2] = kept;
    c->call_args[3] = others;
    c->ncall = 4;
    refx_ptrmap_fini(&seen);
    PyMem_Free(isd);
    Py_DECREF(trace);
    return 0;
error:
    refx_ptrmap_fini(&seen);
    PyMem_Free(isd);
    Py_XDECREF(trace);
    Py_XDECREF(mask);
    Py_XDECREF(donated);
    Py_XDECREF(kept);
    Py_DECREF(others);
    return -1;
}

/* Does this call's key equal `key` (one that make_key built)?  The same
 * test as the cache dict's ==, item by item, without building the call's
 * key or hashing it: a loop calling with one structure pays only the
 * treedef comparison.  1 yes, 0 no, -1 error. */
static int
key_equals_call(call_ctx *c, PyObject *key)
{
    int r =
        PyObject_RichCompareBool(PyTuple_GET_ITEM(key, 0), c->treedef, Py_EQ);
    if (r <= 0) {
        return r;
    }
    if (PyTuple_GET_ITEM(key, 1) !=
        (c->dyn_kwargs != NULL ? Py_True : Py_False)) {
        return 0;
    }
    PyObject *ks = PyTuple_GET_ITEM(key, 2);
    if ((ks == Py_None) != (c->statics == NULL)) {
        return 0;
    }
    if (c->statics != NULL) {
        r = PyObject_RichCompareBool(ks, c->statics, Py_EQ);
        if (r <= 0) {
            return r;
        }
    }
    PyObject *pat = PyTuple_GET_ITEM(key, 3);
    if (c->nothers == c->nleaves) { /* no Ref leaf: see make_key */
        if (pat != Py_None) {
            return 0;
        }
    }
    else if (pat == Py_None ||
             PyBytes_GET_SIZE(pat) !=
                 c->nleaves * (Py_ssize_t)sizeof(int32_t) ||
             memcmp(PyBytes_AS_STRING(pat), c->pattern,
                    (size_t)PyBytes_GET_SIZE(pat)) != 0) {
        return 0;
    }
    PyObject *colls = PyTuple_GET_ITEM(key, 4);
    PyObject *types = PyTuple_GET_ITEM(key, 5);
    Py_ssize_t nrefs = c->nrefs;
    if (colls == Py_None) {
        return nrefs == 0;
    }
    if (PyTuple_GET_SIZE(colls) != nrefs) {
        return 0;
    }
    for (Py_ssize_t k = 0; k < nrefs; k++) {
        RefObject *ref = c->refs[k];
        if (types == Py_None) {
            /* an all-plain key: a subclass or metadata is another key */
            if (Py_TYPE(ref) != c->st->Ref_Type || ref->metadata != NULL) {
                return 0;
            }
        }
        else {
            /* compared as the dict would: the Ref's spec (see make_key) */
            PyObject *spec = ref_spec(c->st, ref);
            if (spec == NULL) {
                return -1;
            }
            PyObject *want = PyTuple_GET_ITEM(types, k);
            r = spec == want ? 1 : PyObject_RichCompareBool(spec, want, Py_EQ);
            Py_DECREF(spec);
            if (r <= 0) {
                return r;
            }
        }
        PyObject *a = PyTuple_GET_ITEM(colls, k), *b = ref->collection;
        if (a != b) {
            /* owned across __eq__, which may re-init the Ref */
            Py_INCREF(b);
            r = PyObject_RichCompareBool(a, b, Py_EQ);
            Py_DECREF(b);
            if (r <= 0) {
                return r;
            }
        }
    }
    return 1;
}

/* The key could not be hashed (a TypeError is set): if a Ref's spec is
 * what fails (an attribute or metadata value such as a list), say which
 * Ref; its spec is part of the key.  Otherwise leave the error as it is. */
static void
explain_unhashable(call_ctx *c)
{
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    for (Py_ssize_t k = 0; k < c->nrefs; k++) {
        PyObject *spec = ref_spec(c->st, c->refs[k]);
        if (spec == NULL) {
            goto drop; /* a new error, which says why */
        }
        Py_hash_t h = PyObject_Hash(spec);
        Py_DECREF(spec);
        if (h != -1) {
            continue;
        }
        PyObject *ht, *hv, *htb;
        PyErr_Fetch(&ht, &hv, &htb);
        PyErr_NormalizeException(&ht, &hv, &htb);
        /* which entry: the spec is (class, metadata, attributes) */
        PyObject *name = NULL;
        PyObject *kind = ref_spec(c->st, c->refs[k]);
        for (int part = 1; kind != NULL && PyTuple_Check(kind) &&
                           PyTuple_GET_SIZE(kind) == 3 && part < 3 && !name;
             part++) {
            PyObject *entries = PyTuple_GET_ITEM(kind, part);
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entries); i++) {
                PyObject *e = PyTuple_GET_ITEM(entries, i);
                if (PyObject_Hash(PyTuple_GET_ITEM(e, 1)) == -1) {
                    PyErr_Clear();
                    name = PyUnicode_FromFormat(
                        "%s %R", part == 1 ? "metadata" : "attribute",
                        PyTuple_GET_ITEM(e, 0));
                    break;
                }
            }
        }
        Py_XDECREF(kind);
        PyErr_Clear();
        if (name == NULL) {
            name = PyUnicode_FromString("an attribute or metadata value");
        }
        PyObject *path = name != NULL ? ref_path(c, k) : NULL;
        if (path != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "%s(%U): the %s of %U has %U that cannot be hashed "
                         "(%S); a Ref's attributes and metadata are part of "
                         "the cache key: make them hashable (a tuple, not a "
                         "list)",
                         jit_kind(c->jf), c->jf->name,
                         _PyType_Name(Py_TYPE(c->refs[k])), path, name, hv);
            Py_DECREF(path);
        }
        Py_XDECREF(name);
        Py_XDECREF(ht);
        Py_XDECREF(hv);
        Py_XDECREF(htb);
        goto drop;
    }
    PyErr_Restore(et, ev, etb);
    return;
drop:
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(etb);
}

/* An eager transform's function (jf->eager set) does not take a call with
 * a leaf JAX cannot trace (a str, a function): the transform runs it
 * uncached, closing over such leaves.  The same test as _lift.traceable,
 * with the common types decided here.  1 all traceable, 0 not, -1 error. */
static int
others_traceable(call_ctx *c)
{
    refx_state *st = c->st;
    for (Py_ssize_t i = 0; i < c->nothers; i++) {
        PyObject *x = c->others[i];
        if ((PyObject *)Py_TYPE(x) == st->jit_array_type ||
            PyFloat_CheckExact(x) || PyLong_CheckExact(x) || PyBool_Check(x)) {
            continue;
        }
        if (st->jit_traceable == NULL) {
            return 0;
        }
        PyObject *r = PyObject_CallOneArg(st->jit_traceable, x);
        int ok = r != NULL ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
        if (ok <= 0) {
            return ok;
        }
    }
    return 1;
}

/* Outside every trace and not under jax.disable_jit (where jit would call
 * the transform back): may an eager transform's function run?  1 yes, 0
 * no, -1 error. */
static int
eager_now(call_ctx *c)
{
    refx_state *st = c->st;
    if (st->jit_eval_trace == NULL || st->jit_disable_jit == NULL) {
        return 0;
    }
    PyObject *wr = refx_current_trace(st);
    if (wr == NULL) {
        return -1;
    }
    if (!PyWeakref_Check(wr) ||
        !refx_weakref_is_a(wr, (PyTypeObject *)st->jit_eval_trace)) {
        Py_DECREF(wr);
        return 0;
    }
    c->trace = wr; /* the write-back's trace (jit_finish) */
    PyObject *v = PyObject_GetAttr(st->jit_disable_jit, st->str_value);
    if (v == NULL) {
        return -1;
    }
    int disabled = PyObject_IsTrue(v);
    Py_DECREF(v);
    return disabled < 0 ? -1 : !disabled;
}

/* jit_partial binds its trees once (bind_trees).  An nn.Module attribute
 * set since then (st->module_epoch moved: model.eval(), set_attributes, a
 * layer or Ref assigned) may have changed them, and a call made with the
 * binding of before would run the trace of the old structure (dropout in
 * eval mode) and pass the old Refs and leaves.  So the bound trees are
 * flattened again and must give the binding's treedef, its very Refs at
 * the same leaves and its very other leaves; if they do, the epoch is
 * recorded, else the call is refused before anything is read or written
 * (_jit._bound_changed raises, saying what changed and how to bind
 * again).  The epoch is read before the flatten, which runs Python code:
 * a change made during it is checked at the next call.  0 current, -1
 * error. */
static int
check_binding(refx_state *st, JitObject *jf)
{
    uint64_t epoch = st->module_epoch;
    PyObject *treedef = NULL;
    PyObject *leaves = refx_flatten(st, jf->bound, NULL, &treedef);
    if (leaves == NULL) {
        return -1;
    }
    PyObject *pattern = PyTuple_GET_ITEM(jf->bound_desc, 1);
    int same = PyObject_RichCompareBool(
        treedef, PyTuple_GET_ITEM(jf->bound_desc, 0), Py_EQ);
    Py_ssize_t n = PyList_GET_SIZE(leaves), j = 0;
    Py_ssize_t nothers = PyTuple_GET_SIZE(jf->bound_others);
    if (same > 0 && n != PyTuple_GET_SIZE(pattern)) {
        same = 0;
    }
    for (Py_ssize_t i = 0; same > 0 && i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        Py_ssize_t p = PyLong_AsSsize_t(PyTuple_GET_ITEM(pattern, i));
        same = p >= 0 ? leaf == PyTuple_GET_ITEM(jf->bound_refs, p)
                      : j < nothers &&
                            leaf == PyTuple_GET_ITEM(jf->bound_others, j++);
    }
    if (same > 0) {
        jf->bound_epoch = epoch;
    }
    else if (same == 0) {
        if (st->jit_bound_changed != NULL) {
            PyObject *r = PyObject_CallFunctionObjArgs(
                st->jit_bound_changed, (PyObject *)jf, treedef, leaves, NULL);
            Py_XDECREF(r);
        }
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError,
                         "refx.jit_partial(%U): the bound trees changed "
                         "since binding; bind them again",
                         jf->name);
        }
    }
    Py_DECREF(leaves);
    Py_DECREF(treedef);
    return same > 0 ? 0 : -1;
}

/* split, flatten, snapshot, key, lookup (or build), call arguments; 1
 * (nothing done) for a call an eager transform's function refuses */
static int
jit_prepare(call_ctx *c, PyObject *const *args, size_t nargsf,
            PyObject *kwnames)
{
    refx_state *st = c->st;
    JitObject *jf = c->jf;
    PyObject *key = NULL;
    if (refx_require_jax(st, jit_kind(jf)) < 0) {
        return -1;
    }
    if (st->jit_builder == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "refx.jit: refx._jit is not loaded");
        return -1;
    }
    if (jf->eager != NULL) {
        int ok = eager_now(c);
        if (ok <= 0) {
            return ok < 0 ? -1 : 1;
        }
    }
    if (jf->bound != NULL && jf->bound_epoch != st->module_epoch &&
        check_binding(st, jf) < 0) {
        return -1;
    }
    if (split_args(c, args, PyVectorcall_NARGS(nargsf), kwnames) < 0) {
        return -1;
    }
    if (c->dyn_kwargs != NULL) {
        c->tree = PyTuple_Pack(2, c->dyn_args, c->dyn_kwargs);
        if (c->tree == NULL) {
            return -1;
        }
    }
    else {
        c->tree = Py_NewRef(c->dyn_args);
    }
    c->leaves = refx_memo_flatten(st, &jf->memo, c->tree, &c->treedef, NULL);
    if (c->leaves == NULL ||
        (refx_capture_depth > 0 &&
         (refx_substitute_captured(st, &c->leaves, Py_False) < 0 ||
          substitute_bound(c) < 0)) ||
        snapshot(c) < 0) {
        return -1;
    }
    if (jf->eager != NULL) {
        int ok = others_traceable(c);
        if (ok <= 0) {
            return ok < 0 ? -1 : 1;
        }
        jf->used = ++st->eager_clock;
    }
    PyObject *last = Py_XNewRef(jf->last); /* owned across __eq__ calls */
    if (last != NULL) {
        int m = key_equals_call(c, PyTuple_GET_ITEM(last, 0));
        if (m > 0) {
            c->entry = Py_NewRef(PyTuple_GET_ITEM(last, 1));
        }
        Py_DECREF(last);
        if (m < 0) {
            return -1;
        }
    }
    if (c->entry != NULL) {
        goto found;
    }
    key = make_key(c);
    if (key == NULL) {
        return -1;
    }
    c->entry = Py_XNewRef(PyDict_GetItemWithError(jf->cache, key));
    if (c->entry == NULL) {
        if (PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                explain_unhashable(c);
            }
            goto error;
        }
        PyObject *desc = make_desc(c);
        if (desc == NULL) {
            goto error;
        }
        PyObject *bargs[2] = {(PyObject *)jf, desc};
        c->entry = PyObject_Vectorcall(st->jit_builder, bargs, 2, NULL);
        Py_DECREF(desc);
        if (c->entry == NULL) {
            goto error;
        }
        if (!PyTuple_CheckExact(c->entry) || PyTuple_GET_SIZE(c->entry) != 6) {
            REFX_BUG("the jit builder did not return a 6-tuple entry");
            goto error;
        }
        if (PyDict_SetItem(jf->cache, key, c->entry) < 0) {
            goto error;
        }
    }
    last = PyTuple_Pack(2, key, c->entry);
    if (last == NULL) {
        goto error;
    }
    Py_XSETREF(jf->last, last);
    Py_CLEAR(key);
found:
    {
        int fits = closure_fits(c);
        if (fits < 0) {
            return -1;
        }
        if (!fits) {
            PyObject *closure = Py_NewRef(PyTuple_GET_ITEM(c->entry, 2));
            int r = refresh_entry(c, closure);
            Py_DECREF(closure);
            if (r < 0) {
                return -1;
            }
        }
        return build_call(c, PyTuple_GET_ITEM(c->entry, 1));
    }
error:
    Py_XDECREF(key);
    return -1;
}

/* The call's output tree from the plan's spec and out_treedef and the
 * jitted call's `payload` (see "result" in the essay): Refs of the call
 * and closed-over Refs as they are, new Refs made from their specs in
 * `trace`.  Writes nothing.  New reference. */
static PyObject *
jit_outputs(call_ctx *c, PyObject *plan, PyObject *payload, PyObject *trace)
{
    refx_state *st = c->st;
    PyObject *spec = PyTuple_GET_ITEM(plan, 1);
    if (spec == Py_None) {
        return Py_NewRef(payload);
    }
    PyObject *out_td = PyTuple_GET_ITEM(plan, 2);
    if (!PyTuple_CheckExact(spec) || !PyList_CheckExact(payload)) {
        REFX_BUG("malformed jit output plan");
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(spec), next = 0;
    PyObject *leaves = PyList_New(n);
    PyObject **news =
        PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(PyObject *));
    if (leaves == NULL || news == NULL) {
        if (news == NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    /* making a new Ref may run Python code (a declared sharding's place):
     * the list, NULL items until filled, stays out of gc.get_objects() */
    PyObject_GC_UnTrack(leaves);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyTuple_GET_ITEM(spec, i), *leaf;
        if (s == Py_None) {
            if (next >= PyList_GET_SIZE(payload)) {
                REFX_BUG("jit output plan longer than the outputs");
                goto done;
            }
            leaf = Py_NewRef(PyList_GET_ITEM(payload, next++));
        }
        else if (PyLong_CheckExact(s)) {
            Py_ssize_t k = PyLong_AsSsize_t(s);
            if (k < 0 || k >= c->nrefs) {
                REFX_BUG("jit output names no argument Ref");
                goto done;
            }
            leaf = Py_NewRef((PyObject *)c->refs[k]);
        }
        else if (Ref_Check(st, s)) {
            leaf = Py_NewRef(s);
        }
        else {
            Py_ssize_t j;
            if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 3 ||
                (j = PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 0))) < 0 || j >= n ||
                check_spec(st, PyTuple_GET_ITEM(s, 1)) < 0) {
                if (!PyErr_Occurred()) {
                    REFX_BUG("malformed new-Ref item in a jit plan");
                }
                goto done;
            }
            if (news[j] == NULL) {
                if (next >= PyList_GET_SIZE(payload)) {
                    REFX_BUG("jit output plan longer than the outputs");
                    goto done;
                }
                news[j] = ref_from_spec(st, PyTuple_GET_ITEM(s, 1),
                                        PyList_GET_ITEM(payload, next++),
                                        PyTuple_GET_ITEM(s, 2), trace);
                if (news[j] == NULL) {
                    goto done;
                }
            }
            leaf = Py_NewRef(news[j]);
        }
        PyList_SET_ITEM(leaves, i, leaf);
    }
    PyObject_GC_Track(leaves);
    out = refx_unflatten(st, out_td, leaves);
done:
    if (news != NULL) {
        for (Py_ssize_t j = 0; j < n; j++) {
            Py_XDECREF(news[j]);
        }
        PyMem_Free(news);
    }
    Py_XDECREF(leaves);
    return out;
}

/* Write wvals[w] into the call's Ref number written[w], all or nothing
 * (refx_write_all); a refused write is a ValueError naming the Ref's
 * place (fail_refused). */
static int
jit_write_back(call_ctx *c, PyObject *written, PyObject *wvals,
               PyObject *trace)
{
    Py_ssize_t nw = PyTuple_GET_SIZE(written), failed;
    if (nw == 0) {
        return 0;
    }
    RefObject **targets = PyMem_Malloc((size_t)nw * sizeof(RefObject *));
    if (targets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t w = 0; w < nw; w++) {
        Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(written, w));
        if (k < 0 || k >= c->nrefs) {
            if (!PyErr_Occurred()) {
                REFX_BUG("jit plan writes no argument Ref");
            }
            PyMem_Free(targets);
            return -1;
        }
        targets[w] = c->refs[k];
    }
    refx_refusal why;
    int r = refx_write_all(c->st, targets, PySequence_Fast_ITEMS(wvals), nw,
                           trace, &failed, &why);
    PyMem_Free(targets);
    if (r < 0 && failed >= 0) {
        fail_refused(c, PyLong_AsSsize_t(PyTuple_GET_ITEM(written, failed)),
                     "wrote", why);
    }
    return r;
}

/* Parse the jitted call's result (Static(plan), written values, payload),
 * build the outputs, then write back: the outputs first, since building
 * them may fail and must not after anything is written.  New reference. */
static PyObject *
jit_finish(call_ctx *c, PyObject *res)
{
    refx_state *st = c->st;
    if (!PyTuple_CheckExact(res) || PyTuple_GET_SIZE(res) != 3 ||
        Py_TYPE(PyTuple_GET_ITEM(res, 0)) != st->Static_Type ||
        !PyList_CheckExact(PyTuple_GET_ITEM(res, 1))) {
        REFX_BUG("the jitted function did not return (Static, list, out)");
        return NULL;
    }
    PyObject *plan = ((StaticObject *)PyTuple_GET_ITEM(res, 0))->value;
    PyObject *wvals = PyTuple_GET_ITEM(res, 1);
    if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 3 ||
        !PyTuple_CheckExact(PyTuple_GET_ITEM(plan, 0)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 0)) !=
            PyList_GET_SIZE(wvals)) {
        REFX_BUG("malformed jit plan");
        return NULL;
    }
    /* written pytree values came back as Flats (flatvalue.c): rebuilt
     * first, since rebuilding may fail (a namedtuple's class raising) */
    PyObject *values = refx_flat_restore_all(st, wvals, c->jf->vmemo,
                                             PyTuple_GET_ITEM(plan, 0));
    if (values == NULL) {
        return NULL;
    }
    PyObject *trace =
        c->trace != NULL ? Py_NewRef(c->trace) : refx_current_trace(st);
    if (trace == NULL) {
        Py_DECREF(values);
        return NULL;
    }
    PyObject *out = jit_outputs(c, plan, PyTuple_GET_ITEM(res, 2), trace);
    if (out != NULL &&
        jit_write_back(c, PyTuple_GET_ITEM(plan, 0), values, trace) < 0) {
        Py_CLEAR(out);
    }
    Py_DECREF(values);
    Py_DECREF(trace);
    return out;
}

/* Call the entry's jitted function (or its method `method`).  A trace that
 * finds Refs `fun` closes over stops with _lift.Rediscover: the entry is
 * built again with them as hidden inputs and the call made again. */
static PyObject *
call_entry(call_ctx *c, const char *method)
{
    refx_state *st = c->st;
    for (int tries = 0;; tries++) {
        PyObject *fn = PyTuple_GET_ITEM(c->entry, 0), *res;
        if (method != NULL) {
            PyObject *m = PyObject_GetAttrString(fn, method);
            res = m == NULL
                      ? NULL
                      : PyObject_Vectorcall(m, c->call_args, c->ncall, NULL);
            Py_XDECREF(m);
        }
        else {
            res = refx_call_jax(fn, c->call_args, c->ncall);
        }
        if (res != NULL || st->capture_rediscover == NULL || tries >= 64 ||
            !PyErr_ExceptionMatches(st->capture_rediscover)) {
            return res;
        }
        PyObject *et, *ev, *etb;
        PyErr_Fetch(&et, &ev, &etb);
        PyErr_NormalizeException(&et, &ev, &etb);
        PyObject *found =
            ev != NULL ? PyObject_GetAttrString(ev, "refs") : NULL;
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(etb);
        if (found == NULL) {
            return NULL;
        }
        PyObject *old = PyTuple_GET_ITEM(c->entry, 2);
        PyObject *add = PySequence_Tuple(found);
        Py_DECREF(found);
        PyObject *closure = NULL;
        if (add != NULL) {
            closure =
                old == Py_None ? Py_NewRef(add) : PySequence_Concat(old, add);
            Py_DECREF(add);
        }
        if (closure == NULL) {
            return NULL;
        }
        int r = refresh_entry(c, closure);
        Py_DECREF(closure);
        if (r < 0 || build_call(c, PyTuple_GET_ITEM(c->entry, 1)) < 0) {
            return NULL;
        }
    }
}

static PyObject *
jit_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
               PyObject *kwnames)
{
    JitObject *jf = (JitObject *)self;
    call_ctx c;
    memset(&c, 0, sizeof(c));
    c.st = refx_state_from_type(Py_TYPE(self));
    c.jf = jf;
    PyObject *res = NULL, *out = NULL;
    int prep = c.st == NULL ? -1 : jit_prepare(&c, args, nargsf, kwnames);
    if (prep != 0) {
        if (prep > 0) {
            out = Py_NewRef(jf->eager);
        }
        goto done;
    }
    res = call_entry(&c, NULL);
    if (res == NULL) {
        goto done;
    }
    out = jit_finish(&c, res);
done:
    Py_XDECREF(res);
    ctx_fini(&c);
    return out;
}

/* .lower(*args, **kwargs): the jax.jit function of the entry, lowered
 * with the flat arguments this call would pass */
static PyObject *
jit_lower(PyObject *self, PyObject *const *args, size_t nargsf,
          PyObject *kwnames)
{
    call_ctx c;
    memset(&c, 0, sizeof(c));
    c.st = refx_state_from_type(Py_TYPE(self));
    c.jf = (JitObject *)self;
    c.lowering = 1;
    PyObject *res = NULL;
    int prep = c.st == NULL ? -1 : jit_prepare(&c, args, nargsf, kwnames);
    if (prep != 0) {
        if (prep > 0) {
            res = Py_NewRef(c.jf->eager);
        }
        goto done;
    }
    res = call_entry(&c, "lower");
done:
    ctx_fini(&c);
    return res;
}

static PyObject *
jit_cache_size(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    JitObject *self = JIT_CAST(op);
    Py_ssize_t total = 0, pos = 0;
    PyObject *k, *entry;
    PyObject *entries = PyDict_Values(self->cache);
    if (entries == NULL) {
        return NULL;
    }
    for (pos = 0; pos < PyList_GET_SIZE(entries); pos++) {
        entry = PyList_GET_ITEM(entries, pos);
        PyObject *n = PyObject_CallMethod(PyTuple_GET_ITEM(entry, 0),
                                          "_cache_size", NULL);
        if (n == NULL) {
            Py_DECREF(entries);
            return NULL;
        }
        total += PyLong_AsSsize_t(n);
        Py_DECREF(n);
    }
    (void)k;
    Py_DECREF(entries);
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyLong_FromSsize_t(total);
}

static PyObject *
jit_clear_cache(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    JitObject *self = JIT_CAST(op);
    Py_CLEAR(self->last);
    Py_CLEAR(self->memo);
    Py_CLEAR(self->vmemo);
    PyDict_Clear(self->cache);
    Py_RETURN_NONE;
}

static int
check_int_tuple(PyObject *t, const char *what)
{
    if (!PyTuple_Check(t)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of int", what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++) {
        if (!PyLong_Check(PyTuple_GET_ITEM(t, i))) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of int", what);
            return -1;
        }
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(t, i)) == -1 &&
            PyErr_Occurred()) {
            return -1;
        }
    }
    return 0;
}

static int
check_str_tuple(PyObject *t, const char *what)
{
    if (!PyTuple_Check(t)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of str", what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(t, i))) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of str", what);
            return -1;
        }
    }
    return 0;
}

/* Bind the trees of jit_partial: their distinct Refs (numbered in leaf
 * order, as deref would), other leaves and (treedef, pattern). */
static int
bind_trees(refx_state *st, JitObject *jf, PyObject *bound)
{
    PyObject *treedef = NULL, *leaves = NULL, *refs = NULL, *others = NULL;
    PyObject *pattern = NULL;
    refx_ptrmap map;
    refx_ptrmap_init(&map);
    int res = -1;
    leaves = refx_flatten(st, bound, NULL, &treedef);
    if (leaves == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    refs = PyList_New(0);
    others = PyList_New(0);
    pattern = PyTuple_New(n);
    if (refs == NULL || others == NULL || pattern == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i), *p;
        if (Ref_Check(st, leaf)) {
            int found;
            refx_ptrmap_entry *e = refx_ptrmap_get(&map, leaf, &found);
            if (e == NULL) {
                goto done;
            }
            if (!found) {
                e->value = PyList_GET_SIZE(refs);
                if (PyList_Append(refs, leaf) < 0) {
                    goto done;
                }
            }
            p = PyLong_FromSsize_t(e->value);
        }
        else {
            if (PyList_Append(others, leaf) < 0) {
                goto done;
            }
            p = PyLong_FromLong(-1);
        }
        if (p == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(pattern, i, p);
    }
    jf->bound_epoch = st->module_epoch;
    jf->bound = Py_NewRef(bound);
    jf->bound_refs = PyList_AsTuple(refs);
    jf->bound_others = PyList_AsTuple(others);
    jf->bound_desc = PyTuple_Pack(2, treedef, pattern);
    if (jf->bound_refs == NULL || jf->bound_others == NULL ||
        jf->bound_desc == NULL) {
        goto done;
    }
    res = 0;
done:
    refx_ptrmap_fini(&map);
    Py_XDECREF(treedef);
    Py_XDECREF(leaves);
    Py_XDECREF(refs);
    Py_XDECREF(others);
    Py_XDECREF(pattern);
    return res;
}

static PyObject *
jit_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fun",
                             "static_argnums",
                             "static_argnames",
                             "donate_argnums",
                             "donate_argnames",
                             "options",
                             "bound",
                             "kind",
                             "eager",
                             NULL};
    PyObject *fun, *snums = NULL, *snames = NULL, *dnums = NULL,
                   *dnames = NULL;
    PyObject *options = NULL, *bound = Py_None, *kind = Py_None,
             *eager = Py_None;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "O|$OOOOOOOO:JitFunction", kwlist, &fun, &snums,
            &snames, &dnums, &dnames, &options, &bound, &kind, &eager)) {
        return NULL;
    }
    if (kind != Py_None && !PyUnicode_Check(kind)) {
        PyErr_SetString(PyExc_TypeError, "kind must be a str or None");
        return NULL;
    }
    if (snums == NULL || snames == NULL || dnums == NULL || dnames == NULL ||
        options == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "JitFunction: static_argnums, static_argnames, "
                        "donate_argnums, donate_argnames and options are "
                        "required keyword arguments (use refx.jit)");
        return NULL;
    }
    if (!PyCallable_Check(fun)) {
        PyErr_Format(PyExc_TypeError,
                     "refx.jit: fun must be callable, not %.200s",
                     Py_TYPE(fun)->tp_name);
        return NULL;
    }
    if (check_int_tuple(snums, "static_argnums") < 0 ||
        check_str_tuple(snames, "static_argnames") < 0 ||
        check_int_tuple(dnums, "donate_argnums") < 0 ||
        check_str_tuple(dnames, "donate_argnames") < 0) {
        return NULL;
    }
    if (!PyDict_Check(options)) {
        PyErr_SetString(PyExc_TypeError, "options must be a dict");
        return NULL;
    }
    if (bound != Py_None && !PyTuple_Check(bound)) {
        PyErr_SetString(PyExc_TypeError, "bound must be a tuple or None");
        return NULL;
    }
    refx_state *st = refx_state_from_type(tp);
    if (st == NULL || refx_require_jax(st, "refx.jit") < 0) {
        return NULL;
    }
    JitObject *self = (JitObject *)tp->tp_alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = jit_vectorcall;
    self->fun = Py_NewRef(fun);
    self->static_nums = Py_NewRef(snums);
    self->static_names = Py_NewRef(snames);
    self->donate_nums = Py_NewRef(dnums);
    self->donate_names = Py_NewRef(dnames);
    self->options = Py_NewRef(options);
    self->kind = kind != Py_None ? Py_NewRef(kind) : NULL;
    self->eager = eager != Py_None ? Py_NewRef(eager) : NULL;
    self->cache = PyDict_New();
    self->name = PyObject_GetAttrString(fun, "__qualname__");
    if (self->name == NULL || !PyUnicode_Check(self->name)) {
        PyErr_Clear();
        Py_XSETREF(self->name, PyObject_Repr(fun));
    }
    if (self->cache == NULL || self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    if (bound != Py_None && bind_trees(st, self, bound) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
jit_traverse(PyObject *op, visitproc visit, void *arg)
{
    JitObject *self = JIT_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->fun);
    Py_VISIT(self->options);
    Py_VISIT(self->cache);
    Py_VISIT(self->static_nums);
    Py_VISIT(self->static_names);
    Py_VISIT(self->donate_nums);
    Py_VISIT(self->donate_names);
    Py_VISIT(self->bound);
    Py_VISIT(self->bound_refs);
    Py_VISIT(self->bound_others);
    Py_VISIT(self->bound_desc);
    Py_VISIT(self->name);
    Py_VISIT(self->kind);
    Py_VISIT(self->last);
    Py_VISIT(self->memo);
    Py_VISIT(self->vmemo);
    Py_VISIT(self->eager);
    Py_VISIT(self->dict);
    return 0;
}

static int
jit_clear(PyObject *op)
{
    JitObject *self = JIT_CAST(op);
    Py_CLEAR(self->fun);
    Py_CLEAR(self->options);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->static_nums);
    Py_CLEAR(self->static_names);
    Py_CLEAR(self->donate_nums);
    Py_CLEAR(self->donate_names);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->bound_refs);
    Py_CLEAR(self->bound_others);
    Py_CLEAR(self->bound_desc);
    Py_CLEAR(self->name);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->last);
    Py_CLEAR(self->memo);
    Py_CLEAR(self->vmemo);
    Py_CLEAR(self->eager);
    Py_CLEAR(self->dict);
    return 0;
}

static void
jit_dealloc(PyObject *op)
{
    JitObject *self = JIT_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    jit_clear(op);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* as a method: bind the instance (jax.jit does the same) */
static PyObject *
jit_descr_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
jit_repr(PyObject *op)
{
    JitObject *self = JIT_CAST(op);
    return PyUnicode_FromFormat("<%s of %R>", jit_kind(self), self->fun);
}

static PyObject *
jit_get_field(PyObject *op, void *closure)
{
    JitObject *self = JIT_CAST(op);
    PyObject *v = *(PyObject **)((char *)self + (Py_ssize_t)closure);
    return Py_NewRef(v != NULL ? v : Py_None);
}

/* a copy: the list itself is the per-call path's to change */
static PyObject *
jit_get_value_memos(PyObject *op, void *Py_UNUSED(closure))
{
    JitObject *self = JIT_CAST(op);
    return self->vmemo != NULL ? PyList_AsTuple(self->vmemo) : PyTuple_New(0);
}

#define JIT_FIELD(name, field, doc)                                           \
    {name, jit_get_field, NULL, doc, (void *)offsetof(JitObject, field)}

static PyGetSetDef jit_getset[] = {
    JIT_FIELD("_fun", fun, "The wrapped function."),
    JIT_FIELD("_options", options, "jax.jit options."),
    JIT_FIELD("_static_argnums", static_nums, NULL),
    JIT_FIELD("_static_argnames", static_names, NULL),
    JIT_FIELD("_donate_argnums", donate_nums, NULL),
    JIT_FIELD("_donate_argnames", donate_names, NULL),
    JIT_FIELD("_bound", bound, "jit_partial: the bound trees (or None)."),
    JIT_FIELD("_bound_desc", bound_desc, NULL),
    JIT_FIELD("_bound_refs", bound_refs, NULL),
    JIT_FIELD("_bound_others", bound_others, NULL),
    JIT_FIELD(
        "_cache", cache,
        "key -> (jitted, donation candidates, closure, positions, specs)."),
    JIT_FIELD("_kind", kind, "the transform messages name (None: refx.jit)."),
    {"_value_memos", jit_get_value_memos, NULL,
     "Per Ref number: None, a FlatSpec, or False (see flatvalue.c).", NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyMemberDef jit_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(JitObject, vectorcall),
     READONLY, NULL},
    {"__dictoffset__", T_PYSSIZET, offsetof(JitObject, dict), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(JitObject, weakreflist),
     READONLY, NULL},
    {"_used", T_ULONGLONG, offsetof(JitObject, used), READONLY,
     "An eager transform's function: when it last ran (a call count)."},
    {NULL},
};

static PyMethodDef jit_methods[] = {
    {"lower", (PyCFunction)(void (*)(void))jit_lower,
     METH_FASTCALL | METH_KEYWORDS,
     "lower($self, /, *args, **kwargs)\n--\n\n"
     "Lower the jax.jit function this call would run, with the flat\n"
     "arguments it would get (see jax.jit(...).lower)."},
    {"_cache_size", jit_cache_size, METH_NOARGS,
     "_cache_size($self, /)\n--\n\n"
     "Number of compiled traces over all cache entries."},
    {"_clear_cache", jit_clear_cache, METH_NOARGS,
     "_clear_cache($self, /)\n--\n\nForget every cache entry."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

PyDoc_STRVAR(
    jit_doc,
    "JitFunction(fun, *, static_argnums, static_argnames, donate_argnums,\n"
    "            donate_argnames, options, bound=None, kind=None, "
    "eager=None)\n"
    "--\n\n"
    "A function compiled by refx.jit or refx.jit_partial (make it with "
    "those).");

static PyType_Slot jit_slots[] = {
    {Py_tp_doc, (void *)jit_doc},    {Py_tp_new, jit_new},
    {Py_tp_call, PyVectorcall_Call}, {Py_tp_dealloc, jit_dealloc},
    {Py_tp_traverse, jit_traverse},  {Py_tp_clear, jit_clear},
    {Py_tp_repr, jit_repr},          {Py_tp_descr_get, jit_descr_get},
    {Py_tp_getset, jit_getset},      {Py_tp_members, jit_members},
    {Py_tp_methods, jit_methods},    {0, NULL},
};

static PyType_Spec jit_spec = {
    .name = "refx.JitFunction",
    .basicsize = sizeof(JitObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = jit_slots,
};

/* ------------------------------------------------------------------ */
/* helpers for the trace-time code (refx/_lift.py, refx/_jit.py)        */
/* ------------------------------------------------------------------ */

/* _make_refs(values, collections, specs): new Refs of the current trace,
 * made without calling __init__ (a subclass's may take other arguments) */
static PyObject *
make_refs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs != 3 || !PyList_Check(args[0]) || !PyTuple_Check(args[1]) ||
        !PyTuple_Check(args[2]) ||
        PyTuple_GET_SIZE(args[1]) != PyList_GET_SIZE(args[0]) ||
        PyTuple_GET_SIZE(args[2]) != PyList_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "_make_refs(values: list, collections: tuple, types: "
                        "tuple) of equal lengths");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (check_spec(st, PyTuple_GET_ITEM(args[2], k)) < 0) {
            return NULL;
        }
    }
    PyObject *trace = refx_current_trace(st);
    if (trace == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(trace);
        return NULL;
    }
    PyObject_GC_UnTrack(out); /* as in jit_outputs: filled below */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *r = ref_from_spec(st, PyTuple_GET_ITEM(args[2], k),
                                    PyList_GET_ITEM(args[0], k),
                                    PyTuple_GET_ITEM(args[1], k), trace);
        if (r == NULL) {
            Py_DECREF(out);
            Py_DECREF(trace);
            return NULL;
        }
        PyList_SET_ITEM(out, k, r);
    }
    PyObject_GC_Track(out);
    Py_DECREF(trace);
    return out;
}

/* _ref_is_current(ref): was ref made in the current trace? */
static PyObject *
ref_is_current(PyObject *module, PyObject *ref)
{
    refx_state *st = refx_get_state(module);
    if (!Ref_Check(st, ref)) {
        PyErr_SetString(PyExc_TypeError, "_ref_is_current expects a Ref");
        return NULL;
    }
    PyObject *trace = refx_current_trace(st);
    if (trace == NULL) {
        return NULL;
    }
    int r = ((RefObject *)ref)->trace == trace;
    Py_DECREF(trace);
    return Py_NewRef(r ? Py_True : Py_False);
}

/* Raise _WriteRefused((message, k)) with .position k and .reason for the
 * ValueError refx_check_write raised for write k (and .ref, the Ref
 * refused, when `ref` is not NULL); another error passes through
 * unchanged. */
void
refx_raise_refused(refx_state *st, Py_ssize_t k, refx_refusal why,
                   PyObject *ref)
{
    if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
        return;
    }
    PyObject *exc = refx_take_exception();
    PyObject *msg = exc != NULL ? PyObject_Str(exc) : NULL;
    Py_XDECREF(exc);
    if (msg == NULL) {
        return;
    }
    PyObject *reason = why == REFX_REFUSED_TRACE     ? st->str_trace
                       : why == REFX_REFUSED_MUTABLE ? st->str_mutable
                                                     : st->str_value;
    PyObject *pos = PyLong_FromSsize_t(k);
    PyObject *e = pos != NULL ? PyObject_CallFunctionObjArgs(st->WriteRefused,
                                                             msg, pos, NULL)
                              : NULL;
    if (e != NULL && PyObject_SetAttr(e, st->str_position, pos) == 0 &&
        PyObject_SetAttr(e, st->str_reason, reason) == 0 &&
        (ref == NULL || PyObject_SetAttrString(e, "ref", ref) == 0)) {
        PyErr_SetObject(st->WriteRefused, e);
    }
    Py_XDECREF(e);
    Py_XDECREF(pos);
    Py_DECREF(msg);
}

/* _write_refs(refs, values): check every write (trace level, refx.mutable,
 * tracers), then store them all with no Python code running.  A refused
 * write raises _WriteRefused (a ValueError) with args (message, k), k the
 * index of the first Ref that may not be written, and the attributes
 * `position` (k) and `reason` ("trace", "mutable" or "value"). */
static PyObject *
write_refs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1]) ||
        PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "_write_refs(refs: list, values: list) of equal "
                        "lengths");
        return NULL;
    }
    /* own both lists' items: a check may run Python code */
    PyObject *refs = PyList_GetSlice(args[0], 0, PY_SSIZE_T_MAX);
    PyObject *vals = PyList_GetSlice(args[1], 0, PY_SSIZE_T_MAX);
    PyObject *trace = NULL, *res = NULL;
    if (refs == NULL || vals == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(refs);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!Ref_Check(st, PyList_GET_ITEM(refs, k))) {
            PyErr_SetString(PyExc_TypeError, "_write_refs: refs must be Refs");
            goto done;
        }
    }
    trace = refx_current_trace(st);
    if (trace == NULL) {
        goto done;
    }
    Py_ssize_t failed;
    refx_refusal why;
    if (refx_write_all(st, (RefObject *const *)PySequence_Fast_ITEMS(refs),
                       PySequence_Fast_ITEMS(vals), n, trace, &failed,
                       &why) < 0) {
        if (failed >= 0) {
            refx_raise_refused(st, failed, why, NULL);
        }
        goto done;
    }
    res = Py_NewRef(Py_None);
done:
    Py_XDECREF(trace);
    Py_XDECREF(refs);
    Py_XDECREF(vals);
    return res;
}

/* _install_capture(hook): the closed-over Refs hook (see ref.c) */
static PyObject *
install_capture(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1],
                          (PyTypeObject *)PyExc_BaseException)) {
        PyErr_SetString(
            PyExc_TypeError,
            "_install_capture(hook, rediscover: an exception type)");
        return NULL;
    }
    Py_XSETREF(st->capture_hook, Py_NewRef(args[0]));
    Py_XSETREF(st->capture_rediscover, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

/* _capture_depth(delta): add delta (+1 entering, -1 leaving a trace that
 * captures closed-over Refs); the new depth */
static PyObject *
capture_depth(PyObject *module, PyObject *delta)
{
    (void)module;
    Py_ssize_t d = PyLong_AsSsize_t(delta);
    if (d == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (refx_capture_depth + d < 0) {
        REFX_BUG("_capture_depth below zero");
        return NULL;
    }
    refx_capture_depth += d;
    return PyLong_FromSsize_t(refx_capture_depth);
}

/* _ref_serial(ref=None): when `ref` was made (see RefObject.serial), or
 * with no argument the serial of the last Ref made */
static PyObject *
ref_serial(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    if (nargs == 0) {
        return PyLong_FromUnsignedLongLong(refx_ref_serial);
    }
    if (nargs != 1 || !Ref_Check(st, args[0])) {
        PyErr_SetString(PyExc_TypeError, "_ref_serial(ref=None): a Ref");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(((RefObject *)args[0])->serial);
}

/* _ref_trace(ref): the weak reference to the trace a Ref belongs to */
static PyObject *
ref_trace(PyObject *module, PyObject *ref)
{
    refx_state *st = refx_get_state(module);
    if (!Ref_Check(st, ref)) {
        PyErr_SetString(PyExc_TypeError, "_ref_trace expects a Ref");
        return NULL;
    }
    PyObject *t = ((RefObject *)ref)->trace;
    return Py_NewRef(t != NULL ? t : Py_None);
}

static PyObject *
install_jit(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"builder",       "describe",   "array_type",
                             "traceable",     "eval_trace", "disable_jit",
                             "bound_changed", NULL};
    PyObject *builder, *describe, *array_type, *traceable, *eval_trace,
        *disable_jit, *bound_changed;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOO:_install_jit",
                                     kwlist, &builder, &describe, &array_type,
                                     &traceable, &eval_trace, &disable_jit,
                                     &bound_changed)) {
        return NULL;
    }
    if (!PyType_Check(eval_trace)) {
        PyErr_SetString(PyExc_TypeError, "_install_jit: eval_trace: a type");
        return NULL;
    }
    refx_state *st = refx_get_state(module);
    Py_XSETREF(st->jit_builder, Py_NewRef(builder));
    Py_XSETREF(st->jit_describe, Py_NewRef(describe));
    Py_XSETREF(st->jit_array_type, Py_NewRef(array_type));
    Py_XSETREF(st->jit_traceable, Py_NewRef(traceable));
    Py_XSETREF(st->jit_eval_trace, Py_NewRef(eval_trace));
    Py_XSETREF(st->jit_disable_jit, Py_NewRef(disable_jit));
    Py_XSETREF(st->jit_bound_changed, Py_NewRef(bound_changed));
    Py_RETURN_NONE;
}

PyMethodDef refx_jit_functions[] = {
    {"_static_flatten", static_flatten, METH_O,
     "_static_flatten($module, static, /)\n--\n\npytree flatten of Static."},
    {"_static_unflatten", (PyCFunction)(void (*)(void))static_unflatten,
     METH_FASTCALL,
     "_static_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of Static."},
    {"_install_capture", (PyCFunction)(void (*)(void))install_capture,
     METH_FASTCALL,
     "_install_capture($module, hook, rediscover, /)\n--\n\n"
     "Install the closed-over Refs hook (refx/_wiring.py)."},
    {"_capture_depth", (PyCFunction)capture_depth, METH_O,
     "_capture_depth($module, delta, /)\n--\n\n"
     "Change the depth of traces capturing closed-over Refs."},
    {"_ref_serial", (PyCFunction)(void (*)(void))ref_serial, METH_FASTCALL,
     "_ref_serial($module, ref=None, /)\n--\n\n"
     "When `ref` was made; with no argument, the last Ref's serial."},
    {"_ref_trace", (PyCFunction)ref_trace, METH_O,
     "_ref_trace($module, ref, /)\n--\n\n"
     "The weak reference to the trace `ref` belongs to."},
    {"_make_refs", (PyCFunction)(void (*)(void))make_refs, METH_FASTCALL,
     "_make_refs($module, values, collections, types, /)\n--\n\n"
     "New Refs of the current trace (no __init__ call)."},
    {"_ref_spec", ref_spec_py, METH_O,
     "_ref_spec($module, ref, /)\n--\n\n"
     "What rebuilds the Ref in a trace: its class, or its kind (class,\n"
     "metadata, attributes)."},
    {"_ref_is_current", ref_is_current, METH_O,
     "_ref_is_current($module, ref, /)\n--\n\n"
     "Whether ref was made in the current JAX trace."},
    {"_write_refs", (PyCFunction)(void (*)(void))write_refs, METH_FASTCALL,
     "_write_refs($module, refs, values, /)\n--\n\n"
     "Check every write, then write all (all or nothing); a refused write\n"
     "raises _WriteRefused((message, position)) with .position, .reason."},
    {"_install_jit", (PyCFunction)(void (*)(void))install_jit,
     METH_VARARGS | METH_KEYWORDS,
     "_install_jit($module, /, *, builder, describe, array_type, traceable,\n"
     "             eval_trace, disable_jit)\n--\n\n"
     "Link refx.jit's per-call path to its trace-time builder; not public."},
    {NULL, NULL, 0, NULL},
};

int
refx_init_jit(PyObject *module, refx_state *st)
{
    st->Static_Type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &static_spec, NULL);
    if (st->Static_Type == NULL ||
        PyModule_AddType(module, st->Static_Type) < 0) {
        return -1;
    }
    st->Jit_Type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &jit_spec, NULL);
    if (st->Jit_Type == NULL || PyModule_AddType(module, st->Jit_Type) < 0) {
        return -1;
    }
    return PyModule_AddFunctions(module, refx_jit_functions);
}
