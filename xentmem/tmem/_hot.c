/* The page arena's hot loops in C: the page index's probe, a page's commit word, a get, a
 * new page's record, the page table's rehash, the rebuild's pass over every page record and
 * its claim of every kept page's bytes in the allocator's frames.
 *
 * Only loops live here; the rules (what a record means, when it counts, what is dropped and
 * why, the allocators' choices, the object table) stay in xentmem/tmem/index.py, arena.py,
 * zbud.py and zsmalloc.py, which call these functions with their arrays and the arena's map
 * (the claims follow the allocators' layouts, whose constants the modules check at import).  The record layout below is
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

/* A frame whose memory was given back (frames.py's UNBACKED): the rebuild never reads it. */
#define FRAME_UNBACKED 5

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

/* get_page(table, mm, pbase, dbase, obj, index) -> the page's bytes, None when there is no
 * such page, or (slot, bucket) when its bytes fail their commit word or its record names
 * bytes outside the map: the page must be dropped, never served.  (An exclusive get is
 * take_page.) */
static PyObject *hot_get_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(6, "get_page");
    Buf t = {0}, m = {0};
    Py_ssize_t pbase, dbase;
    uint32_t obj, index;
    PyObject *out = NULL, *data = NULL;
    if (as_size(args[2], &pbase) < 0 || as_size(args[3], &dbase) < 0
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
    if (sound) {
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

/* take_page(table, mm, pbase, dbase, obj, index, next, prev, obj_head, obj_pages) -> below
 * An exclusive get in one call: the page's record found, its bytes copied out and checked
 * against its commit word, then the page dropped from the index: its commit word zeroed
 * (from here a crash finds no page), its bucket marked removed, its slot unlinked from its
 * object's list, the object's count lowered.  None when there is no such page; (slot,
 * bucket) when its bytes fail their commit word or its record names bytes outside the map
 * (nothing changed: the caller drops it as a failed page, never serves it); else (bytes,
 * slot, where, length, sub, pages its object still holds).  Its bytes are the caller's to
 * give back to the allocator; a slot or object past the arrays is refused before anything
 * is written. */
static PyObject *hot_take_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(10, "take_page");
    Buf t = {0}, m = {0}, nx = {0}, pv = {0}, hd = {0}, ct = {0};
    Py_ssize_t pbase, dbase;
    uint32_t obj, index;
    PyObject *out = NULL, *data = NULL;
    if (as_size(args[2], &pbase) < 0 || as_size(args[3], &dbase) < 0 || as_u32(args[4], &obj) < 0
        || as_u32(args[5], &index) < 0)
        return NULL;
    if (get_buf(args[0], &t, 1, 4, "table") < 0 || get_buf(args[1], &m, 1, 1, "mm") < 0
        || get_buf(args[6], &nx, 1, 4, "next") < 0 || get_buf(args[7], &pv, 1, 4, "prev") < 0
        || get_buf(args[8], &hd, 1, 4, "obj_head") < 0
        || get_buf(args[9], &ct, 1, 4, "obj_pages") < 0)
        goto done;
    Found f;
    unsigned char *mm = m.view.buf;
    if (probe(t.view.buf, (uint64_t)(t.view.len / 4) - 1, mm, m.view.len, pbase, obj, index, &f)
        < 0)
        goto done;
    if (f.slot < 0) {
        Py_INCREF(Py_None);
        out = Py_None;
        goto done;
    }
    Py_ssize_t slot = f.slot, nlinks = nx.view.len / 4;
    uint32_t *nxt = nx.view.buf, *prv = pv.view.buf, *head = hd.view.buf, *count = ct.view.buf;
    if (slot >= nlinks || slot >= pv.view.len / 4 || obj >= hd.view.len / 4
        || obj >= ct.view.len / 4) {
        PyErr_SetString(PyExc_IndexError, "take_page: a slot or object out of range");
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
    if (!sound) {
        out = Py_BuildValue("(nn)", slot, f.at);
        goto done;
    }
    uint32_t after = nxt[slot], before = prv[slot];
    if ((after && after > nlinks) || (before && before > nlinks)) {
        PyErr_SetString(PyExc_ValueError, "an object's page list is broken");
        goto done;
    }
    wr32(mm + pbase + slot * PAGE_RECORD + REC_COMMIT, 0); /* first: a crash finds no page */
    ((uint32_t *)t.view.buf)[f.at] = TOMB;
    if (before)
        nxt[before - 1] = after;
    else
        head[obj] = after;
    if (after)
        prv[after - 1] = before;
    uint32_t left = count[obj] ? count[obj] - 1 : 0;
    count[obj] = left;
    out = Py_BuildValue("(Onkkkk)", data, slot, (unsigned long)where, (unsigned long)n,
                        (unsigned long)sub, (unsigned long)left);
done:
    Py_XDECREF(data);
    put_buf(&t);
    put_buf(&m);
    put_buf(&nx);
    put_buf(&pv);
    put_buf(&hd);
    put_buf(&ct);
    return out;
}

/* page_sound(mm, pbase, dbase, slot) -> bool
 * Whether page record ``slot`` (at ``pbase`` of the map) has a commit word and its bytes
 * (at ``dbase``) match it: what a delete, or a put over the page, checks before its bytes
 * go back to the allocator (a record damaged in place must not free another page's
 * bytes).  A record or bytes outside the map are not sound. */
static PyObject *hot_page_sound(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(4, "page_sound");
    Buf m = {0};
    Py_ssize_t pbase, dbase, slot;
    PyObject *out = NULL, *page = NULL;
    if (as_size(args[1], &pbase) < 0 || as_size(args[2], &dbase) < 0
        || as_size(args[3], &slot) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0)
        goto done;
    const unsigned char *mm = m.view.buf;
    Py_ssize_t off = pbase + slot * PAGE_RECORD;
    int sound = 0;
    if (off + PAGE_RECORD <= m.view.len) {
        const unsigned char *rec = mm + off;
        uint32_t where = rd32(rec + REC_WHERE), sub = rd16(rec + REC_SUB);
        uint32_t n = rd16(rec + REC_LENGTH), commit = rd32(rec + REC_COMMIT);
        Py_ssize_t at = dbase + (Py_ssize_t)where * UNIT;
        if (commit && n <= PAGE && at + (Py_ssize_t)n <= m.view.len) {
            page = PyMemoryView_FromMemory((char *)mm + at, n, PyBUF_READ);
            if (page == NULL)
                goto done;
            int64_t c = commit_of(page, page_seed(rd32(rec + REC_OBJ), rd32(rec + REC_INDEX),
                                                  where, n, sub));
            if (c < 0)
                goto done;
            sound = (uint32_t)c == commit;
        }
    }
    out = PyBool_FromLong(sound);
done:
    Py_XDECREF(page);
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

/* scan_pages(mm, pbase, hwm, dbase, frames, valid_obj, table, next, prev, obj_head,
 *            obj_pages) -> (free, kept, stored, dropped)
 * The rebuild's pass over every page record below ``hwm``: a record with no commit word is
 * free (its slot in ``free``, an array('I') of bytes); one whose object is not in
 * ``valid_obj`` (a byte per object slot), whose length is over a page, whose bytes lie
 * beyond the frames of ``frames`` (the frame map, a byte a frame) or in a frame it marks
 * unbacked (memory given back: never read, which would take memory), whose bytes fail its
 * commit word, or whose key was seen already is dropped: (slot, object, index, why) in
 * ``dropped``; the others are
 * placed in ``table`` (empty, sized for them all) and linked in their object's list:
 * ``kept`` (their slots, as array('I') bytes) and ``stored`` (their bytes).  The caller
 * zeroes the dropped records' commit words and claims the kept pages' bytes. */
static PyObject *hot_scan_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(11, "scan_pages");
    Buf m = {0}, fr = {0}, vo = {0}, t = {0}, nx = {0}, pv = {0}, hd = {0}, ct = {0};
    Py_ssize_t pbase, hwm, dbase;
    PyObject *out = NULL, *dropped = NULL, *page = NULL;
    uint32_t *freel = NULL, *kept = NULL;
    Py_ssize_t nfree = 0, nkept = 0;
    unsigned long long stored = 0;
    if (as_size(args[1], &pbase) < 0 || as_size(args[2], &hwm) < 0 || as_size(args[3], &dbase) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0 || get_buf(args[4], &fr, 0, 1, "frames") < 0
        || get_buf(args[5], &vo, 0, 1, "valid_obj") < 0
        || get_buf(args[6], &t, 1, 4, "table") < 0 || get_buf(args[7], &nx, 1, 4, "next") < 0
        || get_buf(args[8], &pv, 1, 4, "prev") < 0 || get_buf(args[9], &hd, 1, 4, "obj_head") < 0
        || get_buf(args[10], &ct, 1, 4, "obj_pages") < 0)
        goto done;
    const unsigned char *mm = m.view.buf, *frames = fr.view.buf;
    Py_ssize_t mmlen = m.view.len, data_end = fr.view.len * PAGE;
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
        } else if (offset + (Py_ssize_t)n > data_end
                   || (n && (frames[offset / PAGE] == FRAME_UNBACKED
                             || frames[(offset + n - 1) / PAGE] == FRAME_UNBACKED))) {
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
    put_buf(&fr);
    put_buf(&vo);
    put_buf(&t);
    put_buf(&nx);
    put_buf(&pv);
    put_buf(&hd);
    put_buf(&ct);
    return out;
}

/* -- the rebuild's claims: every kept page's bytes marked taken in its allocator ---------- */

/* What holds a frame (frames.py's tags, one byte a frame). */
#define FRAME_FREE 0
#define FRAME_ZBUD 1
#define FRAME_HUGE 2
#define FRAME_ZS_HEAD 3
#define FRAME_ZS_TAIL 4
/* zbud's geometry (zbud.py's): 64-byte chunks, the first the header's, 63 for data. */
#define ZBUD_CHUNK_SHIFT 6
#define ZBUD_FIRST_AT 64
#define ZBUD_NCHUNKS 63
#define ZBUD_MAX_BUDDY (PAGE - 2 * 64)
/* zsmalloc's class ids (zsmalloc.py's ZS_SIZE_CLASSES) and a free object chain's end. */
#define ZS_CLASSES 255
#define ZS_NO_OBJECT 0xFFFF

/* The handle of kept page ``slot``: 0 when its record lies outside the map (the caller's
 * slots are untrusted too). */
static int read_handle(const unsigned char *mm, Py_ssize_t mmlen, Py_ssize_t pbase, uint32_t slot,
                       int64_t *offset, uint32_t *length, uint32_t *sub)
{
    Py_ssize_t off = pbase + (Py_ssize_t)slot * PAGE_RECORD;
    if (off + PAGE_RECORD > mmlen)
        return 0;
    const unsigned char *rec = mm + off;
    *offset = (int64_t)rd32(rec + REC_WHERE) * UNIT;
    *length = rd16(rec + REC_LENGTH);
    *sub = rd16(rec + REC_SUB);
    return 1;
}

/* The refused slots, as array('I') bytes. */
static PyObject *slots_bytes(const uint32_t *slots, Py_ssize_t n)
{
    return PyBytes_FromStringAndSize((const char *)slots, n * (Py_ssize_t)sizeof(uint32_t));
}

/* claim_zbud(mm, pbase, slots, state, first, last) -> (refused, zbud_frames, huge_frames)
 * zbud's claim of every page in ``slots`` (array('I'), in order: the first of two records
 * over the same bytes wins), as zbud.c lays buddies out: a first buddy right after the
 * header chunk, a last one ending at the frame's end, a page over the largest buddy a frame
 * of its own at offset 0.  A handle that is none of these, overlaps a claimed one, or lies
 * beyond ``state`` (the frame map, one tag a frame) is refused: its slot in ``refused``.
 * ``first``/``last`` (bytearrays, a frame each) get the buddies' chunks; ``state`` the
 * frames newly taken; the counts are of frames newly taken.  A page of no bytes (a zero
 * page) has nothing to claim; a slot whose record lies outside the map is refused. */
static PyObject *hot_claim_zbud(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(6, "claim_zbud");
    Buf m = {0}, s = {0}, st = {0}, fi = {0}, la = {0};
    Py_ssize_t pbase;
    uint32_t *refused = NULL;
    Py_ssize_t nrefused = 0, zbud = 0, huge = 0;
    PyObject *out = NULL, *rb = NULL;
    if (as_size(args[1], &pbase) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0 || get_buf(args[2], &s, 0, 4, "slots") < 0
        || get_buf(args[3], &st, 1, 1, "state") < 0 || get_buf(args[4], &fi, 1, 1, "first") < 0
        || get_buf(args[5], &la, 1, 1, "last") < 0)
        goto done;
    const unsigned char *mm = m.view.buf;
    const uint32_t *slots = s.view.buf;
    Py_ssize_t nslots = s.view.len / 4;
    unsigned char *state = st.view.buf, *first = fi.view.buf, *last = la.view.buf;
    int64_t nframes = st.view.len;
    if (fi.view.len < nframes)
        nframes = fi.view.len;
    if (la.view.len < nframes)
        nframes = la.view.len;
    refused = PyMem_Malloc(sizeof(uint32_t) * (size_t)(nslots ? nslots : 1));
    if (refused == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < nslots; k++) {
        int64_t offset;
        uint32_t n, sub;
        if (!read_handle(mm, m.view.len, pbase, slots[k], &offset, &n, &sub)) {
            refused[nrefused++] = slots[k];
            continue;
        }
        if (n == 0)
            continue; /* a zero page: no bytes to claim */
        int ok = 0;
        if (!sub && n <= PAGE) {
            int64_t frame = offset / PAGE, at = offset % PAGE;
            if (frame < nframes) {
                if (at == 0) {
                    if (n > ZBUD_MAX_BUDDY && state[frame] == FRAME_FREE) {
                        state[frame] = FRAME_HUGE;
                        huge++;
                        ok = 1;
                    }
                } else if (n <= ZBUD_MAX_BUDDY) {
                    uint32_t chunks = (n + (1u << ZBUD_CHUNK_SHIFT) - 1) >> ZBUD_CHUNK_SHIFT;
                    int is_first = at == ZBUD_FIRST_AT;
                    unsigned char tag = state[frame];
                    if ((is_first || at == PAGE - ((int64_t)chunks << ZBUD_CHUNK_SHIFT))
                        && (tag == FRAME_FREE || tag == FRAME_ZBUD)) {
                        unsigned char *mine = is_first ? first + frame : last + frame;
                        unsigned char other = is_first ? last[frame] : first[frame];
                        if (!*mine && chunks + other <= ZBUD_NCHUNKS) {
                            if (tag == FRAME_FREE) {
                                state[frame] = FRAME_ZBUD;
                                zbud++;
                            }
                            *mine = (unsigned char)chunks;
                            ok = 1;
                        }
                    }
                }
            }
        }
        if (!ok)
            refused[nrefused++] = slots[k];
    }
    rb = slots_bytes(refused, nrefused);
    if (rb != NULL)
        out = Py_BuildValue("(Nnn)", rb, zbud, huge);
done:
    PyMem_Free(refused);
    put_buf(&m);
    put_buf(&s);
    put_buf(&st);
    put_buf(&fi);
    put_buf(&la);
    return out;
}

/* claim_zsmalloc(mm, pbase, slots, state, class_of, inuse, used, by_size, sizes, pages,
 *                objs, counts) -> (refused, frames)
 * zsmalloc's claim of every page in ``slots`` (in order: the first of two records over
 * the same object wins).  A page of n bytes is object ``sub`` of a zspage of class
 * ``by_size[n]`` (array('H'), 4097 entries) whose first frame is where its bytes start
 * less ``sub`` objects; ``sizes``, ``pages``, ``objs`` (array('H') by class id) give the
 * class's object size, frames and objects per zspage.  The zspage's frames are taken in
 * ``state`` the first time one of its objects is claimed (all must be free), its class
 * written in ``class_of`` (id + 1, array('H') by first frame); ``inuse`` counts its
 * objects; ``used`` (a bytearray, a bit for each 16 bytes of the data region) marks the
 * objects claimed.  A zero page (no bytes) has nothing to claim.  A record outside the
 * map, a length over a page, an object index past its class's, a zspage not on a frame
 * boundary, frames taken by something else, another class at that zspage, an object
 * claimed already or anything beyond the arrays is refused.
 * ``counts`` (array('I'), 2 a class id): zspages and objects newly claimed; ``frames``:
 * the frames newly taken. */
static PyObject *hot_claim_zsmalloc(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(12, "claim_zsmalloc");
    Buf m = {0}, s = {0}, st = {0}, co = {0}, iu = {0}, us = {0}, bs = {0}, sz = {0}, pg = {0},
        ob = {0}, ct = {0};
    Py_ssize_t pbase;
    uint32_t *refused = NULL;
    Py_ssize_t nrefused = 0, frames = 0;
    PyObject *out = NULL, *rb = NULL;
    if (as_size(args[1], &pbase) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0 || get_buf(args[2], &s, 0, 4, "slots") < 0
        || get_buf(args[3], &st, 1, 1, "state") < 0
        || get_buf(args[4], &co, 1, 2, "class_of") < 0 || get_buf(args[5], &iu, 1, 2, "inuse") < 0
        || get_buf(args[6], &us, 1, 1, "used") < 0 || get_buf(args[7], &bs, 0, 2, "by_size") < 0
        || get_buf(args[8], &sz, 0, 2, "sizes") < 0 || get_buf(args[9], &pg, 0, 2, "pages") < 0
        || get_buf(args[10], &ob, 0, 2, "objs") < 0 || get_buf(args[11], &ct, 1, 4, "counts") < 0)
        goto done;
    if (bs.view.len / 2 < PAGE + 1 || sz.view.len / 2 < ZS_CLASSES || pg.view.len / 2 < ZS_CLASSES
        || ob.view.len / 2 < ZS_CLASSES || ct.view.len / 4 < 2 * ZS_CLASSES) {
        PyErr_SetString(PyExc_ValueError, "claim_zsmalloc: a class table is too short");
        goto done;
    }
    const unsigned char *mm = m.view.buf;
    const uint32_t *slots = s.view.buf;
    Py_ssize_t nslots = s.view.len / 4;
    unsigned char *state = st.view.buf, *used = us.view.buf;
    uint16_t *class_of = co.view.buf, *inuse = iu.view.buf;
    const uint16_t *by_size = bs.view.buf, *sizes = sz.view.buf, *cpages = pg.view.buf,
                   *cobjs = ob.view.buf;
    uint32_t *counts = ct.view.buf;
    int64_t nstate = st.view.len, nheads = co.view.len / 2;
    if (iu.view.len / 2 < nheads)
        nheads = iu.view.len / 2;
    int64_t nbits = (int64_t)us.view.len * 8;
    refused = PyMem_Malloc(sizeof(uint32_t) * (size_t)(nslots ? nslots : 1));
    if (refused == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < nslots; k++) {
        int64_t offset;
        uint32_t n, idx;
        if (!read_handle(mm, m.view.len, pbase, slots[k], &offset, &n, &idx)) {
            refused[nrefused++] = slots[k];
            continue;
        }
        if (n == 0)
            continue; /* a zero page: no bytes to claim */
        int ok = 0;
        if (n <= PAGE) {
            uint32_t cid = by_size[n];
            int64_t size = cid < ZS_CLASSES ? sizes[cid] : 0;
            int64_t npages = cid < ZS_CLASSES ? cpages[cid] : 0;
            int64_t base = offset - (int64_t)idx * size;
            int64_t head = base / PAGE, unit = offset / UNIT;
            if (size >= n && npages && idx < cobjs[cid] && base >= 0 && base % PAGE == 0
                && head < nheads && head + npages <= nstate && unit < nbits
                && !(used[unit >> 3] & (1u << (unit & 7)))) {
                if (class_of[head] == 0) {
                    int64_t f = head;
                    while (f < head + npages && state[f] == FRAME_FREE)
                        f++;
                    if (f == head + npages) {
                        state[head] = FRAME_ZS_HEAD;
                        for (f = head + 1; f < head + npages; f++)
                            state[f] = FRAME_ZS_TAIL;
                        frames += npages;
                        class_of[head] = (uint16_t)(cid + 1);
                        counts[2 * cid] += 1;
                        ok = 1;
                    }
                } else {
                    ok = class_of[head] == cid + 1;
                }
                if (ok) {
                    used[unit >> 3] |= (unsigned char)(1u << (unit & 7));
                    inuse[head] += 1;
                    counts[2 * cid + 1] += 1;
                }
            }
        }
        if (!ok)
            refused[nrefused++] = slots[k];
    }
    rb = slots_bytes(refused, nrefused);
    if (rb != NULL)
        out = Py_BuildValue("(Nn)", rb, frames);
done:
    PyMem_Free(refused);
    put_buf(&m);
    put_buf(&s);
    put_buf(&st);
    put_buf(&co);
    put_buf(&iu);
    put_buf(&us);
    put_buf(&bs);
    put_buf(&sz);
    put_buf(&pg);
    put_buf(&ob);
    put_buf(&ct);
    return out;
}

/* link_zspages(mm, dbase, class_of, used, sizes, objs, freehead) -> zspages
 * After the claims: every zspage in ``class_of`` gets its free objects (those not marked in
 * ``used``) chained through their first two bytes, ascending, the last naming 0xFFFF, and
 * its first free object in ``freehead`` (0xFFFF: none), as link_free does for one. */
static PyObject *hot_link_zspages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(7, "link_zspages");
    Buf m = {0}, co = {0}, us = {0}, sz = {0}, ob = {0}, fh = {0};
    Py_ssize_t dbase, zspages = 0;
    PyObject *out = NULL;
    if (as_size(args[1], &dbase) < 0)
        return NULL;
    if (get_buf(args[0], &m, 1, 1, "mm") < 0 || get_buf(args[2], &co, 0, 2, "class_of") < 0
        || get_buf(args[3], &us, 0, 1, "used") < 0 || get_buf(args[4], &sz, 0, 2, "sizes") < 0
        || get_buf(args[5], &ob, 0, 2, "objs") < 0
        || get_buf(args[6], &fh, 1, 2, "freehead") < 0)
        goto done;
    if (sz.view.len / 2 < ZS_CLASSES || ob.view.len / 2 < ZS_CLASSES) {
        PyErr_SetString(PyExc_ValueError, "link_zspages: a class table is too short");
        goto done;
    }
    unsigned char *mm = m.view.buf;
    const uint16_t *class_of = co.view.buf, *sizes = sz.view.buf, *cobjs = ob.view.buf;
    const unsigned char *used = us.view.buf;
    uint16_t *freehead = fh.view.buf;
    int64_t nheads = co.view.len / 2, nbits = (int64_t)us.view.len * 8;
    if (fh.view.len / 2 < nheads)
        nheads = fh.view.len / 2;
    for (int64_t head = 0; head < nheads; head++) {
        uint32_t tag = class_of[head];
        if (!tag)
            continue;
        uint32_t cid = tag - 1;
        int64_t size = cid < ZS_CLASSES ? sizes[cid] : 0;
        int64_t objs = cid < ZS_CLASSES ? cobjs[cid] : 0;
        int64_t start = head * PAGE;
        if (size < 2 || size % UNIT || dbase + start + objs * size > m.view.len
            || (start + objs * size) / UNIT > nbits) {
            PyErr_SetString(PyExc_ValueError, "link_zspages: a zspage does not fit in the arena");
            goto done;
        }
        unsigned char *base = mm + dbase + start;
        int64_t prev = -1;
        uint16_t first = ZS_NO_OBJECT;
        for (int64_t i = 0; i < objs; i++) {
            int64_t unit = (start + i * size) / UNIT;
            if (used[unit >> 3] & (1u << (unit & 7)))
                continue;
            if (prev < 0)
                first = (uint16_t)i;
            else
                wr16(base + prev * size, (uint16_t)i);
            prev = i;
        }
        if (prev >= 0)
            wr16(base + prev * size, ZS_NO_OBJECT);
        freehead[head] = first;
        zspages++;
    }
    out = PyLong_FromSsize_t(zspages);
done:
    put_buf(&m);
    put_buf(&co);
    put_buf(&us);
    put_buf(&sz);
    put_buf(&ob);
    put_buf(&fh);
    return out;
}

/* zs_chain_has(mm, pos, size, objs, first, idx) -> 1, 0 or -1
 * Whether object ``idx`` is on the free chain of the zspage at ``pos`` of the map (objects
 * of ``size`` bytes, ``objs`` of them, the chain starting at ``first`` and linked through
 * each free object's first two bytes, 0xFFFF its end): 1 on it (free), 0 not (in use), -1
 * when the chain is broken (an index past the zspage's, a loop, a link outside the map). */
static PyObject *hot_zs_chain_has(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    NARGS(6, "zs_chain_has");
    Buf m = {0};
    Py_ssize_t pos, size, objs, first, idx;
    PyObject *out = NULL;
    if (as_size(args[1], &pos) < 0 || as_size(args[2], &size) < 0 || as_size(args[3], &objs) < 0
        || as_size(args[4], &first) < 0 || as_size(args[5], &idx) < 0)
        return NULL;
    if (get_buf(args[0], &m, 0, 1, "mm") < 0)
        goto done;
    const unsigned char *mm = m.view.buf;
    long found = 0;
    Py_ssize_t i = first;
    for (Py_ssize_t steps = 0; i != ZS_NO_OBJECT; steps++) {
        Py_ssize_t at = pos + i * size;
        if (i >= objs || steps >= objs || at + 2 > m.view.len) {
            found = -1;
            break;
        }
        if (i == idx) {
            found = 1;
            break;
        }
        i = rd16(mm + at);
    }
    out = PyLong_FromLong(found);
done:
    put_buf(&m);
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
     "get_page(table, mm, pbase, dbase, obj, index): a page's bytes, None, or "
     "(slot, bucket) when unsound"},
    {"take_page", (PyCFunction)(void (*)(void))hot_take_page, METH_FASTCALL,
     "take_page(table, mm, pbase, dbase, obj, index, next, prev, obj_head, obj_pages): an "
     "exclusive get: None, (slot, bucket) when unsound, or (bytes, slot, where, length, sub, "
     "left) with the page dropped from the index"},
    {"page_sound", (PyCFunction)(void (*)(void))hot_page_sound, METH_FASTCALL,
     "page_sound(mm, pbase, dbase, slot): whether a page record and its bytes pass its "
     "commit word"},
    {"zs_chain_has", (PyCFunction)(void (*)(void))hot_zs_chain_has, METH_FASTCALL,
     "zs_chain_has(mm, pos, size, objs, first, idx): 1 if object idx is on the zspage's free "
     "chain, 0 if not, -1 if the chain is broken"},
    {"add_page", (PyCFunction)(void (*)(void))hot_add_page, METH_FASTCALL,
     "add_page(mm, pbase, slot, obj, index, where, length, sub, commit, table, bucket, tag, "
     "next, prev, obj_head, obj_pages): a new page's record, links and bucket"},
    {"rehash_pages", (PyCFunction)(void (*)(void))hot_rehash_pages, METH_FASTCALL,
     "rehash_pages(fresh, mm, pbase, old): the pages of table old placed in fresh"},
    {"rehash_records", (PyCFunction)(void (*)(void))hot_rehash_records, METH_FASTCALL,
     "rehash_records(fresh, mm, pbase, hwm): every committed record placed in fresh"},
    {"scan_pages", (PyCFunction)(void (*)(void))hot_scan_pages, METH_FASTCALL,
     "scan_pages(mm, pbase, hwm, dbase, frames, valid_obj, table, next, prev, obj_head, "
     "obj_pages): (free, kept, stored, dropped), the rebuild's pass"},
    {"claim_zbud", (PyCFunction)(void (*)(void))hot_claim_zbud, METH_FASTCALL,
     "claim_zbud(mm, pbase, slots, state, first, last): (refused, zbud_frames, huge_frames), "
     "the rebuild's zbud claims"},
    {"claim_zsmalloc", (PyCFunction)(void (*)(void))hot_claim_zsmalloc, METH_FASTCALL,
     "claim_zsmalloc(mm, pbase, slots, state, class_of, inuse, used, by_size, sizes, pages, "
     "objs, counts): (refused, frames), the rebuild's zsmalloc claims"},
    {"link_zspages", (PyCFunction)(void (*)(void))hot_link_zspages, METH_FASTCALL,
     "link_zspages(mm, dbase, class_of, used, sizes, objs, freehead): every zspage's free "
     "objects chained; how many zspages"},
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
        || PyModule_AddIntConstant(m, "BAD_DUPLICATE", BAD_DUPLICATE) < 0
        || PyModule_AddIntConstant(m, "FRAME_ZBUD", FRAME_ZBUD) < 0
        || PyModule_AddIntConstant(m, "FRAME_HUGE", FRAME_HUGE) < 0
        || PyModule_AddIntConstant(m, "FRAME_ZS_HEAD", FRAME_ZS_HEAD) < 0
        || PyModule_AddIntConstant(m, "FRAME_ZS_TAIL", FRAME_ZS_TAIL) < 0
        || PyModule_AddIntConstant(m, "FRAME_UNBACKED", FRAME_UNBACKED) < 0
        || PyModule_AddIntConstant(m, "ZBUD_MAX_BUDDY", ZBUD_MAX_BUDDY) < 0
        || PyModule_AddIntConstant(m, "ZBUD_NCHUNKS", ZBUD_NCHUNKS) < 0
        || PyModule_AddIntConstant(m, "ZS_CLASSES", ZS_CLASSES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
