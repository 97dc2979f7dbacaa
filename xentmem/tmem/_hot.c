/* The page arena's hot loops in C: the page index's probe, a page's commit word, a get, a
 * new page's record, the page table's rehash and the rebuild's pass over every page record.
 *
 * Only loops live here; the rules (what a record means, when it counts, what is dropped and
 * why, the allocators, the object table) stay in xentmem/tmem/index.py and arena.py, which
 * call these functions with their arrays and the arena's map.  The record layout below is
 * index.py's (PAGE_ALL, "<IIIHHI"); index.py checks PAGE_RECORD against it at import.
 * Every field read from the file is untrusted: each slot, offset and length is checked
 * against the map's size before it is used, and a record that does not fit reads as a
 * failed page, never as memory outside the map.  docs/page-arena.md describes the format.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A page record: object slot u32, index u32, where u32, length u16, sub u16, commit u32. */
#define PAGE_RECORD 20
#define REC_OBJ 0
#define REC_INDEX 4
#define REC_WHERE 8
#define REC_LENGTH 12
#define REC_SUB 14
#define REC_COMMIT 16
/* A bucket: 5 bits of tag above the slot + 1 (27 bits); 0 empty, all ones removed. */
#define SLOT_BITS 27
#define SLOT_MASK ((1u << SLOT_BITS) - 1)
#define TAG_MASK (~SLOT_MASK)
#define TOMB 0xFFFFFFFFu
#define UNIT 16
#define PAGE 4096
#define SEED_K 0x9E3779B97F4A7C15ull

/* What the rebuild's pass says of a record it drops (arena.py words each one). */
enum { BAD_OBJECT = 1, BAD_LENGTH = 2, BAD_OUTSIDE = 3, BAD_CHECKSUM = 4, BAD_DUPLICATE = 5 };

static PyObject *digest_fn; /* xxhash.xxh3_64_intdigest: the one xxh3 the project uses */

static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void wr32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }

/* The page key's hash: splitmix64's finaliser of (object << 32 | index). */
static inline uint64_t page_hash(uint32_t obj, uint32_t index)
{
    uint64_t z = ((uint64_t)obj << 32) | index;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint32_t hash_tag(uint64_t h) { return (uint32_t)((h >> 40) & 31) << SLOT_BITS; }

/* The seed binding a page's checksum to its record: a record pointing elsewhere fails. */
static inline uint64_t page_seed(uint32_t obj, uint32_t index, uint32_t where, uint32_t length,
                                 uint32_t sub)
{
    return (((uint64_t)obj << 32) | index)
           ^ ((((uint64_t)where << 32) | ((uint64_t)sub << 16) | length) * SEED_K);
}

/* The commit word of a page's bytes: xxh3 seeded by its record, never 0.  -1 on error. */
static int64_t commit_of(PyObject *data, uint64_t seed)
{
    PyObject *seed_obj = PyLong_FromUnsignedLongLong(seed);
    if (seed_obj == NULL)
        return -1;
    PyObject *args[2] = {data, seed_obj};
    PyObject *res = PyObject_Vectorcall(digest_fn, args, 2, NULL);
    Py_DECREF(seed_obj);
    if (res == NULL)
        return -1;
    unsigned long long d = PyLong_AsUnsignedLongLongMask(res);
    Py_DECREF(res);
    if (d == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    uint32_t c = (uint32_t)d;
    return c ? c : 1;
}

/* -- argument helpers ---------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, int writable, Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(obj, &b->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    b->held = 1;
    if (itemsize > 1 && b->view.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: not an array of %zd-byte items", what, itemsize);
        return -1;
    }
    return 0;
}

static void put_buf(Buf *b)
{
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

static int as_u64(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int as_u32(PyObject *o, uint32_t *out)
{
    uint64_t v;
    if (as_u64(o, &v) < 0)
        return -1;
    if (v > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit in a u32");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int as_size(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return -1;
    }
    *out = v;
    return 0;
}

#define NARGS(n, name)                                                                       \
    if (nargs != (n)) {                                                                      \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (n), nargs); \
        return NULL;                                                                         \
    }

/* -- the probe ----------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t slot; /* -1: not found */
    Py_ssize_t at;   /* its bucket, or where to insert it */
    uint32_t tag;
    const unsigned char *rec; /* the record found */
} Found;

/* The bucket of page (obj, index) in ``table``, whose slots name records at ``pbase`` of
 * ``mm``.  -1 with an error set when a bucket names a record outside the map, or the table
 * has no empty bucket (it is never more than 70% full: a broken table). */
static int probe(const uint32_t *table, uint64_t mask, const unsigned char *mm, Py_ssize_t mmlen,
                 Py_ssize_t pbase, uint32_t obj, uint32_t index, Found *f)
{
    uint64_t h = page_hash(obj, index);
    uint64_t i = h & mask, step = ((h >> 17) | 1) & mask;
    uint32_t tag = hash_tag(h);
    Py_ssize_t spare = -1;
    f->tag = tag;
    for (uint64_t n = 0; n <= mask; n++) {
        uint32_t v = table[i];
        if (v == 0) {
            f->slot = -1;
            f->at = spare >= 0 ? spare : (Py_ssize_t)i;
            f->rec = NULL;
            return 0;
        }
        if (v == TOMB) {
            if (spare < 0)
                spare = (Py_ssize_t)i;
        } else if ((v & TAG_MASK) == tag) {
            Py_ssize_t slot = (Py_ssize_t)(v & SLOT_MASK) - 1;
            Py_ssize_t off = pbase + slot * PAGE_RECORD;
            if (slot < 0 || off + PAGE_RECORD > mmlen) {
                PyErr_SetString(PyExc_ValueError, "a bucket names a record outside the arena");
                return -1;
            }
            const unsigned char *rec = mm + off;
            if (rd32(rec + REC_OBJ) == obj && rd32(rec + REC_INDEX) == index) {
                f->slot = slot;
                f->at = (Py_ssize_t)i;
                f->rec = rec;
                return 0;
            }
        }
        i = (i + step) & mask;
    }
    if (spare >= 0) {
        f->slot = -1;
        f->at = spare;
        f->rec = NULL;
        return 0;
    }
    PyErr_SetString(PyExc_RuntimeError, "the page table has no free bucket");
    return -1;
}

static PyObject *record_tuple(const unsigned char *rec)
{
    return Py_BuildValue("(kkkkkk)", (unsigned long)rd32(rec + REC_OBJ),
                         (unsigned long)rd32(rec + REC_INDEX), (unsigned long)rd32(rec + REC_WHERE),
                         (unsigned long)rd16(rec + REC_LENGTH), (unsigned long)rd16(rec + REC_SUB),
                         (unsigned long)rd32(rec + REC_COMMIT));
}

/* find_page(table, mm, pbase, obj, index) -> (slot, record, bucket) | (-1, tag, bucket) */
static PyObject *hot_find_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(5, "find_page");
    Buf t = {0}, m = {0};
    Py_ssize_t pbase;
    uint32_t obj, index;
    PyObject *out = NULL;
    if (as_size(args[2], &pbase) < 0 || as_u32(args[3], &obj) < 0 || as_u32(args[4], &index) < 0)
        return NULL;
    if (get_buf(args[0], &t, 0, 4, "table") < 0 || get_buf(args[1], &m, 0, 1, "mm") < 0)
        goto done;
    Found f;
    if (probe(t.view.buf, (uint64_t)(t.view.len / 4) - 1, m.view.buf, m.view.len, pbase, obj,
              index, &f) < 0)
        goto done;
    if (f.slot >= 0) {
        PyObject *rec = record_tuple(f.rec);
        if (rec)
            out = Py_BuildValue("(nNn)", f.slot, rec, f.at);
    } else {
        out = Py_BuildValue("(nkn)", (Py_ssize_t)-1, (unsigned long)f.tag, f.at);
    }
done:
    put_buf(&t);
    put_buf(&m);
    return out;
}

/* page_commit(data, obj, index, where, length, sub) -> the commit word of a page */
static PyObject *hot_page_commit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(6, "page_commit");
    uint32_t obj, index, where, length, sub;
    if (as_u32(args[1], &obj) < 0 || as_u32(args[2], &index) < 0 || as_u32(args[3], &where) < 0
        || as_u32(args[4], &length) < 0 || as_u32(args[5], &sub) < 0)
        return NULL;
    int64_t c = commit_of(args[0], page_seed(obj, index, where, length, sub));
    if (c < 0)
        return NULL;
    return PyLong_FromLong((long)c);
}

/* copy_page(mm, pos, data, obj, index, where, sub) -> commit
 * A page's bytes copied to ``pos`` of the map, and their commit word (as page_commit). */
static PyObject *hot_copy_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(7, "copy_page");
    Buf m = {0}, d = {0};
    Py_ssize_t pos;
    uint32_t obj, index, where, sub;
    PyObject *out = NULL;
    if (as_size(args[1], &pos) < 0 || as_u32(args[3], &obj) < 0 || as_u32(args[4], &index) < 0
        || as_u32(args[5], &where) < 0 || as_u32(args[6], &sub) < 0)
        return NULL;
    if (get_buf(args[0], &m, 1, 1, "mm") < 0 || get_buf(args[2], &d, 0, 1, "data") < 0)
        goto done;
    if (d.view.len > PAGE || pos + d.view.len > m.view.len) {
        PyErr_SetString(PyExc_ValueError, "copy_page: the page does not fit there");
        goto done;
    }
    memcpy((char *)m.view.buf + pos, d.view.buf, (size_t)d.view.len);
    int64_t c = commit_of(args[2], page_seed(obj, index, where, (uint32_t)d.view.len, sub));
    if (c >= 0)
        out = PyLong_FromLong((long)c);
done:
    put_buf(&m);
    put_buf(&d);
    return out;
}

/* link_free(mm, pos, size, used) -> first
 * zsmalloc's free objects of the zspage at ``pos`` (objects of ``size`` bytes, one byte of
 * ``used`` each: nonzero in use) chained through their first two bytes, ascending, the last
 * naming 0xFFFF; the first free object's index (0xFFFF: none). */
static PyObject *hot_link_free(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4, "link_free");
    Buf m = {0}, u = {0};
    Py_ssize_t pos, size;
    PyObject *out = NULL;
    if (as_size(args[1], &pos) < 0 || as_size(args[2], &size) < 0)
        return NULL;
    if (get_buf(args[0], &m, 1, 1, "mm") < 0 || get_buf(args[3], &u, 0, 1, "used") < 0)
        goto done;
    const unsigned char *used = u.view.buf;
    Py_ssize_t count = u.view.len;
    if (size < 2 || count > 0xFFFF || pos + count * size > m.view.len) {
        PyErr_SetString(PyExc_ValueError, "link_free: the zspage does not fit in the arena");
        goto done;
    }
    unsigned char *base = (unsigned char *)m.view.buf + pos;
    Py_ssize_t prev = -1;
    uint16_t first = 0xFFFF;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (used[i])
            continue;
        if (prev < 0)
            first = (uint16_t)i;
        else
            wr16(base + prev * size, (uint16_t)i);
        prev = i;
    }
    if (prev >= 0)
        wr16(base + prev * size, 0xFFFF);
    out = PyLong_FromLong(first);
done:
    put_buf(&m);
    put_buf(&u);
    return out;
}

/* get_page(table, mm, pbase, dbase, obj, index, where) -> see below
 * ``where`` false (a get): the page's bytes, None when there is no such page, or (slot,
 * bucket) when its bytes fail their commit word or its record names bytes outside the map:
 * the page must be dropped, never served.  ``where`` true (an exclusive get, which drops
 * it): None, or (bytes or None, slot, bucket, sound). */
static PyObject *hot_get_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(7, "get_page");
    Buf t = {0}, m = {0};
    Py_ssize_t pbase, dbase;
    uint32_t obj, index;
    PyObject *out = NULL, *data = NULL;
    int where_too = PyObject_IsTrue(args[6]);
    if (where_too < 0 || as_size(args[2], &pbase) < 0 || as_size(args[3], &dbase) < 0
        || as_u32(args[4], &obj) < 0 || as_u32(args[5], &index) < 0)
        return NULL;
    if (get_buf(args[0], &t, 0, 4, "table") < 0 || get_buf(args[1], &m, 0, 1, "mm") < 0)
        goto done;
    Found f;
    const unsigned char *mm = m.view.buf;
    if (probe(t.view.buf, (uint64_t)(t.view.len / 4) - 1, mm, m.view.len, pbase, obj, index, &f)
        < 0)
        goto done;
    if (f.slot < 0) {
        Py_INCREF(Py_None);
        out = Py_None;
        goto done;
    }
    uint32_t where = rd32(f.rec + REC_WHERE), sub = rd16(f.rec + REC_SUB);
    uint32_t n = rd16(f.rec + REC_LENGTH), commit = rd32(f.rec + REC_COMMIT);
    Py_ssize_t at = dbase + (Py_ssize_t)where * UNIT;
    int sound = 0;
    if (n <= PAGE && at + (Py_ssize_t)n <= m.view.len) {
        data = PyBytes_FromStringAndSize((const char *)mm + at, n);
        if (data == NULL)
            goto done;
        int64_t c = commit_of(data, page_seed(obj, index, where, n, sub));
        if (c < 0)
            goto done;
        sound = (uint32_t)c == commit;
    }
    if (where_too) {
        out = Py_BuildValue("(OnnO)", sound ? data : Py_None, f.slot, f.at,
                            sound ? Py_True : Py_False);
    } else if (sound) {
        out = data;
        data = NULL;
    } else {
        out = Py_BuildValue("(nn)", f.slot, f.at);
    }
done:
    Py_XDECREF(data);
    put_buf(&t);
    put_buf(&m);
    return out;
}

/* Link page ``slot`` first in its object's list and count it. */
static void link_page(uint32_t *nxt, uint32_t *prv, uint32_t *head, uint32_t *count,
                      Py_ssize_t slot, uint32_t obj)
{
    uint32_t first = head[obj];
    nxt[slot] = first;
    prv[slot] = 0;
    if (first)
        prv[first - 1] = (uint32_t)slot + 1;
    head[obj] = (uint32_t)slot + 1;
    count[obj] += 1;
}

/* add_page(mm, pbase, slot, obj, index, where, length, sub, commit, table, bucket, tag,
 *          next, prev, obj_head, obj_pages) -> None
 * A new page's record written, its commit word last; linked first in its object's list;
 * its bucket set.  The arrays must already cover the slot and the object. */
static PyObject *hot_add_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(16, "add_page");
    Buf m = {0}, t = {0}, nx = {0}, pv = {0}, hd = {0}, ct = {0};
    Py_ssize_t pbase, slot, at;
    uint32_t obj, index, where, length, sub, commit, tag;
    PyObject *out = NULL;
    if (as_size(args[1], &pbase) < 0 || as_size(args[2], &slot) < 0 || as_u32(args[3], &obj) < 0
        || as_u32(args[4], &index) < 0 || as_u32(args[5], &where) < 0
        || as_u32(args[6], &length) < 0 || as_u32(args[7], &sub) < 0
        || as_u32(args[8], &commit) < 0 || as_size(args[10], &at) < 0
        || as_u32(args[11], &tag) < 0)
        return NULL;
    if (get_buf(args[0], &m, 1, 1, "mm") < 0 || get_buf(args[9], &t, 1, 4, "table") < 0
        || get_buf(args[12], &nx, 1, 4, "next") < 0 || get_buf(args[13], &pv, 1, 4, "prev") < 0
        || get_buf(args[14], &hd, 1, 4, "obj_head") < 0
        || get_buf(args[15], &ct, 1, 4, "obj_pages") < 0)
        goto done;
    if (length > 0xFFFF || sub > 0xFFFF || pbase + (slot + 1) * PAGE_RECORD > m.view.len
        || slot >= nx.view.len / 4 || slot >= pv.view.len / 4 || obj >= hd.view.len / 4
        || obj >= ct.view.len / 4 || at >= t.view.len / 4) {
        PyErr_SetString(PyExc_IndexError, "add_page: a slot, object or bucket out of range");
        goto done;
    }
    unsigned char *rec = (unsigned char *)m.view.buf + pbase + slot * PAGE_RECORD;
    wr32(rec + REC_OBJ, obj);
    wr32(rec + REC_INDEX, index);
    wr32(rec + REC_WHERE, where);
    wr16(rec + REC_LENGTH, (uint16_t)length);
    wr16(rec + REC_SUB, (uint16_t)sub);
    wr32(rec + REC_COMMIT, commit);
    link_page(nx.view.buf, pv.view.buf, hd.view.buf, ct.view.buf, slot, obj);
    ((uint32_t *)t.view.buf)[at] = (tag & TAG_MASK) | ((uint32_t)slot + 1);
    Py_INCREF(Py_None);
        out = Py_None;
done:
    put_buf(&m);
    put_buf(&t);
    put_buf(&nx);
    put_buf(&pv);
    put_buf(&hd);
    put_buf(&ct);
    return out;
}

/* Place slot's key in a table known to hold no removed bucket and not that key. */
static void place(uint32_t *table, uint64_t mask, uint32_t obj, uint32_t index, Py_ssize_t slot)
{
    uint64_t h = page_hash(obj, index);
    uint64_t i = h & mask, step = ((h >> 17) | 1) & mask;
    while (table[i])
        i = (i + step) & mask;
    table[i] = hash_tag(h) | ((uint32_t)slot + 1);
}

/* rehash_pages(fresh, mm, pbase, old) -> count
 * Every page named by ``old`` (a table of buckets), placed in the empty table ``fresh``. */
static PyObject *hot_rehash_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4, "rehash_pages");
    Buf fr = {0}, m = {0}, old = {0};
    Py_ssize_t pbase, count = 0;
    PyObject *out = NULL;
    if (as_size(args[2], &pbase) < 0)
        return NULL;
    if (get_buf(args[0], &fr, 1, 4, "fresh") < 0 || get_buf(args[1], &m, 0, 1, "mm") < 0
        || get_buf(args[3], &old, 0, 4, "old") < 0)
        goto done;
    uint32_t *fresh = fr.view.buf;
    uint64_t mask = (uint64_t)(fr.view.len / 4) - 1;
    const uint32_t *src = old.view.buf;
    const unsigned char *mm = m.view.buf;
    Py_ssize_t n = old.view.len / 4;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint32_t v = src[k];
        if (!v || v == TOMB)
            continue;
        Py_ssize_t slot = (Py_ssize_t)(v & SLOT_MASK) - 1;
        Py_ssize_t off = pbase + slot * PAGE_RECORD;
        if (slot < 0 || off + PAGE_RECORD > m.view.len) {
            PyErr_SetString(PyExc_ValueError, "a bucket names a record outside the arena");
            goto done;
        }
        if (count >= (Py_ssize_t)mask) {
            PyErr_SetString(PyExc_ValueError, "rehash_pages: the new table is too small");
            goto done;
        }
        place(fresh, mask, rd32(mm + off + REC_OBJ), rd32(mm + off + REC_INDEX), slot);
        count++;
    }
    out = PyLong_FromSsize_t(count);
done:
    put_buf(&fr);
    put_buf(&m);
    put_buf(&old);
    return out;
}

/* rehash_records(fresh, mm, pbase, hwm) -> count
 * Every committed record of the ``hwm`` slots at ``pbase``, placed in the empty ``fresh``. */
static PyObject *hot_rehash_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4, "rehash_records");
    Buf fr = {0}, m = {0};
    Py_ssize_t pbase, hwm, count = 0;
    PyObject *out = NULL;
    if (as_size(args[2], &pbase) < 0 || as_size(args[3], &hwm) < 0)
        return NULL;
    if (get_buf(args[0], &fr, 1, 4, "fresh") < 0 || get_buf(args[1], &m, 0, 1, "mm") < 0)
        goto done;
    if (pbase + hwm * PAGE_RECORD > m.view.len) {
        PyErr_SetString(PyExc_ValueError, "rehash_records: records beyond the arena");
        goto done;
    }
    uint32_t *fresh = fr.view.buf;
    uint64_t mask = (uint64_t)(fr.view.len / 4) - 1;
    const unsigned char *rec = (const unsigned char *)m.view.buf + pbase;
    for (Py_ssize_t slot = 0; slot < hwm; slot++, rec += PAGE_RECORD) {
        if (!rd32(rec + REC_COMMIT))
            continue;
        if (count >= (Py_ssize_t)mask) {
            PyErr_SetString(PyExc_ValueError, "rehash_records: the new table is too small");
            goto done;
        }
        place(fresh, mask, rd32(rec + REC_OBJ), rd32(rec + REC_INDEX), slot);
        count++;
    }
    out = PyLong_FromSsize_t(count);
done:
    put_buf(&fr);
    put_buf(&m);
    return out;
}

/* scan_pages(mm, pbase, hwm, dbase, data_end, valid_obj, table, next, prev, obj_head,
 *            obj_pages) -> (free, kept, stored, dropped)
 * The rebuild's pass over every page record below ``hwm``: a record with no commit word is
 * free (its slot in ``free``, an array('I') of bytes); one whose object is not in
 * ``valid_obj`` (a byte per object slot), whose length is over a page, whose bytes lie
 * beyond ``data_end`` of the data region, whose bytes fail its commit word, or whose key
 * was seen already is dropped: (slot, object, index, why) in ``dropped``; the others are
 * placed in ``table`` (empty, sized for them all) and linked in their object's list:
 * ``kept`` (their slots, as array('I') bytes) and ``stored`` (their bytes).  The caller
 * zeroes the dropped records' commit words and claims the kept pages' bytes. */
static PyObject *hot_scan_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(11, "scan_pages");
    Buf m = {0}, vo = {0}, t = {0}, nx = {0}, pv = {0}, hd = {0}, ct = {0};
    Py_ssize_t pbase, hwm, dbase, data_end;
    PyObject *out = NULL, *dropped = NULL, *page = NULL;
    uint32_t *freel = NULL, *kept = NULL;
    Py_ssize_t nfree = 0, nkept = 0;
    unsigned long long stored = 0;
    if (as_size(args[1], &pbase) < 0 || as_size(args[2], &hwm) < 0 || as_size(args[3], &dbase) < 0
        || as_size(args[4], &data_end) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0 || get_buf(args[5], &vo, 0, 1, "valid_obj") < 0
        || get_buf(args[6], &t, 1, 4, "table") < 0 || get_buf(args[7], &nx, 1, 4, "next") < 0
        || get_buf(args[8], &pv, 1, 4, "prev") < 0 || get_buf(args[9], &hd, 1, 4, "obj_head") < 0
        || get_buf(args[10], &ct, 1, 4, "obj_pages") < 0)
        goto done;
    const unsigned char *mm = m.view.buf;
    Py_ssize_t mmlen = m.view.len;
    if (pbase + hwm * PAGE_RECORD > mmlen || dbase + data_end > mmlen || hwm > nx.view.len / 4
        || hwm > pv.view.len / 4 || vo.view.len > hd.view.len / 4 || vo.view.len > ct.view.len / 4) {
        PyErr_SetString(PyExc_ValueError, "scan_pages: regions or arrays out of range");
        goto done;
    }
    uint32_t *table = t.view.buf;
    uint64_t mask = (uint64_t)(t.view.len / 4) - 1;
    const unsigned char *valid = vo.view.buf;
    Py_ssize_t nobj = vo.view.len;
    freel = PyMem_Malloc(sizeof(uint32_t) * (size_t)(hwm ? hwm : 1));
    kept = PyMem_Malloc(sizeof(uint32_t) * (size_t)(hwm ? hwm : 1));
    dropped = PyList_New(0);
    if (!freel || !kept || !dropped) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t placed = 0;
    for (Py_ssize_t slot = 0; slot < hwm; slot++) {
        const unsigned char *rec = mm + pbase + slot * PAGE_RECORD;
        uint32_t commit = rd32(rec + REC_COMMIT);
        if (!commit) {
            freel[nfree++] = (uint32_t)slot;
            continue;
        }
        uint32_t obj = rd32(rec + REC_OBJ), index = rd32(rec + REC_INDEX);
        uint32_t where = rd32(rec + REC_WHERE), n = rd16(rec + REC_LENGTH), sub = rd16(rec + REC_SUB);
        Py_ssize_t offset = (Py_ssize_t)where * UNIT;
        int why = 0;
        Found f = {0};
        if (obj >= nobj || !valid[obj]) {
            why = BAD_OBJECT;
        } else if (n > PAGE) {
            why = BAD_LENGTH;
        } else if (offset + (Py_ssize_t)n > data_end) {
            why = BAD_OUTSIDE;
        } else {
            page = PyMemoryView_FromMemory((char *)mm + dbase + offset, n, PyBUF_READ);
            if (page == NULL)
                goto done;
            int64_t c = commit_of(page, page_seed(obj, index, where, n, sub));
            Py_CLEAR(page);
            if (c < 0)
                goto done;
            if ((uint32_t)c != commit) {
                why = BAD_CHECKSUM;
            } else {
                if (placed >= (Py_ssize_t)mask) {
                    PyErr_SetString(PyExc_ValueError, "scan_pages: the table is too small");
                    goto done;
                }
                if (probe(table, mask, mm, mmlen, pbase, obj, index, &f) < 0)
                    goto done;
                if (f.slot >= 0)
                    why = BAD_DUPLICATE;
            }
        }
        if (why) {
            PyObject *item = Py_BuildValue("(nkki)", slot, (unsigned long)obj,
                                           (unsigned long)index, why);
            if (item == NULL || PyList_Append(dropped, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
            continue;
        }
        table[f.at] = f.tag | ((uint32_t)slot + 1);
        placed++;
        link_page(nx.view.buf, pv.view.buf, hd.view.buf, ct.view.buf, slot, obj);
        kept[nkept++] = (uint32_t)slot;
        stored += n;
    }
    out = Py_BuildValue("(y#y#KN)", (const char *)freel, nfree * (Py_ssize_t)sizeof(uint32_t),
                        (const char *)kept, nkept * (Py_ssize_t)sizeof(uint32_t), stored, dropped);
    dropped = NULL;
done:
    Py_XDECREF(dropped);
    Py_XDECREF(page);
    PyMem_Free(freel);
    PyMem_Free(kept);
    put_buf(&m);
    put_buf(&vo);
    put_buf(&t);
    put_buf(&nx);
    put_buf(&pv);
    put_buf(&hd);
    put_buf(&ct);
    return out;
}

/* The slots of an object's pages, from its first page's slot + 1 through ``next``. */
static int walk(const uint32_t *nxt, Py_ssize_t n, uint32_t link, void *ctx,
                int (*visit)(Py_ssize_t slot, void *ctx))
{
    for (Py_ssize_t steps = 0; link; steps++) {
        Py_ssize_t slot = (Py_ssize_t)link - 1;
        if (slot >= n || steps >= n) {
            PyErr_SetString(PyExc_ValueError, "an object's page list is broken");
            return -1;
        }
        if (visit(slot, ctx) < 0)
            return -1;
        link = nxt[slot];
    }
    return 0;
}

static int visit_append(Py_ssize_t slot, void *ctx)
{
    PyObject *v = PyLong_FromSsize_t(slot);
    if (v == NULL)
        return -1;
    int rc = PyList_Append((PyObject *)ctx, v);
    Py_DECREF(v);
    return rc;
}

typedef struct {
    PyObject *dict;
    const unsigned char *mm;
    Py_ssize_t mmlen, pbase;
} SizesCtx;

static int visit_size(Py_ssize_t slot, void *ctx)
{
    SizesCtx *c = ctx;
    Py_ssize_t off = c->pbase + slot * PAGE_RECORD;
    if (off + PAGE_RECORD > c->mmlen) {
        PyErr_SetString(PyExc_ValueError, "a page list names a record outside the arena");
        return -1;
    }
    PyObject *k = PyLong_FromUnsignedLong(rd32(c->mm + off + REC_INDEX));
    PyObject *v = PyLong_FromLong(rd16(c->mm + off + REC_LENGTH));
    int rc = (k && v) ? PyDict_SetItem(c->dict, k, v) : -1;
    Py_XDECREF(k);
    Py_XDECREF(v);
    return rc;
}

/* object_pages(next, head) -> [slot, ...]: an object's pages, ``head`` its first's slot + 1 */
static PyObject *hot_object_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(2, "object_pages");
    Buf nx = {0};
    uint32_t head;
    PyObject *out = NULL, *list = NULL;
    if (as_u32(args[1], &head) < 0 || get_buf(args[0], &nx, 0, 4, "next") < 0)
        goto done;
    list = PyList_New(0);
    if (list == NULL || walk(nx.view.buf, nx.view.len / 4, head, list, visit_append) < 0)
        goto done;
    out = list;
    list = NULL;
done:
    Py_XDECREF(list);
    put_buf(&nx);
    return out;
}

/* object_sizes(mm, pbase, next, head) -> {index: length} of an object's pages */
static PyObject *hot_object_sizes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4, "object_sizes");
    Buf m = {0}, nx = {0};
    Py_ssize_t pbase;
    uint32_t head;
    SizesCtx c = {0};
    PyObject *out = NULL;
    if (as_size(args[1], &pbase) < 0 || as_u32(args[3], &head) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0 || get_buf(args[2], &nx, 0, 4, "next") < 0)
        goto done;
    c.dict = PyDict_New();
    c.mm = m.view.buf;
    c.mmlen = m.view.len;
    c.pbase = pbase;
    if (c.dict == NULL || walk(nx.view.buf, nx.view.len / 4, head, &c, visit_size) < 0)
        goto done;
    out = c.dict;
    c.dict = NULL;
done:
    Py_XDECREF(c.dict);
    put_buf(&m);
    put_buf(&nx);
    return out;
}

static PyMethodDef hot_methods[] = {
    {"object_pages", (PyCFunction)(void (*)(void))hot_object_pages, METH_FASTCALL,
     "object_pages(next, head): the slots of an object's pages"},
    {"object_sizes", (PyCFunction)(void (*)(void))hot_object_sizes, METH_FASTCALL,
     "object_sizes(mm, pbase, next, head): {index: length} of an object's pages"},
    {"find_page", (PyCFunction)(void (*)(void))hot_find_page, METH_FASTCALL,
     "find_page(table, mm, pbase, obj, index): (slot, record, bucket) or (-1, tag, bucket)"},
    {"page_commit", (PyCFunction)(void (*)(void))hot_page_commit, METH_FASTCALL,
     "page_commit(data, obj, index, where, length, sub): a page's commit word"},
    {"copy_page", (PyCFunction)(void (*)(void))hot_copy_page, METH_FASTCALL,
     "copy_page(mm, pos, data, obj, index, where, sub): the bytes copied, their commit word"},
    {"link_free", (PyCFunction)(void (*)(void))hot_link_free, METH_FASTCALL,
     "link_free(mm, pos, size, used): a zspage's free objects chained; the first"},
    {"get_page", (PyCFunction)(void (*)(void))hot_get_page, METH_FASTCALL,
     "get_page(table, mm, pbase, dbase, obj, index, where): a page's bytes, None, or "
     "(slot, bucket) when unsound; with where, None or (bytes, slot, bucket, sound)"},
    {"add_page", (PyCFunction)(void (*)(void))hot_add_page, METH_FASTCALL,
     "add_page(mm, pbase, slot, obj, index, where, length, sub, commit, table, bucket, tag, "
     "next, prev, obj_head, obj_pages): a new page's record, links and bucket"},
    {"rehash_pages", (PyCFunction)(void (*)(void))hot_rehash_pages, METH_FASTCALL,
     "rehash_pages(fresh, mm, pbase, old): the pages of table old placed in fresh"},
    {"rehash_records", (PyCFunction)(void (*)(void))hot_rehash_records, METH_FASTCALL,
     "rehash_records(fresh, mm, pbase, hwm): every committed record placed in fresh"},
    {"scan_pages", (PyCFunction)(void (*)(void))hot_scan_pages, METH_FASTCALL,
     "scan_pages(mm, pbase, hwm, dbase, data_end, valid_obj, table, next, prev, obj_head, "
     "obj_pages): (free, kept, stored, dropped), the rebuild's pass"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hot_module = {
    PyModuleDef_HEAD_INIT, "xentmem.tmem._hot",
    "The page arena's hot loops (xentmem/tmem/_hot.c; the rules are in index.py and arena.py).",
    -1, hot_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hot(void)
{
    PyObject *xxhash = PyImport_ImportModule("xxhash");
    if (xxhash == NULL)
        return NULL;
    digest_fn = PyObject_GetAttrString(xxhash, "xxh3_64_intdigest");
    Py_DECREF(xxhash);
    if (digest_fn == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&hot_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "PAGE_RECORD", PAGE_RECORD) < 0
        || PyModule_AddIntConstant(m, "SLOT_BITS", SLOT_BITS) < 0
        || PyModule_AddIntConstant(m, "UNIT", UNIT) < 0
        || PyModule_AddIntConstant(m, "BAD_OBJECT", BAD_OBJECT) < 0
        || PyModule_AddIntConstant(m, "BAD_LENGTH", BAD_LENGTH) < 0
        || PyModule_AddIntConstant(m, "BAD_OUTSIDE", BAD_OUTSIDE) < 0
        || PyModule_AddIntConstant(m, "BAD_CHECKSUM", BAD_CHECKSUM) < 0
        || PyModule_AddIntConstant(m, "BAD_DUPLICATE", BAD_DUPLICATE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
