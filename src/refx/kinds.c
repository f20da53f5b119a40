/*
 * kinds.c: what a Ref is besides its value and collection: its class, its
 * metadata and a subclass's attributes, together its "kind".
 *
 * Metadata.  Keyword arguments of Ref(value, collection, **metadata)
 * (sharding=..., or any name) are kept in the Ref as a tuple of
 * (name, value, type(value)) entries sorted by name (entries_from_items):
 * with the type, 1, 1.0 and True are three values, as they are three static
 * arguments to jax.jit.  Metadata values must be hashable, since they ride
 * in a deref'ed tree's aux data, which jax.jit hashes and compares.  A
 * Ref's metadata is fixed at construction, like its collection.  A name one
 * or two edits away from one of Ref's own arguments ("colection", "vlaue")
 * is refused as almost certainly a misspelling (check_not_a_typo): made
 * into metadata, it would be lost silently.
 *
 * Attributes.  A Python subclass of Ref may carry plain attributes in its
 * instance __dict__ (never __slots__: ref.c's __init_subclass__ refuses
 * them).  They may change at any time, so they are read afresh whenever a
 * kind is needed, as the same sorted entries.
 *
 * Kind.  What a Value/Index must record, besides index and collection, to
 * rebuild its Ref: NULL for a plain Ref without metadata (most Refs, and
 * then nothing is allocated), else (type, metadata entries, attribute
 * entries).  deref records it in each Value/Index (their aux data is
 * (index, collection) or (index, collection, kind)), reref and clone
 * rebuild Refs from it (refx_ref_create_kind, ref.c), refx.jit keys its
 * cache on it (jit.c's ref_spec).  A kind coming from outside (aux data,
 * Value(...)'s keywords, a jit plan) is checked by refx_check_kind: a Ref
 * subclass, well-formed entries, attributes only for a class with a
 * __dict__, hashable.  The class and metadata of a Ref never change, so its
 * kind without attributes is cached in the Ref (RefObject.kind).
 * refx_ref_kind runs no Python code, as deref's one-moment loop, which
 * calls it, requires (deref.c).
 *
 * Functions in this file: entries_from_items, refx_metadata_from_dict,
 * edit_distance and check_not_a_typo (the typo hint), refx_pairs_to_dict,
 * refx_pairs_to_mapping, refx_pairs_repr (metadata as a dict, a read-only
 * mapping, ", name=value" text), refx_ref_instance_dict, refx_ref_kind,
 * has_instance_dict, refx_check_kind, refx_kind_from_args (Value/Index's
 * ref_type= and metadata= keywords), refx_kind_repr, refx_parse_aux.
 */
#include "refx.h"
#include <string.h>

static int check_not_a_typo(PyObject *name, const char *fname);

/* ------------------------------------------------------------------ */
/* metadata                                                             */
/* ------------------------------------------------------------------ */

/* The (name, value) pairs of `items` (a list, consumed) as a tuple of
 * (name, value, type(value)) entries sorted by name, or NULL with an
 * error.  With the type, 1, 1.0 and True are three values, as they are
 * three static arguments to jax.jit.  Names are unique, so only they are
 * compared (str: no Python code runs). */
static PyObject *
entries_from_items(PyObject *items)
{
    if (PyList_Sort(items) < 0) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        PyObject *v = PyTuple_GET_ITEM(pair, 1);
        PyObject *entry =
            PyTuple_Pack(3, PyTuple_GET_ITEM(pair, 0), v, Py_TYPE(v));
        if (entry == NULL) {
            goto error;
        }
        PyList_SET_ITEM(items, i, entry);
        Py_DECREF(pair);
    }
    PyObject *res = PyList_AsTuple(items);
    Py_DECREF(items);
    return res;
error:
    Py_DECREF(items);
    return NULL;
}

/* Metadata from keyword arguments (a dict, or NULL): a tuple of
 * (name, value, type(value)) entries sorted by name, or NULL (no error)
 * when there is none.  Values must be hashable: metadata rides in a deref'ed tree's aux
 * data, which jax.jit hashes. */
PyObject *
refx_metadata_from_dict(PyObject *kwargs, const char *fname)
{
    if (kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0) {
        return NULL;
    }
    PyObject *items = PyDict_Items(kwargs);
    if (items == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        PyObject *name = PyTuple_GET_ITEM(pair, 0);
        if (!PyUnicode_Check(name)) {
            PyErr_Format(PyExc_TypeError,
                         "%s: metadata names must be str, "
                         "not %.200s",
                         fname, Py_TYPE(name)->tp_name);
            goto error;
        }
        if (check_not_a_typo(name, fname) < 0) {
            goto error;
        }
        if (PyObject_Hash(PyTuple_GET_ITEM(pair, 1)) == -1) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError,
                             "%s: metadata %R must be hashable (it is part "
                             "of the jit cache key), got unhashable %.200s",
                             fname, name,
                             Py_TYPE(PyTuple_GET_ITEM(pair, 1))->tp_name);
            }
            goto error;
        }
    }
    return entries_from_items(items);
error:
    Py_DECREF(items);
    return NULL;
}

/* Edit distance (with swapped neighbours as one edit) between two short
 * names, or cap + 1 when that is certainly more than cap. */
static Py_ssize_t
edit_distance(const char *a, const char *b, Py_ssize_t cap)
{
    Py_ssize_t la = (Py_ssize_t)strlen(a), lb = (Py_ssize_t)strlen(b);
    if (la > 32 || lb > 32 || (la > lb ? la - lb : lb - la) > cap) {
        return cap + 1;
    }
    Py_ssize_t d[33][33]; /* d[i][j]: distance of a[:i] and b[:j] */
    for (Py_ssize_t i = 0; i <= la; i++) {
        for (Py_ssize_t j = 0; j <= lb; j++) {
            if (i == 0 || j == 0) {
                d[i][j] = i + j;
                continue;
            }
            Py_ssize_t best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < best) {
                best = d[i - 1][j] + 1;
            }
            if (d[i][j - 1] + 1 < best) {
                best = d[i][j - 1] + 1;
            }
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] &&
                a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best) {
                best = d[i - 2][j - 2] + 1; /* swapped neighbours */
            }
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

/* A metadata name one or two typos away from an argument name is almost
 * certainly that argument misspelled: refuse it rather than make it
 * metadata silently. */
static int
check_not_a_typo(PyObject *name, const char *fname)
{
    const char *s = PyUnicode_AsUTF8(name);
    if (s == NULL) {
        return -1;
    }
    static const char *const args[] = {"collection", "value"};
    for (size_t i = 0; i < 2; i++) {
        Py_ssize_t cap = i == 0 ? 2 : 1;
        if (edit_distance(s, args[i], cap) <= cap) {
            PyErr_Format(PyExc_TypeError,
                         "%s: metadata name %R looks like a misspelled '%s' "
                         "(metadata names must not be that close to one of "
                         "Ref's arguments)",
                         fname, name, args[i]);
            return -1;
        }
    }
    return 0;
}

/* A new dict of `pairs` (metadata or attributes; NULL for none). */
PyObject *
refx_pairs_to_dict(PyObject *pairs)
{
    PyObject *d = PyDict_New();
    for (Py_ssize_t i = 0;
         d != NULL && pairs != NULL && i < PyTuple_GET_SIZE(pairs); i++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i);
        if (PyDict_SetItem(d, PyTuple_GET_ITEM(pair, 0),
                           PyTuple_GET_ITEM(pair, 1)) < 0) {
            Py_CLEAR(d);
        }
    }
    return d;
}

/* A read-only mapping of `pairs`. */
PyObject *
refx_pairs_to_mapping(PyObject *pairs)
{
    PyObject *d = refx_pairs_to_dict(pairs);
    if (d == NULL) {
        return NULL;
    }
    PyObject *proxy = PyDictProxy_New(d);
    Py_DECREF(d);
    return proxy;
}

/* ", name=value" for each pair (reprs of metadata), or "" */
PyObject *
refx_pairs_repr(PyObject *pairs)
{
    PyObject *res = PyUnicode_FromString("");
    for (Py_ssize_t i = 0;
         res != NULL && pairs != NULL && i < PyTuple_GET_SIZE(pairs); i++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i);
        PyObject *part = PyUnicode_FromFormat(
            ", %U=%R", PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
        PyObject *joined = part != NULL ? PyUnicode_Concat(res, part) : NULL;
        Py_XDECREF(part);
        Py_SETREF(res, joined);
    }
    return res;
}

/* ------------------------------------------------------------------ */
/* attributes and kinds                                                 */
/* ------------------------------------------------------------------ */

/* The instance __dict__ of a Python subclass's Ref, or NULL (no error) if
 * it has none or it is empty.  Runs no Python code. */
PyObject *
refx_ref_instance_dict(refx_state *st, PyObject *self)
{
    if (Py_IS_TYPE(self, st->Ref_Type)) {
        return NULL;
    }
    PyObject *d = PyObject_GenericGetDict(self, NULL);
    if (d == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyDict_Check(d) || PyDict_GET_SIZE(d) == 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/*
 * The kind of a Ref: what a Value/Index must record, besides index and
 * collection, to rebuild it: NULL for a plain Ref without metadata (most
 * Refs: no allocation), else the tuple (type, metadata, attributes), the
 * last two () when empty, each a tuple of (name, value, type(value))
 * entries sorted by name.  Attributes are a Ref subclass's instance
 * __dict__ (subclasses may not declare __slots__: see ref_init_subclass).
 * The class and metadata of a Ref never change, so its kind without
 * attributes is kept in the Ref and reused while it has none; its
 * attributes are read afresh every time (they may change).  Runs no Python code (deref calls it with the collector
 * paused); whether attribute values are hashable is for the caller to
 * check, after its loop.  On error returns NULL with *err set to 1.
 */
PyObject *
refx_ref_kind(refx_state *st, RefObject *ref, int *err)
{
    *err = 0;
    PyTypeObject *tp = Py_TYPE(ref);
    if (tp == st->Ref_Type && ref->metadata == NULL) {
        return NULL;
    }
    /* a subclass's attributes can change at any time: look every time */
    PyObject *attrs = NULL, *d = refx_ref_instance_dict(st, (PyObject *)ref);
    if (d == NULL && ref->kind != NULL &&
        PyTuple_GET_ITEM(ref->kind, 0) == (PyObject *)tp) {
        return Py_NewRef(ref->kind); /* (type, metadata, ()); a __class__
                                        assignment makes it anew */
    }
    if (d != NULL) {
        PyObject *items = PyDict_Items(d);
        Py_DECREF(d);
        attrs = items != NULL ? entries_from_items(items) : NULL;
        if (attrs == NULL) {
            *err = 1;
            return NULL;
        }
    }
    PyObject *empty = PyTuple_New(0);
    PyObject *kind =
        empty == NULL
            ? NULL
            : PyTuple_Pack(3, tp,
                           ref->metadata != NULL ? ref->metadata : empty,
                           attrs != NULL ? attrs : empty);
    Py_XDECREF(empty);
    if (kind == NULL) {
        *err = 1;
    }
    else if (attrs == NULL) {
        Py_XSETREF(ref->kind, Py_NewRef(kind));
    }
    Py_XDECREF(attrs);
    return kind;
}

/* Do instances of tp have a __dict__?  (3.12+ manages it without an
 * offset.) */
static inline int
has_instance_dict(PyTypeObject *tp)
{
#ifdef Py_TPFLAGS_MANAGED_DICT
    if (tp->tp_flags & Py_TPFLAGS_MANAGED_DICT) {
        return 1;
    }
#endif
    return tp->tp_dictoffset != 0;
}

/* Check a kind read from aux data or a constructor: (a Ref subclass,
 * pairs, pairs).  0, or -1 with TypeError. */
int
refx_check_kind(refx_state *st, PyObject *kind, const char *fname)
{
    if (kind == NULL) {
        return 0;
    }
    if (!PyTuple_Check(kind) || PyTuple_GET_SIZE(kind) != 3 ||
        !PyType_Check(PyTuple_GET_ITEM(kind, 0)) ||
        !PyType_IsSubtype((PyTypeObject *)PyTuple_GET_ITEM(kind, 0),
                          st->Ref_Type) ||
        !PyTuple_Check(PyTuple_GET_ITEM(kind, 1)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(kind, 2))) {
        PyErr_Format(PyExc_TypeError,
                     "%s: a Ref's kind is (Ref subclass, metadata entries, "
                     "attribute entries), got %R",
                     fname, kind);
        return -1;
    }
    for (int part = 1; part < 3; part++) {
        PyObject *pairs = PyTuple_GET_ITEM(kind, part);
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pairs); i++) {
            PyObject *e = PyTuple_GET_ITEM(pairs, i);
            if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 ||
                !PyUnicode_Check(PyTuple_GET_ITEM(e, 0)) ||
                (PyObject *)Py_TYPE(PyTuple_GET_ITEM(e, 1)) !=
                    PyTuple_GET_ITEM(e, 2)) {
                PyErr_Format(PyExc_TypeError,
                             "%s: metadata and attributes are (name, value, "
                             "type(value)) entries, got %R",
                             fname, e);
                return -1;
            }
        }
    }
    PyTypeObject *tp = (PyTypeObject *)PyTuple_GET_ITEM(kind, 0);
    if (PyTuple_GET_SIZE(PyTuple_GET_ITEM(kind, 2)) != 0 &&
        !has_instance_dict(tp)) {
        PyErr_Format(PyExc_TypeError,
                     "%s: a kind of %.200s carries instance attributes, "
                     "which that class cannot hold (it has no __dict__)",
                     fname, tp->tp_name);
        return -1;
    }
    if (PyObject_Hash(kind) == -1) { /* it is aux data: jax.jit hashes it */
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s: a Ref's kind must be hashable (it is part of "
                         "the jit cache key), got %R",
                         fname, kind);
        }
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* the kinds of Value and Index                                         */
/* ------------------------------------------------------------------ */

/* The kind for Value(...)/Index(...)'s keywords ref_type and metadata (a
 * mapping, or None): NULL (no error) for a plain Ref. */
PyObject *
refx_kind_from_args(refx_state *st, PyObject *ref_type, PyObject *metadata,
                    const char *fname)
{
    if (ref_type == Py_None) {
        ref_type = (PyObject *)st->Ref_Type;
    }
    if (!PyType_Check(ref_type) ||
        !PyType_IsSubtype((PyTypeObject *)ref_type, st->Ref_Type)) {
        PyErr_Format(PyExc_TypeError,
                     "%s: ref_type must be Ref or a subclass of it, not %R",
                     fname, ref_type);
        return NULL;
    }
    PyObject *pairs = NULL;
    if (metadata != Py_None) {
        if (!PyMapping_Check(metadata) || PyTuple_Check(metadata) ||
            PyList_Check(metadata)) {
            PyErr_Format(PyExc_TypeError,
                         "%s: metadata must be a mapping or None, not %.200s",
                         fname, Py_TYPE(metadata)->tp_name);
            return NULL;
        }
        PyObject *d = PyDict_New();
        if (d == NULL || PyDict_Update(d, metadata) < 0) {
            Py_XDECREF(d);
            return NULL;
        }
        pairs = refx_metadata_from_dict(d, fname);
        Py_DECREF(d);
        if (pairs == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (ref_type == (PyObject *)st->Ref_Type && pairs == NULL) {
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    PyObject *kind =
        empty != NULL
            ? PyTuple_Pack(3, ref_type, pairs != NULL ? pairs : empty, empty)
            : NULL;
    Py_XDECREF(empty);
    Py_XDECREF(pairs);
    return kind;
}

/* ", ref_type=Param, sharding=..." for a kind, or "" */
PyObject *
refx_kind_repr(refx_state *st, PyObject *kind)
{
    if (kind == NULL) {
        return PyUnicode_FromString("");
    }
    PyObject *meta = refx_pairs_repr(PyTuple_GET_ITEM(kind, 1));
    if (meta == NULL) {
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)PyTuple_GET_ITEM(kind, 0);
    PyObject *res =
        tp == st->Ref_Type
            ? Py_NewRef(meta)
            : PyUnicode_FromFormat(", ref_type=%s%U", _PyType_Name(tp), meta);
    Py_DECREF(meta);
    return res;
}

/* Value/Index aux data, (index, collection) or (index, collection,
 * kind), checked: borrowed collection and kind (NULL: plain).  0, or -1
 * with TypeError/ValueError. */
int
refx_parse_aux(refx_state *st, PyObject *aux, const char *fname,
               Py_ssize_t *index, PyObject **collection, PyObject **kind)
{
    if (!PyTuple_Check(aux) ||
        (PyTuple_GET_SIZE(aux) != 2 && PyTuple_GET_SIZE(aux) != 3)) {
        PyErr_Format(PyExc_TypeError,
                     "%s: aux data must be (index, collection) or (index, "
                     "collection, kind)",
                     fname);
        return -1;
    }
    *collection = PyTuple_GET_ITEM(aux, 1);
    *kind = PyTuple_GET_SIZE(aux) == 3 ? PyTuple_GET_ITEM(aux, 2) : NULL;
    if (refx_check_hashable(*collection, fname, "collection") < 0 ||
        refx_check_kind(st, *kind, fname) < 0) {
        return -1;
    }
    return refx_parse_index(PyTuple_GET_ITEM(aux, 0), fname, index);
}
