/*
 * ptrmap.h: a pointer-keyed hash map for per-call identity tables.
 *
 * deref and update_refs must recognise the same Ref at several leaves.
 * A PyDict would do, but these maps hold borrowed pointers for the span
 * of one call during which no Python code runs (deref) or the objects are
 * kept alive by the flattened leaves list (update), so a plain
 * open-addressing table keyed by address is both safe and several times
 * cheaper than dict lookups.  Small maps live in an inline buffer; the
 * load factor stays under 1/2.  Entries are never removed.
 *
 * Everything here is static inline: the map is used in the hot loops of
 * several files and is small.
 */
#ifndef REFX_PTRMAP_H
#define REFX_PTRMAP_H

#include "refx.h"

typedef struct {
    void *key;
    Py_ssize_t value;
    PyObject *obj; /* borrowed, for the caller's use; the map never owns it */
} refx_ptrmap_entry;

#define REFX_PTRMAP_INLINE 64

typedef struct {
    refx_ptrmap_entry *entries;
    Py_ssize_t mask; /* capacity - 1; capacity is a power of two */
    Py_ssize_t used;
    refx_ptrmap_entry inline_entries[REFX_PTRMAP_INLINE];
} refx_ptrmap;

static inline void
refx_ptrmap_init(refx_ptrmap *m)
{
    m->entries = m->inline_entries;
    m->mask = REFX_PTRMAP_INLINE - 1;
    m->used = 0;
    memset(m->inline_entries, 0, sizeof(m->inline_entries));
}

static inline void
refx_ptrmap_fini(refx_ptrmap *m)
{
    if (m->entries != m->inline_entries) {
        PyMem_Free(m->entries);
    }
    m->entries = m->inline_entries;
}

static inline size_t
refx_ptr_hash(void *p)
{
    /* objects are 16-byte aligned: drop the low bits, then mix */
    uint64_t x = (uint64_t)(uintptr_t)p >> 4;
    x *= 0x9E3779B97F4A7C15ull;
    return (size_t)(x ^ (x >> 29));
}

static inline int
refx_ptrmap_grow(refx_ptrmap *m)
{
    Py_ssize_t newcap = (m->mask + 1) * 2;
    if (newcap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(refx_ptrmap_entry)) {
        PyErr_NoMemory();
        return -1;
    }
    refx_ptrmap_entry *ne = PyMem_Calloc((size_t)newcap, sizeof(*ne));
    if (ne == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t nmask = (size_t)newcap - 1;
    for (Py_ssize_t i = 0; i <= m->mask; i++) {
        refx_ptrmap_entry *e = &m->entries[i];
        if (e->key != NULL) {
            size_t j = refx_ptr_hash(e->key) & nmask;
            while (ne[j].key != NULL) {
                j = (j + 1) & nmask;
            }
            ne[j] = *e;
        }
    }
    if (m->entries != m->inline_entries) {
        PyMem_Free(m->entries);
    }
    m->entries = ne;
    m->mask = (Py_ssize_t)nmask;
    return 0;
}

static inline refx_ptrmap_entry *
refx_ptrmap_get(refx_ptrmap *m, void *key, int *found)
{
    /* keep the load factor under 1/2 */
    if ((m->used + 1) * 2 > m->mask + 1) {
        if (refx_ptrmap_grow(m) < 0) {
            return NULL;
        }
    }
    size_t mask = (size_t)m->mask;
    size_t j = refx_ptr_hash(key) & mask;
    for (;;) {
        refx_ptrmap_entry *e = &m->entries[j];
        if (e->key == key) {
            *found = 1;
            return e;
        }
        if (e->key == NULL) {
            e->key = key;
            e->value = -1;
            e->obj = NULL;
            m->used++;
            *found = 0;
            return e;
        }
        j = (j + 1) & mask;
    }
}

#endif /* REFX_PTRMAP_H */
