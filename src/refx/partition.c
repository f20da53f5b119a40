/*
 * partition.c: Partition, tree_partition, get_partition and
 * merge_partitions.  (Filters are in filter.c.)
 *
 * Partition.  An immutable dict subclass mapping a path (tuple of str) to a
 * leaf or NOTHING, in leaf order.  Item assignment, deletion and the
 * mutating methods raise TypeError; equality is dict equality, so a
 * Partition equals a plain dict with the same items.  As a pytree node
 * (registered by refx/_compat.py with the C functions below) its children
 * are its values other than NOTHING, and its aux data is
 * (paths, positions of NOTHING), cached in the object (it is immutable):
 * flattening one at every training step costs one list of values, no key
 * work, and NOTHING entries cost JAX nothing at all (as custom nodes they
 * cost ~0.3 us each in every jit call: 201 of them in the optimiser state
 * of a depth-100 MLP, measured).  So partitioning a Partition sees only
 * its present entries, and merging such a split rebuilds the NOTHINGs.
 *
 * Paths and their cache.  tree_partition flattens the tree with
 * Ref/Value/Index/NOTHING as leaves, then needs the path of each leaf,
 * which jaxlib's flatten_with_path gives (at ~3x a flatten).  Paths are a
 * function of the tree alone; for canonical trees (every dict key an exact
 * str or int, see tree.c) they are a function of the treedef, so they are
 * computed once per treedef and cached in st->path_cache:
 * treedef -> PathInfo, a tuple
 *
 *     (paths, template, hashes)
 *
 * where `paths` is the tuple of path tuples in leaf order, `template` a
 * dict {path: NOTHING} in that order and `hashes` a bytes object with
 * each path's hash.  A partition is then made by cloning the template (a
 * memcpy in CPython's dict_merge) and overwriting the entries of the
 * leaves it holds with their precomputed hashes: one dict store per leaf,
 * no string or tuple work.  A tree with other keys ({1.0: x}, an Enum
 * key) gets its paths computed on every call and never cached, so the
 * paths of {1: x} and {1.0: x} never mix, whichever came first.
 *
 * The cache is bounded by what it holds: at most 500,000 paths in all
 * (about 85 MB for paths 3 deep; a path costs ~170 bytes with its template
 * entry) and at most 512 treedefs.  When a new entry does not fit, the
 * oldest entries go first; a tree with more paths than the whole bound is
 * not cached.  (Bounded by count alone, a 20,000-Ref tree growing by one
 * Ref per step held ~1 GB after 300 steps.)  A treedef that cannot be
 * hashed (custom node with unhashable aux data) is not cached either.
 *
 * The treedef tree_partition returns is the one the cache holds for that
 * structure (for a canonical tree it is interchangeable with the tree's
 * own: same structure, equal keys, same paths).  merge_partitions is
 * always by path: it trusts the cached paths only for that very treedef
 * object; any other treedef (one the cache no longer holds, one made by
 * jax.tree_util, or an equal treedef of a non-canonical tree, {1.0: x}
 * for {1: x}) gets its own paths, from the treedef itself: it is
 * unflattened with placeholder leaves and flattened again with key paths.
 * So the answer never depends on what the cache holds.  Each path is
 * looked up in every partition (a dict cursor: one PyDict_Next and a
 * pointer test per path while a partition is in leaf order), and exactly
 * one partition must hold a value there.  A partition keyed by other paths
 * (a treedef of another tree with as many leaves) is an error, not a wrong
 * tree.
 *
 * Known limit: the keys a custom node gives through flatten_with_keys are
 * not seen by the leaf predicate, so they are taken to follow from its
 * type and aux data up to equality: two such nodes whose aux data compare
 * equal (keys 1 and 1.0) get the paths of the first one cached.
 *
 * Unflatten's templates (see there): jaxlib's unflatten of a Partition
 * clones a template {path: NOTHING} kept per aux data object and stores
 * the children with their paths' known hashes.
 *
 * Functions in this file: the Partition type and its pytree functions
 * (partition_unflatten over the template cache: unflat_lookup,
 * unflat_make, partition_from_entry), the path cache (path_info_from_pairs, path_cache_get/put,
 * tree_path_info, treedef_path_info), tree_partition, get_partition,
 * merge_partitions (merge_check_args, merge_at_path, merge_by_paths).
 */
#include "refx.h"

/* ------------------------------------------------------------------ */
/* Partition                                                            */
/* ------------------------------------------------------------------ */

static PyObject *
partition_alloc(refx_state *st)
{
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *p = PyDict_Type.tp_new(st->Partition_Type, empty, NULL);
    Py_DECREF(empty);
    return p;
}

static PyObject *
partition_new(PyTypeObject *tp, PyObject *args, PyObject *kwds)
{
    PyObject *arg = NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "Partition() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Partition", 0, 1, &arg)) {
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *self = PyDict_Type.tp_new(tp, empty, NULL);
    Py_DECREF(empty);
    if (self == NULL || arg == NULL) {
        return self;
    }
    int r;
    if (PyDict_Check(arg)) {
        r = PyDict_Merge(self, arg, 1);
    }
    else {
        PyObject *keys = PyObject_GetAttrString(arg, "keys");
        if (keys != NULL) {
            Py_DECREF(keys);
            r = PyDict_Merge(self, arg, 1);
        }
        else if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            r = PyDict_MergeFromSeq2(self, arg, 1);
        }
        else {
            r = -1;
        }
    }
    if (r < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

/* __init__ is a no-op: __new__ built the contents, and re-running
 * dict.__init__ would mutate an immutable mapping. */
static int
partition_init(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args),
               PyObject *Py_UNUSED(kwds))
{
    return 0;
}

static int
partition_traverse(PyObject *op, visitproc visit, void *arg)
{
    PartitionObject *self = REFX_PARTITION_CAST(op);
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->paths);
    Py_VISIT(self->aux);
    return PyDict_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int
partition_clear(PyObject *op)
{
    PartitionObject *self = REFX_PARTITION_CAST(op);
    Py_CLEAR(self->paths);
    Py_CLEAR(self->aux);
    return PyDict_Type.tp_clear((PyObject *)self);
}

static void
partition_dealloc(PyObject *op)
{
    PartitionObject *self = REFX_PARTITION_CAST(op);
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* dict's own trashcan skips subclasses: without ours, freeing nested
     * Partitions a million deep overflowed the stack */
    Py_TRASHCAN_BEGIN(self, partition_dealloc);
    Py_CLEAR(self->paths);
    Py_CLEAR(self->aux);
    PyDict_Type.tp_dealloc((PyObject *)self); /* frees via tp->tp_free */
    Py_DECREF(tp);
    Py_TRASHCAN_END;
}

static int
partition_readonly(void)
{
    PyErr_SetString(PyExc_TypeError,
                    "Partition is immutable; build a new one with "
                    "Partition({...}) or dict(partition)");
    return -1;
}

static int
partition_ass_subscript(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(key),
                        PyObject *Py_UNUSED(value))
{
    return partition_readonly();
}

static PyObject *
partition_mutator(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args),
                  PyObject *Py_UNUSED(kwds))
{
    partition_readonly();
    return NULL;
}

static PyObject *
partition_ior(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(other))
{
    partition_readonly();
    return NULL;
}

static PyObject *
partition_repr(PyObject *self)
{
    PyObject *inner = PyDict_Type.tp_repr(self);
    if (inner == NULL) {
        return NULL;
    }
    PyObject *res = PyUnicode_FromFormat("Partition(%U)", inner);
    Py_DECREF(inner);
    return res;
}

static PyObject *
partition_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_Copy(self);
    if (d == NULL) {
        return NULL;
    }
    PyObject *res = Py_BuildValue("O(N)", Py_TYPE(self), d);
    return res;
}

#define MUTATOR(name)                                                         \
    {name, (PyCFunction)(void (*)(void))partition_mutator,                    \
     METH_VARARGS | METH_KEYWORDS,                                            \
     "Raises TypeError: Partition is immutable."}

static PyMethodDef partition_methods[] = {
    MUTATOR("update"),
    MUTATOR("clear"),
    MUTATOR("pop"),
    MUTATOR("popitem"),
    MUTATOR("setdefault"),
    {"__reduce__", partition_reduce, METH_NOARGS, NULL},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585."},
    {NULL},
};

static PyGetSetDef partition_getset[] = {
    REFX_TREESCOPE_GETSET,
    {NULL},
};

PyDoc_STRVAR(
    partition_doc,
    "Partition(mapping=(), /)\n"
    "--\n\n"
    "An immutable dict from paths (tuples of str) to leaves or NOTHING, in\n"
    "leaf order, as returned by tree_partition and get_partition.\n\n"
    "A registered pytree node: jax.grad, tree_map and optax see its values;\n"
    "NOTHING entries contribute no leaves.  Equal to a plain dict with the\n"
    "same items.");

static PyType_Slot partition_slots[] = {
    {Py_tp_doc, (void *)partition_doc},
    {Py_tp_new, partition_new},
    {Py_tp_init, partition_init},
    {Py_tp_dealloc, partition_dealloc},
    {Py_tp_traverse, partition_traverse},
    {Py_tp_clear, partition_clear},
    {Py_tp_repr, partition_repr},
    {Py_tp_methods, partition_methods},
    {Py_tp_getset, partition_getset},
    {Py_mp_ass_subscript, partition_ass_subscript},
    {Py_nb_inplace_or, partition_ior},
    {0, NULL},
};

static PyType_Spec partition_spec = {
    .name = "refx.Partition",
    .basicsize = sizeof(PartitionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = partition_slots,
};

/* the keys of p in order, as a tuple (cached while it is still valid) */
static PyObject *
partition_paths(PartitionObject *p)
{
    if (p->paths != NULL &&
        PyTuple_GET_SIZE(p->paths) == PyDict_GET_SIZE((PyObject *)p)) {
        return Py_NewRef(p->paths);
    }
    PyObject *keys = PyDict_Keys((PyObject *)p);
    if (keys == NULL) {
        return NULL;
    }
    PyObject *t = PyList_AsTuple(keys);
    Py_DECREF(keys);
    if (t != NULL) {
        Py_XSETREF(p->paths, Py_NewRef(t));
        Py_CLEAR(p->aux); /* built from the old paths */
    }
    return t;
}

/* (children, aux): the values other than NOTHING, and the cached
 * (paths, positions of NOTHING). */
static PyObject *
partition_flatten(PyObject *module, PyObject *p)
{
    refx_state *st = refx_get_state(module);
    if (!Partition_Check(st, p)) {
        PyErr_SetString(PyExc_TypeError,
                        "_partition_flatten expects a Partition");
        return NULL;
    }
    PartitionObject *part = (PartitionObject *)p;
    PyObject *paths = NULL, *children = NULL, *holes = NULL, *res = NULL;
    PyObject *cached = NULL; /* the cached positions of NOTHING */
    /* The cached paths and aux are checked against the dict as it is walked
     * (a pointer test per key, one per NOTHING): dict.__setitem__(p, ...)
     * and friends bypass immutability, and a stale aux let
     * _partition_flatten_with_keys read past the children (a crash). */
    for (int attempt = 0;; attempt++) {
        paths = partition_paths(part);
        if (paths == NULL) {
            return NULL;
        }
        int need_aux =
            part->aux == NULL || PyTuple_GET_ITEM(part->aux, 0) != paths;
        cached = need_aux ? NULL : Py_NewRef(PyTuple_GET_ITEM(part->aux, 1));
        Py_ssize_t n = PyTuple_GET_SIZE(paths), h = 0;
        children = PyList_New(0);
        if (children == NULL ||
            (need_aux && (holes = PyList_New(0)) == NULL)) {
            goto error;
        }
        Py_ssize_t pos = 0, i = 0;
        PyObject *k, *v;
        int stale = 0;
        while (!stale && PyDict_Next(p, &pos, &k, &v)) {
            if (i >= n || k != PyTuple_GET_ITEM(paths, i)) {
                stale = 1;
            }
            else if (v != st->nothing) {
                if (PyList_Append(children, v) < 0) {
                    goto error;
                }
            }
            else if (need_aux) {
                PyObject *idx = PyLong_FromSsize_t(i);
                if (idx == NULL || PyList_Append(holes, idx) < 0) {
                    Py_XDECREF(idx);
                    goto error;
                }
                Py_DECREF(idx);
            }
            else if (h < PyTuple_GET_SIZE(cached) &&
                     PyLong_AsSsize_t(PyTuple_GET_ITEM(cached, h)) == i) {
                h++;
            }
            else {
                stale = 1;
            }
            i++;
        }
        if (PyErr_Occurred()) {
            goto error;
        }
        if (!stale && (i != n || (cached && h != PyTuple_GET_SIZE(cached)))) {
            stale = 1;
        }
        if (!stale) {
            break;
        }
        if (attempt > 0) {
            /* the walk runs no Python code: the dict cannot change */
            REFX_BUG("Partition changed while it was flattened");
            goto error;
        }
        /* forget the caches and walk again */
        Py_CLEAR(part->paths);
        Py_CLEAR(part->aux);
        Py_CLEAR(paths);
        Py_CLEAR(children);
        Py_CLEAR(holes);
        Py_CLEAR(cached);
    }
    if (holes != NULL) {
        PyObject *ht = PyList_AsTuple(holes);
        if (ht == NULL) {
            goto error;
        }
        Py_XSETREF(part->aux, PyTuple_Pack(2, paths, ht));
        Py_DECREF(ht);
        if (part->aux == NULL) {
            goto error;
        }
    }
    res = PyTuple_Pack(2, children, part->aux);
error:
    Py_XDECREF(cached);
    Py_XDECREF(holes);
    Py_XDECREF(children);
    Py_XDECREF(paths);
    return res;
}

static PyObject *
partition_flatten_with_keys(PyObject *module, PyObject *p)
{
    refx_state *st = refx_get_state(module);
    PyObject *flat = NULL, *pairs = NULL, *res = NULL;
    if (refx_require_jax(st, "Partition") < 0) {
        return NULL;
    }
    flat = partition_flatten(module, p);
    if (flat == NULL) {
        return NULL;
    }
    PyObject *values = PyTuple_GET_ITEM(flat, 0);
    PyObject *aux = PyTuple_GET_ITEM(flat, 1);
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    PyObject *holes = PyTuple_GET_ITEM(aux, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(paths), nh = PyTuple_GET_SIZE(holes);
    pairs = PyList_New(0);
    if (pairs == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0, h = 0, c = 0; i < n; i++) {
        if (h < nh && PyLong_AsSsize_t(PyTuple_GET_ITEM(holes, h)) == i) {
            h++;
            continue;
        }
        if (c >= PyList_GET_SIZE(values)) {
            REFX_BUG("Partition aux data has too few positions of NOTHING");
            goto error;
        }
        PyObject *k =
            PyObject_CallOneArg(st->dict_key, PyTuple_GET_ITEM(paths, i));
        if (k == NULL) {
            goto error;
        }
        PyObject *pair = PyTuple_Pack(2, k, PyList_GET_ITEM(values, c++));
        Py_DECREF(k);
        if (pair == NULL || PyList_Append(pairs, pair) < 0) {
            Py_XDECREF(pair);
            goto error;
        }
        Py_DECREF(pair);
    }
    res = PyTuple_Pack(2, pairs, aux);
error:
    Py_XDECREF(pairs);
    Py_XDECREF(flat);
    return res;
}

/*
 * Unflatten's templates.  jaxlib unflattens a Partition wherever one leaves
 * a transform: every refx.jit call that writes an optimiser state held in
 * one Ref gets its moments back as Partitions, from the aux data of the
 * traced output.  Stored item by item, a Partition costs a tuple hash and a
 * dict insertion (with the dict's resizes) per path: ~10,000 instructions
 * for 20 paths, the largest piece of such a call's cost above bare
 * jax.jit (callgrind).  The aux data is the same object call after call
 * (the treedef holds it), so its template {path: NOTHING} and the paths'
 * hashes are made once and kept, as tree_partition keeps them per treedef:
 * a Partition is then a clone of the template (a memcpy in dict_merge) and
 * one known-hash store per child.
 *
 * The cache is direct-mapped on the aux object's address: UNFLAT_SLOTS (64)
 * entries (aux, template, hashes), an entry holding its aux, so the
 * address cannot be reused while the entry names it.  Only aux data whose
 * paths are all exact tuples of exact str, with no two alike, gets an
 * entry (hashing them runs no Python code, and nothing in them can change
 * its hash later); any other aux data (crafted with treedef.unflatten) is
 * unflattened item by item, every time.  The positions of NOTHING are
 * checked when the entry is made (the aux tuple cannot change after).
 *
 * Bounded by what it holds: at most UNFLAT_MAX_PATHS paths in all
 * (st->unflat_paths counts them); an entry that would not fit empties the
 * cache first, and aux data with more paths than that is never cached (a
 * one-off Partition of 300,000 paths kept 50 MB alive until its slot was
 * reused; found by the hostile review).  The list, its entries and the
 * templates are untracked by the collector: they hold only tuples of str,
 * NOTHING and bytes (no cycles), and so gc.get_referrers cannot hand a
 * template to Python code that would edit it.  The children are taken as
 * a tuple (jaxlib passes one; anything else is copied into one), so a
 * collection run by an allocation cannot shrink them under the loop.
 */
#define UNFLAT_SLOTS 64
#define UNFLAT_MAX_PATHS 100000

static Py_ssize_t
unflat_slot(PyObject *aux)
{
    /* Fibonacci hashing: the top 6 bits of the address times 2^64/phi */
    return (Py_ssize_t)(((uint64_t)(uintptr_t)aux * 0x9E3779B97F4A7C15ull) >>
                        58);
}

PyObject *
refx_unflat_cache_new(void)
{
    PyObject *cache = PyList_New(UNFLAT_SLOTS);
    if (cache == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < UNFLAT_SLOTS; i++) {
        PyList_SET_ITEM(cache, i, Py_NewRef(Py_None));
    }
    PyObject_GC_UnTrack(cache);
    return cache;
}

/* Positions of NOTHING `holes` must be increasing ints below n (aux data
 * can be crafted: treedef.unflatten of anything). */
static int
check_holes(PyObject *holes, Py_ssize_t n)
{
    for (Py_ssize_t h = 0, prev = -1; h < PyTuple_GET_SIZE(holes); h++) {
        PyObject *o = PyTuple_GET_ITEM(holes, h);
        int overflow = 0;
        long long at = PyLong_CheckExact(o)
                           ? PyLong_AsLongLongAndOverflow(o, &overflow)
                           : -1;
        if (at <= prev || at >= n || overflow) {
            PyErr_Format(PyExc_ValueError,
                         "Partition: positions of NOTHING must be increasing "
                         "ints below the number of paths (%zd), got %R",
                         n, holes);
            return -1;
        }
        prev = (Py_ssize_t)at;
    }
    return 0;
}

/* aux's entry (aux, template, hashes) when the cache holds one, else NULL */
static PyObject *
unflat_lookup(refx_state *st, PyObject *aux)
{
    Py_ssize_t slot = unflat_slot(aux);
    PyObject *entry = PyList_GET_ITEM(st->unflat_cache, slot);
    if (entry != Py_None && PyTuple_GET_ITEM(entry, 0) == aux) {
        return Py_NewRef(entry);
    }
    return NULL;
}

/* the number of paths an entry (or None) holds */
static Py_ssize_t
unflat_size(PyObject *entry)
{
    return entry == Py_None ? 0
                            : PyTuple_GET_SIZE(PyTuple_GET_ITEM(
                                  PyTuple_GET_ITEM(entry, 0), 0));
}

/* Empty the cache.  Entries dropped here may be in use further up the
 * stack: their users hold them. */
static void
unflat_clear(refx_state *st)
{
    for (Py_ssize_t i = 0; i < UNFLAT_SLOTS; i++) {
        PyList_SetItem(st->unflat_cache, i, Py_NewRef(Py_None)); /* steals */
    }
    st->unflat_paths = 0;
}

/* Keep `entry` in `slot`, within UNFLAT_MAX_PATHS (the caller checked
 * that it fits alone).  Entries dropped here may be in use further up the
 * stack: their users hold them. */
static void
unflat_put(refx_state *st, Py_ssize_t slot, PyObject *entry)
{
    PyObject *cache = st->unflat_cache;
    Py_ssize_t n = unflat_size(entry);
    st->unflat_paths -= unflat_size(PyList_GET_ITEM(cache, slot));
    if (st->unflat_paths + n > UNFLAT_MAX_PATHS) {
        unflat_clear(st);
    }
    PyList_SetItem(cache, slot, Py_NewRef(entry)); /* steals */
    st->unflat_paths += n;
}

/* A new entry for `aux` (an exact tuple of two exact tuples, its positions
 * of NOTHING checked), kept in aux's slot; NULL with no error when such
 * aux data gets none. */
static PyObject *
unflat_make(refx_state *st, PyObject *aux)
{
    Py_ssize_t slot = unflat_slot(aux);
    PyObject *entry;
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    Py_ssize_t n = PyTuple_GET_SIZE(paths);
    if (n > UNFLAT_MAX_PATHS) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *path = PyTuple_GET_ITEM(paths, i);
        if (!PyTuple_CheckExact(path)) {
            return NULL;
        }
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(path); j++) {
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(path, j))) {
                return NULL;
            }
        }
    }
    PyObject *template = PyDict_New();
    PyObject *hashes =
        PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Py_hash_t));
    if (template == NULL || hashes == NULL) {
        goto error;
    }
    Py_hash_t *hs = (Py_hash_t *)PyBytes_AS_STRING(hashes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *path = PyTuple_GET_ITEM(paths, i);
        hs[i] = PyObject_Hash(path); /* str items: no Python code runs */
        if (hs[i] == -1 || refx_dict_setitem_known_hash(
                               template, path, st->nothing, hs[i]) < 0) {
            goto error;
        }
    }
    if (PyDict_GET_SIZE(template) != n) { /* two paths alike */
        Py_DECREF(template);
        Py_DECREF(hashes);
        return NULL;
    }
    PyObject_GC_UnTrack(template);
    entry = PyTuple_Pack(3, aux, template, hashes);
    Py_DECREF(template);
    Py_DECREF(hashes);
    if (entry != NULL) {
        PyObject_GC_UnTrack(entry);
        unflat_put(st, slot, entry);
    }
    return entry;
error:
    Py_XDECREF(template);
    Py_XDECREF(hashes);
    return NULL;
}

/* A Partition of aux's paths from its template: children (a tuple of
 * exactly n - len(holes) items) at the paths not in holes. */
static PyObject *
partition_from_entry(refx_state *st, PyObject *entry, PyObject *children)
{
    PyObject *aux = PyTuple_GET_ITEM(entry, 0);
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    PyObject *holes = PyTuple_GET_ITEM(aux, 1);
    const Py_hash_t *hs =
        (const Py_hash_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(entry, 2));
    Py_ssize_t n = PyTuple_GET_SIZE(paths), nh = PyTuple_GET_SIZE(holes);
    PyObject *p = partition_alloc(st);
    if (p == NULL || PyDict_Update(p, PyTuple_GET_ITEM(entry, 1)) < 0) {
        Py_XDECREF(p);
        return NULL;
    }
    for (Py_ssize_t i = 0, h = 0, c = 0; i < n; i++) {
        if (h < nh && PyLong_AsSsize_t(PyTuple_GET_ITEM(holes, h)) == i) {
            h++;
            continue;
        }
        if (refx_dict_setitem_known_hash(p, PyTuple_GET_ITEM(paths, i),
                                         PyTuple_GET_ITEM(children, c++),
                                         hs[i]) < 0) {
            Py_DECREF(p);
            return NULL;
        }
    }
    ((PartitionObject *)p)->paths = Py_NewRef(paths);
    ((PartitionObject *)p)->aux = Py_NewRef(aux);
    return p;
}

/* The children as a tuple: jaxlib's own, or a copy of any other iterable
 * (a list could be changed under the loops by Python code an allocation
 * runs, e.g. a gc callback). */
static PyObject *
unflatten_children(PyObject *o)
{
    if (PyTuple_CheckExact(o)) {
        return Py_NewRef(o);
    }
    PyObject *it = PyObject_GetIter(o);
    if (it == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_SetString(PyExc_TypeError, "children must be a sequence");
        }
        return NULL;
    }
    PyObject *t = PySequence_Tuple(it);
    Py_DECREF(it);
    return t;
}

static PyObject *
partition_unflatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *children = NULL, *p = NULL, *entry = NULL;
    PyObject *aux = nargs == 2 ? args[0] : NULL;
    if (aux == NULL || !PyTuple_Check(aux) || PyTuple_GET_SIZE(aux) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(aux, 0)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(aux, 1))) {
        PyErr_SetString(PyExc_TypeError,
                        "_partition_unflatten(aux, children): aux must be "
                        "(paths, positions of NOTHING)");
        return NULL;
    }
    PyObject *paths = PyTuple_GET_ITEM(aux, 0);
    PyObject *holes = PyTuple_GET_ITEM(aux, 1);
    children = unflatten_children(args[1]);
    if (children == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(paths), nh = PyTuple_GET_SIZE(holes);
    int exact = PyTuple_CheckExact(aux) && PyTuple_CheckExact(paths) &&
                PyTuple_CheckExact(holes);
    /* an entry's positions of NOTHING were checked when it was made */
    entry = exact ? unflat_lookup(st, aux) : NULL;
    if (entry == NULL && check_holes(holes, n) < 0) {
        goto error;
    }
    if (PyTuple_GET_SIZE(children) != n - nh) {
        PyErr_Format(PyExc_ValueError,
                     "Partition: %zd paths, %zd of them NOTHING, but %zd "
                     "children",
                     n, nh, PyTuple_GET_SIZE(children));
        goto error;
    }
    if (entry != NULL) {
        p = partition_from_entry(st, entry, children);
        goto error;
    }
    if (exact) {
        entry = unflat_make(st, aux);
        if (entry != NULL) {
            p = partition_from_entry(st, entry, children);
            goto error;
        }
        if (PyErr_Occurred()) {
            goto error;
        }
    }
    p = partition_alloc(st);
    if (p == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0, h = 0, c = 0; i < n; i++) {
        PyObject *v;
        if (h < nh && PyLong_AsSsize_t(PyTuple_GET_ITEM(holes, h)) == i) {
            h++;
            v = st->nothing; /* checked above: in range, in order */
        }
        else {
            v = PyTuple_GET_ITEM(children, c++);
        }
        if (PyDict_SetItem(p, PyTuple_GET_ITEM(paths, i), v) < 0) {
            Py_CLEAR(p);
            goto error;
        }
    }
    if (PyDict_GET_SIZE(p) == n) {
        ((PartitionObject *)p)->paths = Py_NewRef(paths);
        ((PartitionObject *)p)->aux = Py_NewRef(aux);
    }
error:
    Py_XDECREF(entry);
    Py_XDECREF(children);
    return p;
}

/* ------------------------------------------------------------------ */
/* the path cache                                                       */
/* ------------------------------------------------------------------ */

/* PathInfo (paths, template, hashes, treedef) from flatten_with_path's
 * (keypath, leaf) pairs of a tree of `treedef`; *canonical is cleared if a
 * key in a path is not canonical.  Two leaves with one path are a
 * ValueError. */
static PyObject *
path_info_from_pairs(refx_state *st, const char *fname, PyObject *pairs,
                     PyObject *treedef, int *canonical)
{
    PyObject *info = NULL, *paths = NULL, *template = NULL, *hashes = NULL;
    PyObject *seen = NULL;
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    paths = PyTuple_New(n);
    template = PyDict_New();
    hashes =
        PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Py_hash_t));
    seen = PyDict_New();
    if (paths == NULL || template == NULL || hashes == NULL || seen == NULL) {
        goto error;
    }
    Py_hash_t *path_hashes = (Py_hash_t *)PyBytes_AS_STRING(hashes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            REFX_BUG("flatten_with_path returned a bad pair");
            goto error;
        }
        PyObject *path = refx_path_from_keypath_ex(
            st, PyTuple_GET_ITEM(pair, 0), canonical);
        if (path == NULL) {
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                /* str() of a key refused (an int past the digit limit) */
                PyObject *exc = refx_take_exception();
                PyErr_Format(PyExc_ValueError,
                             "%s: a key of leaf %zd's path cannot be made a "
                             "path part: %S",
                             fname, i, exc);
                Py_XDECREF(exc);
            }
            goto error;
        }
        PyTuple_SET_ITEM(paths, i, path);
        Py_hash_t h = PyObject_Hash(path);
        if (h == -1) {
            goto error;
        }
        path_hashes[i] = h;
        PyObject *pos = PyLong_FromSsize_t(i);
        if (pos == NULL) {
            goto error;
        }
        PyObject *prev = PyDict_SetDefault(seen, path, pos);
        Py_DECREF(pos);
        if (prev == NULL) {
            goto error;
        }
        if (prev != pos) {
            refx_raise_at_path(PyExc_ValueError, path,
                               "%s: leaves %S and %zd both map to path "
                               "{path}; paths must be unique (do two keys of "
                               "a node have the same str()?)",
                               fname, prev, i);
            goto error;
        }
        if (PyDict_SetItem(template, path, st->nothing) < 0) {
            goto error;
        }
    }
    info = PyTuple_Pack(4, paths, template, hashes, treedef);
error:
    Py_XDECREF(paths);
    Py_XDECREF(template);
    Py_XDECREF(hashes);
    Py_XDECREF(seen);
    return info;
}

/* The cached PathInfo of `treedef` (new reference), or NULL: with an
 * error set if the lookup raised, without one if it is not cached. */
static PyObject *
path_cache_get(refx_state *st, PyObject *treedef)
{
    PyObject *info = PyDict_GetItemWithError(st->path_cache, treedef);
    if (info == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear(); /* unhashable aux data: never cached */
    }
    return Py_XNewRef(info);
}

/* Cache `info` for `treedef`, evicting the oldest entries until it fits
 * both bounds (see the essay).  Returns the entry the cache now holds for
 * the treedef (`info`, or one another thread put first), or `info` if it
 * is not cached; a new reference, or NULL with an error. */
static PyObject *
path_cache_put(refx_state *st, PyObject *treedef, PyObject *info)
{
    PyObject *cache = st->path_cache;
    Py_ssize_t n = PyTuple_GET_SIZE(PyTuple_GET_ITEM(info, 0));
    if (n > st->path_cache_max_paths) {
        return Py_NewRef(info);
    }
    while (PyDict_GET_SIZE(cache) > 0 &&
           (PyDict_GET_SIZE(cache) >= st->path_cache_max_entries ||
            st->path_cache_paths + n > st->path_cache_max_paths)) {
        Py_ssize_t pos = 0;
        PyObject *oldest, *old_info;
        if (!PyDict_Next(cache, &pos, &oldest, &old_info)) {
            break;
        }
        /* account first: freeing the entry may run Python code (a custom
         * node's aux data) that partitions, and so puts, again */
        st->path_cache_paths -=
            PyTuple_GET_SIZE(PyTuple_GET_ITEM(old_info, 0));
        Py_INCREF(oldest);
        int r = PyDict_DelItem(cache, oldest);
        Py_DECREF(oldest);
        if (r < 0) {
            return NULL;
        }
    }
    PyObject *prev = PyDict_SetDefault(cache, treedef, info);
    if (prev == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear(); /* unhashable aux data */
            return Py_NewRef(info);
        }
        return NULL;
    }
    if (prev == info) { /* another thread may have cached it meanwhile */
        st->path_cache_paths += n;
    }
    return Py_NewRef(prev);
}

/* The PathInfo of `tree`, flattened with `pred` into n leaves: from the
 * cache if the tree is canonical (`canonical`: its flatten saw no other
 * keys), else computed, and cached if canonical. */
static PyObject *
tree_path_info(refx_state *st, const char *fname, PyObject *tree,
               PyObject *pred, PyObject *treedef, Py_ssize_t n, int canonical)
{
    PyObject *info = NULL, *res = NULL;
    if (canonical) {
        info = path_cache_get(st, treedef);
        if (info != NULL || PyErr_Occurred()) {
            return info;
        }
    }
    PyObject *args[2] = {tree, pred};
    res = refx_call_jax(st->flatten_with_path, args, 2);
    if (res == NULL) {
        return NULL;
    }
    PyObject *pairs = PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2
                          ? PyTuple_GET_ITEM(res, 0)
                          : NULL;
    if (pairs == NULL || !PyList_Check(pairs) || PyList_GET_SIZE(pairs) != n) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the tree changed while it was being partitioned "
                     "(a custom node flattened differently twice)",
                     fname);
        goto error;
    }
    info = path_info_from_pairs(st, fname, pairs, treedef, &canonical);
    if (info != NULL && canonical) {
        Py_SETREF(info, path_cache_put(st, treedef, info));
    }
error:
    Py_DECREF(res);
    return info;
}

/* The PathInfo of a treedef alone: its tree is rebuilt with placeholder
 * leaves (the ints 0..n-1) and flattened again with key paths.  Cached if
 * canonical.  Error if the treedef's nodes cannot be rebuilt that way. */
static PyObject *
treedef_path_info(refx_state *st, const char *fname, PyObject *treedef,
                  Py_ssize_t n)
{
    PyObject *marks = NULL, *tree = NULL, *res = NULL, *info = NULL;
    marks = PyList_New(n);
    if (marks == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *m = PyLong_FromSsize_t(i);
        if (m == NULL) {
            goto error;
        }
        PyList_SET_ITEM(marks, i, m);
    }
    tree = refx_unflatten(st, treedef, marks);
    if (tree != NULL) {
        res = refx_call_jax(st->flatten_with_path, &tree, 1);
    }
    PyObject *pairs = res != NULL && PyTuple_Check(res) &&
                              PyTuple_GET_SIZE(res) == 2 &&
                              PyList_Check(PyTuple_GET_ITEM(res, 0))
                          ? PyTuple_GET_ITEM(res, 0)
                          : NULL;
    int same = pairs != NULL && PyList_GET_SIZE(pairs) == n;
    for (Py_ssize_t i = 0; same && i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        same = PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2 &&
               PyTuple_GET_ITEM(pair, 1) == PyList_GET_ITEM(marks, i);
    }
    if (!same) {
        if (PyErr_Occurred()) {
            PyObject *exc = refx_take_exception();
            PyErr_Format(PyExc_ValueError,
                         "%s: the paths of this treedef are not cached, and "
                         "rebuilding its tree to find them failed (%S); "
                         "merge with a treedef from tree_partition of this "
                         "process",
                         fname, exc);
            Py_XDECREF(exc);
        }
        else {
            PyErr_Format(PyExc_ValueError,
                         "%s: the paths of this treedef are not cached, and "
                         "its tree, rebuilt with placeholder leaves, does "
                         "not give them back (a custom node's unflatten "
                         "changes its children?); merge with a treedef from "
                         "tree_partition of this process",
                         fname);
        }
        goto error;
    }
    int canonical = 1;
    info = path_info_from_pairs(st, fname, pairs, treedef, &canonical);
    if (info != NULL && canonical) {
        PyObject *cached = path_cache_put(st, treedef, info);
        Py_XDECREF(cached); /* this treedef's own paths are what it needs */
        if (cached == NULL) {
            Py_CLEAR(info);
        }
    }
error:
    Py_XDECREF(res);
    Py_XDECREF(tree);
    Py_DECREF(marks);
    return info;
}

/* A new, empty Partition filled from the template: all paths -> NOTHING. */
static PyObject *
partition_from_template(refx_state *st, PyObject *info)
{
    PyObject *p = partition_alloc(st);
    if (p == NULL) {
        return NULL;
    }
    if (PyDict_Update(p, PyTuple_GET_ITEM(info, 1)) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    ((PartitionObject *)p)->paths = Py_NewRef(PyTuple_GET_ITEM(info, 0));
    return p;
}

static PyObject *
path_cache_clear(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    PyDict_Clear(st->path_cache);
    st->path_cache_paths = 0;
    Py_RETURN_NONE;
}

static PyObject *
unflat_cache_clear(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    unflat_clear(refx_get_state(module));
    Py_RETURN_NONE;
}

static PyObject *
path_cache_limits(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    refx_state *st = refx_get_state(module);
    return Py_BuildValue("{snsn}", "paths", st->path_cache_max_paths,
                         "entries", st->path_cache_max_entries);
}

static PyObject *
set_path_cache_limits(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"paths", "entries", NULL};
    refx_state *st = refx_get_state(module);
    Py_ssize_t paths = st->path_cache_max_paths;
    Py_ssize_t entries = st->path_cache_max_entries;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs,
                                     "|$nn:_set_path_cache_limits", kwlist,
                                     &paths, &entries)) {
        return NULL;
    }
    if (paths < 0 || entries < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "_set_path_cache_limits: paths must be >= 0 and "
                        "entries >= 1");
        return NULL;
    }
    PyObject *old = path_cache_limits(module, NULL);
    if (old == NULL) {
        return NULL;
    }
    st->path_cache_max_paths = paths;
    st->path_cache_max_entries = entries;
    PyDict_Clear(st->path_cache);
    st->path_cache_paths = 0;
    return old;
}

/* ------------------------------------------------------------------ */
/* tree_partition / get_partition                                       */
/* ------------------------------------------------------------------ */

/* Shared body: nparts = nfilters + 1 partitions, or only the first when
 * `first_only`.  Returns a tuple of Partitions; *treedef_out set. */
static PyObject *
partition_impl(refx_state *st, const char *fname, PyObject *tree,
               PyObject *const *filters, Py_ssize_t nfilters,
               PyObject *is_leaf, int first_only, PyObject **treedef_out)
{
    PyObject *leaves = NULL, *treedef = NULL, *pred = NULL, *info = NULL;
    PyObject *parts = NULL, *res = NULL;
    if (refx_require_trees(st, fname) < 0) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nfilters; k++) {
        if (refx_filter_validate(st, filters[k], fname, k) < 0) {
            return NULL;
        }
    }
    pred = refx_make_pred(st, is_leaf);
    if (pred == NULL) {
        return NULL;
    }
    /* always with the predicate: it also tells whether the tree's keys are
     * canonical, before its treedef is looked up */
    uint64_t noncanonical = st->noncanonical_seen;
    leaves = refx_flatten(st, tree, pred, &treedef);
    if (leaves == NULL) {
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(leaves);
    info = tree_path_info(st, fname, tree, pred, treedef, n,
                          st->noncanonical_seen == noncanonical);
    if (info == NULL) {
        goto error;
    }
    PyObject *paths = PyTuple_GET_ITEM(info, 0);
    const Py_hash_t *hs =
        (const Py_hash_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(info, 2));
    Py_ssize_t nparts = first_only ? 1 : nfilters + 1;
    parts = PyTuple_New(nparts);
    if (parts == NULL) {
        goto error;
    }
    for (Py_ssize_t k = 0; k < nparts; k++) {
        PyObject *p = partition_from_template(st, info);
        if (p == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(parts, k, p);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *leaf = PyList_GET_ITEM(leaves, i);
        Py_ssize_t k = 0;
        for (; k < nfilters; k++) {
            int m = refx_filter_match_at(st, filters[k],
                                         PyTuple_GET_ITEM(paths, i), leaf);
            if (m < 0) {
                goto error;
            }
            if (m) {
                break;
            }
        }
        if (k >= nparts) {
            continue; /* get_partition: not in the first */
        }
        if (refx_dict_setitem_known_hash(PyTuple_GET_ITEM(parts, k),
                                         PyTuple_GET_ITEM(paths, i), leaf,
                                         hs[i]) < 0) {
            goto error;
        }
    }
    res = Py_NewRef(parts);
    /* the treedef the path cache holds for this tree's structure, when the
     * tree is canonical (then it is interchangeable with this one):
     * merge_partitions trusts the cached paths only for that very object */
    *treedef_out = Py_NewRef(PyTuple_GET_ITEM(info, 3));
error:
    Py_XDECREF(parts);
    Py_XDECREF(info);
    Py_XDECREF(pred);
    Py_XDECREF(leaves);
    Py_XDECREF(treedef);
    return res;
}

static int
parse_is_leaf(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *fname, PyObject **is_leaf)
{
    *is_leaf = NULL;
    if (kwnames == NULL) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_Check(name) &&
            PyUnicode_CompareWithASCIIString(name, "is_leaf") == 0) {
            *is_leaf = args[nargs + i];
        }
        else {
            PyErr_Format(PyExc_TypeError,
                         "%s() got an unexpected keyword argument %R", fname,
                         name);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(
    refx_tree_partition__doc__,
    "tree_partition($module, tree, /, *filters, is_leaf=None)\n"
    "--\n\n"
    "Split the leaves of `tree` by filters into len(filters) + 1 "
    "Partitions.\n\n"
    "Returns ((partition_0, ..., rest), treedef).  Each Partition maps every\n"
    "path (tuple of str) of the tree, in leaf order, to the leaf if it "
    "belongs\n"
    "there and to NOTHING otherwise.  A leaf goes to the first filter that\n"
    "accepts it, else to the last partition.  Ref, Value, Index and NOTHING\n"
    "are always leaves; `is_leaf` may declare more.  A filter is a callable\n"
    "f(leaf) -> bool, a collection name (str), a type, a tuple of filters\n"
    "(any), Not/All/Any, ..., True or False.  merge_partitions(partitions,\n"
    "treedef) rebuilds the tree.");

static PyObject *
refx_tree_partition(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    refx_state *st = refx_get_state(module);
    PyObject *is_leaf, *treedef = NULL;
    Py_ssize_t npos = PyVectorcall_NARGS(nargs);
    if (parse_is_leaf(args, npos, kwnames, "tree_partition", &is_leaf) < 0) {
        return NULL;
    }
    if (npos < 1) {
        PyErr_SetString(PyExc_TypeError,
                        "tree_partition() missing required argument 'tree'");
        return NULL;
    }
    PyObject *parts = partition_impl(st, "tree_partition", args[0], args + 1,
                                     npos - 1, is_leaf, 0, &treedef);
    if (parts == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NN)", parts, treedef);
}

PyDoc_STRVAR(
    refx_get_partition__doc__,
    "get_partition($module, tree, filter, /, *, is_leaf=None)\n"
    "--\n\n"
    "The first partition of tree_partition(tree, filter): a Partition "
    "mapping\n"
    "every path to its leaf where `filter` accepts it, else to NOTHING.");

static PyObject *
refx_get_partition(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    refx_state *st = refx_get_state(module);
    PyObject *is_leaf, *treedef = NULL;
    Py_ssize_t npos = PyVectorcall_NARGS(nargs);
    if (parse_is_leaf(args, npos, kwnames, "get_partition", &is_leaf) < 0) {
        return NULL;
    }
    if (npos != 2) {
        PyErr_Format(PyExc_TypeError,
                     "get_partition() takes 2 positional arguments (tree, "
                     "filter) but %zd were given",
                     npos);
        return NULL;
    }
    PyObject *parts = partition_impl(st, "get_partition", args[0], args + 1, 1,
                                     is_leaf, 1, &treedef);
    if (parts == NULL) {
        return NULL;
    }
    Py_DECREF(treedef);
    PyObject *p = Py_NewRef(PyTuple_GET_ITEM(parts, 0));
    Py_DECREF(parts);
    return p;
}

/* ------------------------------------------------------------------ */
/* merge_partitions                                                     */
/* ------------------------------------------------------------------ */

/* A path of `a` that `b` lacks (borrowed), or NULL (maybe with error). */
static PyObject *
missing_path(PyObject *a, PyObject *b)
{
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(a, &pos, &k, &v)) {
        int r = PyDict_Contains(b, k);
        if (r < 0) {
            return NULL;
        }
        if (!r) {
            return k;
        }
    }
    return NULL;
}

/* Check the arguments; on success *parts is a tuple of our own (never the
 * caller's list: comparing keys runs Python code, which could empty the
 * list and free the dicts) holding dicts with n paths each, n being the
 * treedef's number of leaves. */
static int
merge_check_args(refx_state *st, PyObject *partitions, PyObject *treedef,
                 PyObject **parts, Py_ssize_t *n)
{
    if (PyDict_Check(partitions) || !PySequence_Check(partitions)) {
        PyErr_Format(PyExc_TypeError,
                     "merge_partitions: partitions must be a tuple or list "
                     "of dicts, not %.200s",
                     Py_TYPE(partitions)->tp_name);
        return -1;
    }
    int ok = PyObject_IsInstance(treedef, st->treedef_type);
    if (ok <= 0) {
        if (ok == 0) {
            PyErr_Format(PyExc_TypeError,
                         "merge_partitions: treedef must be a PyTreeDef (as "
                         "returned by tree_partition), not %.200s",
                         Py_TYPE(treedef)->tp_name);
        }
        return -1;
    }
    *parts = PySequence_Tuple(partitions);
    if (*parts == NULL) {
        return -1;
    }
    Py_ssize_t np = PyTuple_GET_SIZE(*parts);
    if (np == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "merge_partitions: no partitions given");
        goto error;
    }
    for (Py_ssize_t k = 0; k < np; k++) {
        PyObject *p = PyTuple_GET_ITEM(*parts, k);
        if (!PyDict_Check(p)) {
            PyErr_Format(PyExc_TypeError,
                         "merge_partitions: partition %zd is a %.200s; "
                         "expected a dict (Partition)",
                         k, Py_TYPE(p)->tp_name);
            goto error;
        }
    }
    PyObject *first = PyTuple_GET_ITEM(*parts, 0);
    *n = PyDict_GET_SIZE(first);
    for (Py_ssize_t k = 1; k < np; k++) {
        PyObject *p = PyTuple_GET_ITEM(*parts, k);
        if (PyDict_GET_SIZE(p) != *n) {
            int more = PyDict_GET_SIZE(p) > *n;
            PyObject *only =
                more ? missing_path(p, first) : missing_path(first, p);
            if (only == NULL && PyErr_Occurred()) {
                goto error;
            }
            PyErr_Format(PyExc_ValueError,
                         "merge_partitions: partition %zd has %zd paths but "
                         "partition 0 has %zd; path %R is only in partition "
                         "%zd",
                         k, PyDict_GET_SIZE(p), *n,
                         only != NULL ? only : Py_None,
                         more ? k : (Py_ssize_t)0);
            goto error;
        }
    }
    PyObject *num = PyObject_GetAttr(treedef, st->str_num_leaves);
    if (num == NULL) {
        goto error;
    }
    Py_ssize_t nleaves = PyLong_AsSsize_t(num);
    Py_DECREF(num);
    if (nleaves == -1 && PyErr_Occurred()) {
        goto error;
    }
    if (nleaves != *n) {
        PyErr_Format(PyExc_ValueError,
                     "merge_partitions: treedef has %zd leaves but the "
                     "partitions have %zd paths (is the treedef from another "
                     "tree?)",
                     nleaves, *n);
        goto error;
    }
    return 0;
error:
    Py_CLEAR(*parts);
    return -1;
}

/* The one value other than NOTHING at `path` (new reference); NULL with
 * an error, or NULL without one when partition *missing lacks the path. */
static PyObject *
merge_at_path(refx_state *st, refx_dict_cursor *cursors, Py_ssize_t np,
              PyObject *path, Py_ssize_t *missing)
{
    PyObject *found = NULL;
    Py_ssize_t found_k = -1;
    for (Py_ssize_t k = 0; k < np; k++) {
        PyObject *v = refx_cursor_get(&cursors[k], path);
        if (v == NULL) {
            if (!PyErr_Occurred()) {
                *missing = k;
            }
            goto error;
        }
        if (v == st->nothing) {
            Py_DECREF(v);
            continue;
        }
        if (found != NULL) {
            Py_DECREF(v);
            refx_raise_at_path(PyExc_ValueError, path,
                               "merge_partitions: two values at path {path} "
                               "(partitions %zd and %zd); each path must have "
                               "exactly one non-NOTHING value",
                               found_k, k);
            goto error;
        }
        found = v;
        found_k = k;
    }
    if (found == NULL) {
        refx_raise_at_path(PyExc_ValueError, path,
                           "merge_partitions: no value at path {path} "
                           "(NOTHING in all %zd partitions); each path must "
                           "have exactly one non-NOTHING value",
                           np);
    }
    return found;
error:
    Py_XDECREF(found);
    return NULL;
}

/* The leaves, in the order of `paths`; NULL with an error, or NULL without
 * one when path number *at is missing from partition *missing. */
static PyObject *
merge_by_paths(refx_state *st, PyObject *parts, PyObject *paths,
               Py_ssize_t *missing, Py_ssize_t *at)
{
    Py_ssize_t np = PyTuple_GET_SIZE(parts), n = PyTuple_GET_SIZE(paths);
    PyObject *leaves = PyList_New(n);
    refx_dict_cursor *cursors = PyMem_Malloc((size_t)np * sizeof(*cursors));
    if (leaves == NULL || cursors == NULL) {
        if (leaves != NULL) {
            PyErr_NoMemory();
        }
        goto error;
    }
    for (Py_ssize_t k = 0; k < np; k++) {
        refx_cursor_init(&cursors[k], PyTuple_GET_ITEM(parts, k));
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = merge_at_path(st, cursors, np,
                                    PyTuple_GET_ITEM(paths, i), missing);
        if (v == NULL) {
            *at = i;
            goto error;
        }
        PyList_SET_ITEM(leaves, i, v);
    }
    PyMem_Free(cursors);
    return leaves;
error:
    PyMem_Free(cursors);
    Py_XDECREF(leaves);
    return NULL;
}

PyDoc_STRVAR(
    refx_merge_partitions__doc__,
    "merge_partitions($module, partitions, treedef, /)\n"
    "--\n\n"
    "Rebuild a tree from the partitions and treedef of tree_partition.\n\n"
    "The partitions must have the treedef's paths, and at each path exactly\n"
    "one of them must hold a value other than NOTHING; that value becomes "
    "the\n"
    "leaf at that path.  Partitions may be any dicts, in any order (e.g.\n"
    "transformed by jax.tree_util.tree_map), and the treedef may come from\n"
    "jax.tree_util: leaves are matched by path, never by position.");

static PyObject *
refx_merge_partitions(PyObject *module, PyObject *const *args,
                      Py_ssize_t nargs)
{
    refx_state *st = refx_get_state(module);
    PyObject *parts = NULL, *info = NULL, *leaves = NULL, *res = NULL;
    Py_ssize_t n, missing = -1, at = -1;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "merge_partitions() takes 2 arguments (partitions, "
                     "treedef) but %zd were given",
                     nargs);
        return NULL;
    }
    PyObject *treedef = args[1];
    if (refx_require_trees(st, "merge_partitions") < 0 ||
        merge_check_args(st, args[0], treedef, &parts, &n) < 0) {
        return NULL;
    }
    /* the cached paths are trusted only for the treedef object the cache
     * gave out (tree_partition returns it): an equal treedef may be of a
     * non-canonical tree, whose own paths differ ({1.0: x} vs {1: x}) */
    info = path_cache_get(st, treedef);
    if (info != NULL && PyTuple_GET_ITEM(info, 3) != treedef) {
        Py_CLEAR(info);
    }
    if (info == NULL && !PyErr_Occurred()) {
        info = treedef_path_info(st, "merge_partitions", treedef, n);
    }
    if (info == NULL) {
        goto error;
    }
    leaves =
        merge_by_paths(st, parts, PyTuple_GET_ITEM(info, 0), &missing, &at);
    if (leaves == NULL) {
        if (!PyErr_Occurred()) {
            refx_raise_at_path(
                PyExc_ValueError,
                PyTuple_GET_ITEM(PyTuple_GET_ITEM(info, 0), at),
                "merge_partitions: path {path} of the treedef is not in "
                "partition %zd (are the treedef and the partitions from "
                "different trees?)",
                missing);
        }
        goto error;
    }
    res = refx_unflatten(st, treedef, leaves);
error:
    Py_XDECREF(leaves);
    Py_XDECREF(info);
    Py_XDECREF(parts);
    return res;
}

PyMethodDef refx_partition_functions[] = {
    {"tree_partition", (PyCFunction)(void (*)(void))refx_tree_partition,
     METH_FASTCALL | METH_KEYWORDS, refx_tree_partition__doc__},
    {"get_partition", (PyCFunction)(void (*)(void))refx_get_partition,
     METH_FASTCALL | METH_KEYWORDS, refx_get_partition__doc__},
    {"merge_partitions", (PyCFunction)(void (*)(void))refx_merge_partitions,
     METH_FASTCALL, refx_merge_partitions__doc__},
    {"_clear_path_cache", path_cache_clear, METH_NOARGS,
     "_clear_path_cache($module, /)\n--\n\n"
     "Forget the paths computed per treedef (tests, memory)."},
    {"_clear_unflatten_cache", unflat_cache_clear, METH_NOARGS,
     "_clear_unflatten_cache($module, /)\n--\n\n"
     "Forget Partition unflatten's templates (tests, memory)."},
    {"_path_cache_limits", path_cache_limits, METH_NOARGS,
     "_path_cache_limits($module, /)\n--\n\n"
     "The path cache's bounds: {'paths': ..., 'entries': ...}."},
    {"_set_path_cache_limits",
     (PyCFunction)(void (*)(void))set_path_cache_limits,
     METH_VARARGS | METH_KEYWORDS,
     "_set_path_cache_limits($module, /, *, paths=None, entries=None)\n--\n\n"
     "Set the path cache's bounds (tests); empties it; returns the old ones."},
    {"_partition_flatten", partition_flatten, METH_O,
     "_partition_flatten($module, partition, /)\n--\n\n"
     "pytree flatten of Partition."},
    {"_partition_flatten_with_keys", partition_flatten_with_keys, METH_O,
     "_partition_flatten_with_keys($module, partition, /)\n--\n\n"
     "pytree flatten of Partition, with DictKey(path) keys."},
    {"_partition_unflatten", (PyCFunction)(void (*)(void))partition_unflatten,
     METH_FASTCALL,
     "_partition_unflatten($module, aux, children, /)\n--\n\n"
     "pytree unflatten of Partition."},
    {NULL, NULL, 0, NULL},
};

int
refx_init_partition_types(PyObject *module, refx_state *st)
{
    return refx_add_type(module, &partition_spec, (PyObject *)&PyDict_Type,
                         &st->Partition_Type, 1);
}
