/* servekit.kv._cpool: the per-block loops of BlockPool and KVCacheManager in C.
 *
 * Optional: blocks.py and manager.py keep the pure-Python loops as the fallback and the spec,
 * and these functions mirror them exactly (same results, free-list order, serials and
 * backward-shift deletion). They work on the pool's own flat buffers (array.array and the
 * token_bytes memoryview), acquired per call, so BlockPool.reset() replacing an array is fine.
 * Bookkeeping (num_free, num_cached, _next_serial, events) stays in Python.
 *
 * commit, find_hit and extend_hashes take a sequence's token list itself: they pack it as
 * hashing.pack_tokens does (same accepted values, struct.error otherwise) and call the hash
 * function object (xxhash.xxh3_64_intdigest directly for the default one, as the Python fast
 * path does), so no packed bytes are built in Python.
 *
 * Every block id or table index read from Python is range-checked (IndexError), and the array
 * geometry is checked once per call, so a bad argument raises instead of corrupting memory.
 * Block ids from Python lists are converted and checked before anything is written, so such an
 * error leaves the pool unchanged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NO_HASH (-1)
#define NO_SERIAL (-2)
#define SALTED_ROOT_LINK (-3)
#define NO_LINK (-4)
#define STACK_IDS 256

/* -- buffers ------------------------------------------------------------------------------ */

typedef struct {
    Py_buffer views[8];
    int n;
} Buffers;

static void
release_all(Buffers *bufs)
{
    for (int i = 0; i < bufs->n; i++) {
        PyBuffer_Release(&bufs->views[i]);
    }
    bufs->n = 0;
}

/* Acquire obj's contiguous buffer of itemsize-byte signed ints, or of raw bytes for itemsize
 * 1 (any format), and store its length in items; NULL with an exception set on failure. */
static void *
acquire(Buffers *bufs, PyObject *obj, Py_ssize_t itemsize, int writable, Py_ssize_t *items,
        const char *name)
{
    Py_buffer *view = &bufs->views[bufs->n];
    int flags = (itemsize > 1 ? PyBUF_FORMAT : PyBUF_SIMPLE) | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return NULL;
    }
    if (itemsize > 1 &&
        (view->itemsize != itemsize || view->format == NULL || view->format[0] == '\0' ||
         strchr("ilq", view->format[strlen(view->format) - 1]) == NULL)) {
        PyErr_Format(PyExc_TypeError, "%s must be a buffer of %zd-byte signed ints", name,
                     itemsize);
        PyBuffer_Release(view);
        return NULL;
    }
    bufs->n++;
    *items = view->len / itemsize;
    return view->buf;
}

/* A hash-table geometry check: keys and values of one power-of-two length. */
static int
check_table(Py_ssize_t nkeys, Py_ssize_t nvalues)
{
    if (nkeys <= 0 || nkeys != nvalues || (nkeys & (nkeys - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "keys and values must have one power-of-two length");
        return -1;
    }
    return 0;
}

/* -- the pool's arrays -------------------------------------------------------------------- */

/* The pool arrays the functions take: the index of each in PoolArrays.buf and .len. */
enum { A_NEXT, A_PREV, A_REF, A_HASHES, A_SERIAL, A_KEYS, A_VALUES, A_PARENT, A_TOKENS, N_ARRAYS };
#define BIT(a) (1u << (a))
#define ALL_ARRAYS (BIT(N_ARRAYS) - 1)

static const struct {
    const char *name;
    Py_ssize_t itemsize;  /* 1: raw bytes */
} array_kinds[N_ARRAYS] = {
    [A_NEXT] = {"next", 4},     [A_PREV] = {"prev", 4},     [A_REF] = {"ref", 4},
    [A_HASHES] = {"hashes", 8}, [A_SERIAL] = {"serial", 8}, [A_KEYS] = {"keys", 8},
    [A_VALUES] = {"values", 4}, [A_PARENT] = {"parent", 8}, [A_TOKENS] = {"token_bytes", 1},
};

typedef struct {
    Buffers bufs;
    void *buf[N_ARRAYS];  /* only those acquired are set */
    Py_ssize_t len[N_ARRAYS];  /* in items */
    Py_ssize_t num_blocks;
    int64_t mask;  /* the hash index's slot mask (its length - 1), with keys */
    Py_ssize_t rb;  /* token bytes per block, with token_bytes */
} PoolArrays;

/* Acquire args[0], args[1], ... as the arrays `order` lists (ending at -1), writable where
 * their bit is set in `writable`, and check that they make one pool: num_blocks is the length
 * of ref (or else parent); next and prev have one more item; hashes, serial and parent have
 * num_blocks; token_bytes holds num_blocks > 0 blocks of whole int32 tokens; keys and values
 * are one power-of-two table. -1 with an exception set. Whatever it returns, the caller
 * releases p->bufs with release_all. */
static int
pool_acquire(PoolArrays *p, PyObject *const *args, const signed char *order, unsigned writable)
{
    unsigned have = 0;
    p->bufs.n = 0;  /* the views are filled as they are acquired */
    for (int i = 0; order[i] >= 0; i++) {
        const int a = order[i];
        p->buf[a] = acquire(&p->bufs, args[i], array_kinds[a].itemsize, (writable >> a) & 1,
                            &p->len[a], array_kinds[a].name);
        if (p->buf[a] == NULL) {
            return -1;
        }
        have |= BIT(a);
    }
    const Py_ssize_t *n = p->len;
    const Py_ssize_t nb = have & BIT(A_REF) ? n[A_REF] : n[A_PARENT];
    int bad = (have & BIT(A_NEXT)) && (n[A_NEXT] != nb + 1 || n[A_PREV] != nb + 1);
    bad |= (have & BIT(A_HASHES)) && n[A_HASHES] != nb;
    bad |= (have & BIT(A_SERIAL)) && n[A_SERIAL] != nb;
    bad |= (have & BIT(A_PARENT)) && n[A_PARENT] != nb;
    p->rb = 0;
    if (have & BIT(A_TOKENS)) {
        const Py_ssize_t nt = n[A_TOKENS];
        if (nb == 0 || nt == 0 || nt % nb != 0 || (nt / nb) % 4 != 0) {
            bad = 1;
        }
        else {
            p->rb = nt / nb;
        }
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "inconsistent pool array lengths");
        return -1;
    }
    if (have & BIT(A_KEYS)) {
        if (check_table(n[A_KEYS], n[A_VALUES]) < 0) {
            return -1;
        }
        p->mask = n[A_KEYS] - 1;
    }
    p->num_blocks = nb;
    return 0;
}

/* -- argument helpers --------------------------------------------------------------------- */

static int
check_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", fn,
                     expected, nargs);
        return -1;
    }
    return 0;
}

static int
get_list(PyObject *obj, const char *name, int allow_none, PyObject **out)
{
    if (allow_none && obj == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyList_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list%s", name, allow_none ? " or None" : "");
        return -1;
    }
    *out = obj;
    return 0;
}

static int
append_long(PyObject *list, long long value)
{
    PyObject *item = PyLong_FromLongLong(value);
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* An int item of seq (a list or tuple, re-read each time: converting a non-int runs its
 * __index__, which may change a list); -1 with an exception set, or when i is out of range. */
static long long
seq_int(PyObject *seq, Py_ssize_t i, int *err)
{
    if (i >= PySequence_Fast_GET_SIZE(seq)) {
        PyErr_SetString(PyExc_RuntimeError, "a list changed size during the call");
        *err = 1;
        return -1;
    }
    PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
    Py_INCREF(item);
    long long v = PyLong_AsLongLong(item);
    Py_DECREF(item);
    *err = v == -1 && PyErr_Occurred();
    return v;
}

/* The block ids seq[start:stop], each checked against [0, num_blocks), into out (reversed
 * when reverse is set); -1 with an exception on a bad id. */
static int
load_ids(PyObject *seq, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t num_blocks, int reverse,
         int32_t *out)
{
    int err;
    for (Py_ssize_t i = start; i < stop; i++) {
        long long b = seq_int(seq, i, &err);
        if (err) {
            return -1;
        }
        if (b < 0 || b >= num_blocks) {
            PyErr_Format(PyExc_IndexError, "block id %lld out of range [0, %zd)", b, num_blocks);
            return -1;
        }
        out[reverse ? stop - 1 - i : i - start] = (int32_t)b;
    }
    return 0;
}

/* (a, b) with a stolen (NULL: an exception is set) */
static PyObject *
pair(PyObject *a, long long b)
{
    if (a == NULL) {
        return NULL;
    }
    PyObject *t = PyTuple_New(2), *pb = PyLong_FromLongLong(b);
    if (t == NULL || pb == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(pb);
        Py_DECREF(a);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, pb);
    return t;
}

/* Scratch memory for count items of itemsize bytes: `stack` (stack_size bytes) when they fit,
 * else the heap; NULL with MemoryError. free_scratch frees either, and NULL. */
static void *
scratch(Py_ssize_t count, size_t itemsize, void *stack, size_t stack_size)
{
    if ((size_t)count <= stack_size / itemsize) {
        return stack;
    }
    void *buf = (size_t)count > PY_SSIZE_T_MAX / itemsize
        ? NULL : PyMem_Malloc((size_t)count * itemsize);
    if (buf == NULL) {
        PyErr_NoMemory();
    }
    return buf;
}

static void
free_scratch(void *buf, void *stack)
{
    if (buf != NULL && buf != stack) {
        PyMem_Free(buf);
    }
}

/* An int argument, as PyLong_AsSsize_t / PyLong_AsLongLong take it; -1 with an exception. */
static int
get_ssize(PyObject *obj, Py_ssize_t *out)
{
    *out = PyLong_AsSsize_t(obj);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int
get_int64(PyObject *obj, int64_t *out)
{
    *out = PyLong_AsLongLong(obj);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int
check_salts(PyObject *salts)
{
    if (!PyDict_Check(salts)) {
        PyErr_SetString(PyExc_TypeError, "salts must be a dict");
        return -1;
    }
    return 0;
}

static PyObject *
index_error(const char *what, long long value, Py_ssize_t bound)
{
    PyErr_Format(PyExc_IndexError, "%s %lld out of range [0, %zd) (corrupt pool state)", what,
                 value, bound);
    return NULL;
}

/* The slot of hash h in the index (keys, of mask + 1 slots), or else the empty slot that ends
 * its probe run; -1 with ValueError when there is none. */
static inline int64_t
find_slot(const int64_t *keys, int64_t mask, int64_t h)
{
    int64_t j = h & mask, k;
    for (int64_t probes = 0; (k = keys[j]) != h && k != NO_HASH; probes++) {
        if (probes > mask) {
            PyErr_SetString(PyExc_ValueError, "hash index has no empty slot");
            return -1;
        }
        j = (j + 1) & mask;
    }
    return j;
}

/* Python's `salts.get(block) == salt`: 1, 0, or -1 with an exception. */
static int
salt_matches(PyObject *salts, int32_t block, PyObject *salt)
{
    PyObject *key = PyLong_FromLong(block);
    if (key == NULL) {
        return -1;
    }
    PyObject *have = PyDict_GetItemWithError(salts, key);
    Py_DECREF(key);
    if (have == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        have = Py_None;
    }
    Py_INCREF(have);  /* borrowed from the dict, which __eq__ could change */
    int eq = PyObject_RichCompareBool(have, salt, Py_EQ);
    Py_DECREF(have);
    return eq;
}


/* -- packing and hashing token ids (hashing.pack_tokens / extend_block_hashes) -------------- */

#define HASH_MASK ((UINT64_C(1) << 60) - 1)  /* hashing.HASH_MASK */
#define STACK_BYTES 4096

/* Raise struct.error, the exception struct.pack (pack_tokens) raises for a bad token. */
static void
set_struct_error(const char *msg)
{
    PyErr_Clear();
    PyObject *mod = PyImport_ImportModule("struct");
    if (mod == NULL) {
        return;
    }
    PyObject *err = PyObject_GetAttrString(mod, "error");
    Py_DECREF(mod);
    if (err != NULL) {
        PyErr_SetString(err, msg);
        Py_DECREF(err);
    }
}

/* Pack the tokens seq[lo:hi] (seq from PySequence_Fast) into out as little-endian int32,
 * accepting and rejecting exactly what struct.pack("<%di", ...) does: ints and objects with
 * __index__ in [-2**31, 2**31); anything else raises struct.error with struct's message (or
 * what __index__ raises). */
static int
pack_tokens(PyObject *seq, Py_ssize_t lo, Py_ssize_t hi, unsigned char *out)
{
    for (Py_ssize_t i = lo; i < hi; i++, out += 4) {
        if (i >= PySequence_Fast_GET_SIZE(seq)) {  /* an __index__ shrank the list */
            PyErr_SetString(PyExc_RuntimeError, "token_ids changed size during the call");
            return -1;
        }
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        int overflow;
        long v;
        if (PyLong_Check(item)) {
            v = PyLong_AsLongAndOverflow(item, &overflow);
        }
        else if (PyIndex_Check(item)) {
            Py_INCREF(item);  /* __index__ may drop the list's reference */
            PyObject *num = PyNumber_Index(item);
            Py_DECREF(item);
            if (num == NULL) {
                return -1;
            }
            v = PyLong_AsLongAndOverflow(num, &overflow);
            Py_DECREF(num);
        }
        else {
            set_struct_error("required argument is not an integer");
            return -1;
        }
        if (overflow) {
            set_struct_error("argument out of range");
            return -1;
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            set_struct_error("'i' format requires -2147483648 <= number <= 2147483647");
            return -1;
        }
        const uint32_t u = (uint32_t)v;
        out[0] = (unsigned char)u;
        out[1] = (unsigned char)(u >> 8);
        out[2] = (unsigned char)(u >> 16);
        out[3] = (unsigned char)(u >> 24);
    }
    return 0;
}

/* hashing.salt_bytes(salt) + block: a new bytes object, or NULL with an exception set. */
static PyObject *
salted_block(PyObject *salt, const unsigned char *block, Py_ssize_t rb)
{
    const char *raw = "";
    Py_ssize_t n = 0;
    PyObject *encoded = NULL;
    if (salt != Py_None) {
        if (PyUnicode_Check(salt)) {
            raw = PyUnicode_AsUTF8AndSize(salt, &n);  /* str.encode(): UTF-8, strict */
            if (raw == NULL) {
                return NULL;
            }
        }
        else {  /* not a str: whatever salt.encode() does (raises, for bytes) */
            encoded = PyObject_CallMethod(salt, "encode", NULL);
            if (encoded == NULL) {
                return NULL;
            }
            if (!PyBytes_Check(encoded)) {
                PyErr_SetString(PyExc_TypeError, "cache_salt.encode() must return bytes");
                Py_DECREF(encoded);
                return NULL;
            }
            raw = PyBytes_AS_STRING(encoded);
            n = PyBytes_GET_SIZE(encoded);
        }
        if ((uint64_t)n > UINT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "cache_salt too long");
            Py_XDECREF(encoded);
            return NULL;
        }
    }
    const Py_ssize_t prefix = salt == Py_None ? 0 : 4 + n;
    PyObject *out = PyBytes_FromStringAndSize(NULL, prefix + rb);
    if (out != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
        if (prefix) {
            const uint32_t len = (uint32_t)n;
            p[0] = (unsigned char)len;
            p[1] = (unsigned char)(len >> 8);
            p[2] = (unsigned char)(len >> 16);
            p[3] = (unsigned char)(len >> 24);
            memcpy(p + 4, raw, (size_t)n);
        }
        memcpy(p + prefix, block, (size_t)rb);
    }
    Py_XDECREF(encoded);
    return out;
}

/* Append to `hashes` (a list) the chained hashes of the nblocks blocks of rb bytes at data,
 * exactly as hashing.extend_block_hashes_packed does: with `hashes` empty, the first block is
 * salt_bytes(salt) + its tokens, hashed with parent 0; every later block with the hash before
 * it. raw: fn is xxhash.xxh3_64_intdigest, each result masked with HASH_MASK here (the Python
 * path's fast path for the default hash function); else fn(data, parent) is appended as it
 * returns. Hashes are appended as they are computed, so an error in fn keeps those before. */
static int
hash_blocks(PyObject *hashes, const unsigned char *data, Py_ssize_t nblocks, Py_ssize_t rb,
            PyObject *salt, PyObject *fn, int raw)
{
    if (nblocks <= 0) {
        return 0;
    }
    const Py_ssize_t have = PyList_GET_SIZE(hashes);
    PyObject *parent;
    if (have) {
        parent = PyList_GET_ITEM(hashes, have - 1);
        Py_INCREF(parent);
    }
    else {
        parent = PyLong_FromLong(0);
        if (parent == NULL) {
            return -1;
        }
    }
    for (Py_ssize_t t = 0; t < nblocks; t++) {
        PyObject *block = t == 0 && have == 0
            ? salted_block(salt, data, rb)
            : PyBytes_FromStringAndSize((const char *)data + t * rb, rb);
        if (block == NULL) {
            goto fail;
        }
        PyObject *args[2] = {block, parent};
        PyObject *h = PyObject_Vectorcall(fn, args, 2, NULL);
        Py_DECREF(block);
        if (h == NULL) {
            goto fail;
        }
        if (raw) {
            if (!PyLong_Check(h)) {
                PyErr_SetString(PyExc_TypeError, "the raw hash function must return an int");
                Py_DECREF(h);
                goto fail;
            }
            const unsigned long long v = PyLong_AsUnsignedLongLongMask(h);
            Py_DECREF(h);
            if (v == (unsigned long long)-1 && PyErr_Occurred()) {
                goto fail;
            }
            h = PyLong_FromUnsignedLongLong(v & HASH_MASK);
            if (h == NULL) {
                goto fail;
            }
        }
        int rc = PyList_Append(hashes, h);
        Py_DECREF(parent);
        parent = h;  /* the list holds it too */
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(parent);
    return 0;

fail:
    Py_DECREF(parent);
    return -1;
}

static int
get_bool(PyObject *obj, int *out)
{
    int v = PyObject_IsTrue(obj);
    if (v < 0) {
        return -1;
    }
    *out = v;
    return 0;
}

PyDoc_STRVAR(extend_hashes_doc,
"extend_hashes(token_ids, hashes, num_blocks, block_size, salt, fn, raw) -> None\n\n"
"hashing.extend_block_hashes from the token list itself: pack the tokens of blocks\n"
"len(hashes)..num_blocks-1 (struct.error for a token that is not an int32) and append their\n"
"chained hashes. raw: fn is xxhash.xxh3_64_intdigest, masked to HASH_BITS here.");

static PyObject *
cpool_extend_hashes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("extend_hashes", nargs, 7) < 0) {
        return NULL;
    }
    PyObject *hashes, *seq;
    unsigned char stack[STACK_BYTES], *buf = NULL;
    Py_ssize_t num_blocks, bs;
    int raw, ok = 0;
    if (get_list(args[1], "hashes", 0, &hashes) < 0 || get_ssize(args[2], &num_blocks) < 0 ||
        get_ssize(args[3], &bs) < 0) {
        return NULL;
    }
    if (bs <= 0 || bs > (PY_SSIZE_T_MAX / 4)) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive");
        return NULL;
    }
    if (get_bool(args[6], &raw) < 0) return NULL;
    const Py_ssize_t start = PyList_GET_SIZE(hashes);
    if (num_blocks <= start) {
        Py_RETURN_NONE;
    }
    seq = PySequence_Fast(args[0], "token_ids must be a sequence");
    if (seq == NULL) return NULL;
    /* token_ids[start * bs : num_blocks * bs], clamped as the slice is (no overflow) */
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    const Py_ssize_t lo_tok = start <= len / bs ? start * bs : len;
    const Py_ssize_t hi_tok = num_blocks <= len / bs ? num_blocks * bs : len;
    if (hi_tok > lo_tok) {
        buf = scratch(4 * (hi_tok - lo_tok), 1, stack, sizeof stack);
        if (buf == NULL || pack_tokens(seq, lo_tok, hi_tok, buf) < 0 ||
            hash_blocks(hashes, buf, (hi_tok - lo_tok) / bs, 4 * bs, args[4], args[5], raw) < 0)
            goto done;
    }
    ok = 1;
done:
    free_scratch(buf, stack);
    Py_DECREF(seq);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* -- BlockPool.allocate ------------------------------------------------------------------- */

PyDoc_STRVAR(allocate_doc,
"allocate(next, prev, ref, hashes, serial, keys, values, n, removed) -> (blocks, evicted)\n\n"
"The loop of BlockPool.allocate: take n blocks off the free-list head (ref 1), evicting\n"
"cached hashes (appended to `removed` unless it is None). Returns the block ids and the\n"
"number evicted.");

static PyObject *
cpool_allocate(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    static const signed char arrays[] = {A_NEXT, A_PREV, A_REF, A_HASHES, A_SERIAL, A_KEYS,
                                         A_VALUES, -1};
    if (check_nargs("allocate", nargs, 9) < 0) {
        return NULL;
    }
    PoolArrays pool;
    PyObject *out = NULL, *removed;
    Py_ssize_t n, evicted = 0;
    int ok = 0;
    if (pool_acquire(&pool, args, arrays, ALL_ARRAYS) < 0 || get_ssize(args[7], &n) < 0) goto done;
    int32_t *const nxt = pool.buf[A_NEXT], *const prv = pool.buf[A_PREV];
    int32_t *const ref = pool.buf[A_REF];
    int64_t *const hashes = pool.buf[A_HASHES], *const serial = pool.buf[A_SERIAL];
    int64_t *const keys = pool.buf[A_KEYS];
    int32_t *const values = pool.buf[A_VALUES];
    const Py_ssize_t num_blocks = pool.num_blocks;
    const int64_t mask = pool.mask;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be non-negative");
        goto done;
    }
    if (n > num_blocks) {
        PyErr_Format(PyExc_IndexError, "allocate(%zd) from a pool of %zd blocks", n, num_blocks);
        goto done;
    }
    if (get_list(args[8], "removed", 1, &removed) < 0) goto done;

    out = PyList_New(n);
    if (out == NULL) goto done;
    int32_t b = nxt[num_blocks];
    for (Py_ssize_t t = 0; t < n; t++) {
        if (b < 0 || b >= num_blocks) {  /* the sentinel: n > num_free */
            PyErr_Format(PyExc_IndexError,
                         "allocate(%zd): the free list ran out (n exceeds num_free)", n);
            goto done;
        }
        ref[b] = 1;
        PyObject *id = PyLong_FromLong(b);
        if (id == NULL) goto done;
        PyList_SET_ITEM(out, t, id);
        const int64_t h = hashes[b];
        if (h != NO_HASH) {  /* evict its cached KV: backward-shift deletion, as _delete */
            int64_t i = h & mask, k;
            for (int64_t probes = 0; keys[i] != h; probes++) {
                if (keys[i] == NO_HASH || probes > mask) {
                    PyErr_Format(PyExc_ValueError,
                                 "hash %lld of block %d is not in the index (corrupt pool)",
                                 (long long)h, (int)b);
                    goto done;
                }
                i = (i + 1) & mask;
            }
            int64_t j = i;
            for (int64_t probes = 0;; probes++) {
                j = (j + 1) & mask;
                k = keys[j];
                if (k == NO_HASH) {
                    break;
                }
                if (probes > mask) {
                    PyErr_SetString(PyExc_ValueError, "hash index has no empty slot");
                    goto done;
                }
                const int64_t home = k & mask;
                if ((home <= i && i < j) || (i < j && j < home) || (j < home && home <= i)) {
                    keys[i] = k;
                    values[i] = values[j];
                    i = j;
                }
            }
            keys[i] = NO_HASH;
            hashes[b] = NO_HASH;
            serial[b] = NO_SERIAL;
            evicted++;
            if (removed != NULL && append_long(removed, h) < 0) goto done;
        }
        b = nxt[b];
    }
    if (b < 0 || b > num_blocks) {
        index_error("free-list link", b, num_blocks + 1);
        goto done;
    }
    nxt[num_blocks] = b;
    prv[b] = (int32_t)num_blocks;
    ok = 1;
done:
    release_all(&pool.bufs);
    if (!ok) {
        Py_XDECREF(out);
        return NULL;
    }
    return pair(out, evicted);
}

/* -- BlockPool.touch ---------------------------------------------------------------------- */

PyDoc_STRVAR(touch_doc,
"touch(next, prev, ref, blocks) -> int\n\n"
"The loop of BlockPool.touch: one more reference on each block, unlinking free ones from\n"
"the free list. Returns the number unlinked (num_free drops by it).");

static PyObject *
cpool_touch(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    static const signed char arrays[] = {A_NEXT, A_PREV, A_REF, -1};
    if (check_nargs("touch", nargs, 4) < 0) {
        return NULL;
    }
    PoolArrays pool;
    int32_t stack[STACK_IDS], *ids = NULL;
    PyObject *seq = NULL;
    long unlinked = 0;
    int ok = 0;
    if (pool_acquire(&pool, args, arrays, ALL_ARRAYS) < 0) goto done;
    int32_t *const nxt = pool.buf[A_NEXT], *const prv = pool.buf[A_PREV];
    int32_t *const ref = pool.buf[A_REF];
    const Py_ssize_t num_blocks = pool.num_blocks;
    seq = PySequence_Fast(args[3], "blocks must be a sequence");
    if (seq == NULL) goto done;
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    ids = scratch(len, sizeof *ids, stack, sizeof stack);
    if (ids == NULL || load_ids(seq, 0, len, num_blocks, 0, ids) < 0) goto done;

    for (Py_ssize_t t = 0; t < len; t++) {
        const int32_t b = ids[t];
        const int32_t r = ref[b];
        if (r == 0) {
            const int32_t p = prv[b], q = nxt[b];
            if (p < 0 || p > num_blocks || q < 0 || q > num_blocks) {
                index_error("free-list link", p < 0 || p > num_blocks ? p : q, num_blocks + 1);
                goto done;
            }
            nxt[p] = q;
            prv[q] = p;
            unlinked++;
        }
        ref[b] = r + 1;
    }
    ok = 1;
done:
    free_scratch(ids, stack);
    Py_XDECREF(seq);
    release_all(&pool.bufs);
    return ok ? PyLong_FromLong(unlinked) : NULL;
}

/* -- BlockPool.free ----------------------------------------------------------------------- */

PyDoc_STRVAR(free_doc,
"free(next, prev, ref, hashes, blocks) -> (released, failed)\n\n"
"The loop of BlockPool.free: drop one reference on each block, tail first; a block whose\n"
"last reference goes joins the free list (cached: at the tail, else at the head). Returns\n"
"the number of blocks released (num_free grows by it) and the index in `blocks` of a block\n"
"freed once too often (the blocks after it in `blocks` are untouched), or -1.");

static PyObject *
cpool_free(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    static const signed char arrays[] = {A_NEXT, A_PREV, A_REF, A_HASHES, -1};
    if (check_nargs("free", nargs, 5) < 0) {
        return NULL;
    }
    PoolArrays pool;
    int32_t stack[2 * STACK_IDS], *ids = NULL;
    PyObject *seq = NULL;
    Py_ssize_t released = 0, failed = -1;
    int ok = 0;
    if (pool_acquire(&pool, args, arrays, ALL_ARRAYS & ~BIT(A_HASHES)) < 0) goto done;
    int32_t *const nxt = pool.buf[A_NEXT], *const prv = pool.buf[A_PREV];
    int32_t *const ref = pool.buf[A_REF];
    const int64_t *const hashes = pool.buf[A_HASHES];
    const Py_ssize_t num_blocks = pool.num_blocks;
    seq = PySequence_Fast(args[4], "blocks must be a sequence");
    if (seq == NULL) goto done;
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    /* ids[0:len]: the blocks tail first; ids[len:2 len]: the uncached ones released */
    ids = scratch(2 * len, sizeof *ids, stack, sizeof stack);
    if (ids == NULL || load_ids(seq, 0, len, num_blocks, 1, ids) < 0) goto done;
    int32_t *uncached = ids + len;

    int32_t tail = prv[num_blocks];
    const int32_t head = nxt[num_blocks];
    if (tail < 0 || tail > num_blocks || head < 0 || head > num_blocks) {
        index_error("free-list link", tail < 0 || tail > num_blocks ? tail : head,
                    num_blocks + 1);
        goto done;
    }
    Py_ssize_t n_uncached = 0;
    released = len;
    for (Py_ssize_t t = 0; t < len; t++) {
        const int32_t b = ids[t];
        const int32_t r = ref[b];
        if (r == 1) {
            ref[b] = 0;
            if (hashes[b] != NO_HASH) {  /* link after the tail */
                nxt[tail] = b;
                prv[b] = tail;
                tail = b;
            }
            else {
                uncached[n_uncached++] = b;
            }
        }
        else if (r > 1) {
            ref[b] = r - 1;
            released--;
        }
        else {
            failed = len - 1 - t;
            released -= len - t;
            break;
        }
    }
    nxt[tail] = (int32_t)num_blocks;
    prv[num_blocks] = tail;
    for (Py_ssize_t t = 0; t < n_uncached; t++) {  /* push at the head */
        const int32_t b = uncached[t];
        const int32_t first = nxt[num_blocks];
        prv[first] = b;  /* in range: the checked head, the sentinel or a block pushed */
        nxt[b] = first;
        prv[b] = (int32_t)num_blocks;
        nxt[num_blocks] = b;
    }
    ok = 1;
done:
    free_scratch(ids, stack);
    Py_XDECREF(seq);
    release_all(&pool.bufs);
    return ok ? pair(PyLong_FromSsize_t(released), failed) : NULL;
}

/* -- KVCacheManager.commit ---------------------------------------------------------------- */

PyDoc_STRVAR(commit_doc,
"commit(keys, values, parent, serial, hashes, token_bytes, token_ids, block_hashes,\n"
"       block_ids, start, n_full, link, next_serial, salt, salts, fn, raw, stored)\n"
"       -> (link, next_serial)\n\n"
"KVCacheManager.commit for blocks start..n_full-1 from the token list itself: pack their\n"
"tokens (struct.error for a token that is not an int32), extend block_hashes to n_full as\n"
"extend_hashes does, then for each block probe its hash and register a new one (hash,\n"
"serial, parent link, index entry and its packed tokens copied into token_bytes; a salted\n"
"root also records its salt in `salts`), or chain onto an identical cached block, or stop\n"
"with the no-link marker at a hash collision. Appends the indices registered to `stored`\n"
"unless it is None.");

static PyObject *
cpool_commit(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    static const signed char arrays[] = {A_KEYS, A_VALUES, A_PARENT, A_SERIAL, A_HASHES,
                                         A_TOKENS, -1};
    if (check_nargs("commit", nargs, 18) < 0) {
        return NULL;
    }
    PoolArrays pool;
    int32_t stack[STACK_IDS], *ids = NULL;
    int64_t hstack[STACK_IDS], *hs = NULL;
    unsigned char bstack[STACK_BYTES], *packed = NULL;
    PyObject *block_hashes, *block_ids, *stored, *seq = NULL;
    Py_ssize_t start, n_full;
    int64_t link = 0, s = 0;
    int raw, ok = 0;
    if (pool_acquire(&pool, args, arrays, ALL_ARRAYS) < 0) goto done;
    int64_t *const keys = pool.buf[A_KEYS], *const parent = pool.buf[A_PARENT];
    int64_t *const serial = pool.buf[A_SERIAL], *const bhash = pool.buf[A_HASHES];
    int32_t *const values = pool.buf[A_VALUES];
    char *const tok = pool.buf[A_TOKENS];
    const Py_ssize_t num_blocks = pool.num_blocks, rb = pool.rb, bs = rb / 4;
    PyObject *salt = args[13], *salts = args[14], *fn = args[15];
    if (get_list(args[7], "block_hashes", 0, &block_hashes) < 0 ||
        get_list(args[8], "block_ids", 0, &block_ids) < 0 ||
        get_list(args[17], "stored", 1, &stored) < 0 || get_ssize(args[9], &start) < 0 ||
        get_ssize(args[10], &n_full) < 0 || get_int64(args[11], &link) < 0 ||
        get_int64(args[12], &s) < 0 || check_salts(salts) < 0 || get_bool(args[16], &raw) < 0) {
        goto done;
    }
    seq = PySequence_Fast(args[6], "token_ids must be a sequence");
    if (seq == NULL) goto done;
    if (start < 0 || n_full < start || n_full > PySequence_Fast_GET_SIZE(seq) / bs ||
        PyList_GET_SIZE(block_ids) < n_full) {
        PyErr_SetString(PyExc_ValueError, "commit range exceeds token_ids or block_ids");
        goto done;
    }

    /* Pack blocks base..n_full-1, base being the first block to hash when that comes before
     * start (as the Python path, packing start.. first, then base..start-1 for the hashes). */
    const Py_ssize_t have = PyList_GET_SIZE(block_hashes);
    const Py_ssize_t base = have < start ? have : start;
    packed = scratch((n_full - base) * rb, 1, bstack, sizeof bstack);
    if (packed == NULL) goto done;
    const unsigned char *data = packed + (start - base) * rb;  /* blocks start.. */
    if (pack_tokens(seq, start * bs, n_full * bs, packed + (start - base) * rb) < 0 ||
        pack_tokens(seq, base * bs, start * bs, packed) < 0) {
        goto done;
    }
    if (have < n_full &&
        hash_blocks(block_hashes, packed + (have - base) * rb, n_full - have, rb, salt, fn,
                    raw) < 0) {
        goto done;
    }
    if (PyList_GET_SIZE(block_hashes) < n_full || PyList_GET_SIZE(block_ids) < n_full) {
        PyErr_SetString(PyExc_ValueError, "commit range exceeds block_hashes or block_ids");
        goto done;
    }
    const Py_ssize_t count = n_full - start;
    if ((ids = scratch(count, sizeof *ids, stack, sizeof stack)) == NULL ||
        (hs = scratch(count, sizeof *hs, hstack, sizeof hstack)) == NULL ||
        load_ids(block_ids, start, n_full, num_blocks, 0, ids) < 0) {
        goto done;
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        int err;
        hs[t] = seq_int(block_hashes, start + t, &err);
        if (err || hs[t] < 0) {
            if (!err) {
                PyErr_SetString(PyExc_ValueError, "block hashes must be non-negative");
            }
            goto done;
        }
    }

    for (Py_ssize_t t = 0; t < count; t++) {
        const int64_t h = hs[t];
        const Py_ssize_t o = t * rb;
        const int64_t j = find_slot(keys, pool.mask, h);
        if (j < 0) goto done;
        if (keys[j] == NO_HASH) {  /* new: register block_ids[start + t] in the empty slot j */
            const int32_t b = ids[t];
            bhash[b] = h;
            serial[b] = s;
            parent[b] = link;
            if (link == SALTED_ROOT_LINK && salt != Py_None) {
                PyObject *key = PyLong_FromLong(b);
                if (key == NULL) goto done;
                int rc = PyDict_SetItem(salts, key, salt);
                Py_DECREF(key);
                if (rc < 0) goto done;
            }
            keys[j] = h;
            values[j] = b;
            memcpy(tok + (Py_ssize_t)b * rb, data + o, (size_t)rb);
            link = s++;
            if (stored != NULL && append_long(stored, start + t) < 0) goto done;
            continue;
        }
        const int32_t other = values[j];
        if (other < 0 || other >= num_blocks) {
            index_error("index value", other, num_blocks);
            goto done;
        }
        int same = parent[other] == link;
        if (same && link == SALTED_ROOT_LINK) {
            same = salt_matches(salts, other, salt);
            if (same < 0) goto done;
        }
        if (same && memcmp(tok + (Py_ssize_t)other * rb, data + o, (size_t)rb) == 0) {
            link = serial[other];  /* same KV already cached in another block: chain on */
        }
        else {  /* a hash collision: stop caching this sequence's later blocks */
            link = NO_LINK;
            break;
        }
    }
    ok = 1;
done:
    free_scratch(ids, stack);
    free_scratch(hs, hstack);
    free_scratch(packed, bstack);
    Py_XDECREF(seq);
    release_all(&pool.bufs);
    return ok ? pair(PyLong_FromLongLong(link), s) : NULL;
}

/* -- KVCacheManager._find_hit ------------------------------------------------------------- */

PyDoc_STRVAR(find_hit_doc,
"find_hit(keys, values, parent, serial, token_bytes, token_ids, block_hashes, start,\n"
"         max_blocks, link, salt, salts, blocks, serials) -> int\n\n"
"The probe and token check of KVCacheManager._find_hit: from block `start`, find each cached\n"
"block whose hash is block_hashes[i] and whose parent link is the previous block's serial\n"
"(`link` for the first; block 0 with a salt also needs the salt), up to max_blocks; then\n"
"pack the tokens of the blocks found (struct.error for a token that is not an int32) and\n"
"keep those before the first whose stored tokens differ. Appends them to `blocks` and their\n"
"serials to `serials`; returns the number appended.");

static PyObject *
cpool_find_hit(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    static const signed char arrays[] = {A_KEYS, A_VALUES, A_PARENT, A_SERIAL, A_TOKENS, -1};
    if (check_nargs("find_hit", nargs, 14) < 0) {
        return NULL;
    }
    PoolArrays pool;
    int32_t stack[STACK_IDS], *found_ids = NULL;
    int64_t sstack[STACK_IDS], *found_serials = NULL;
    unsigned char bstack[STACK_BYTES], *packed = NULL;
    PyObject *block_hashes, *blocks, *serials, *seq = NULL;
    Py_ssize_t start, max_blocks, n = 0;
    int64_t link;
    int ok = 0;
    if (pool_acquire(&pool, args, arrays, 0) < 0) goto done;
    const int64_t *const keys = pool.buf[A_KEYS], *const parent = pool.buf[A_PARENT];
    const int64_t *const serial = pool.buf[A_SERIAL];
    const int32_t *const values = pool.buf[A_VALUES];
    const char *const tok = pool.buf[A_TOKENS];
    const Py_ssize_t num_blocks = pool.num_blocks, rb = pool.rb, bs = rb / 4;
    PyObject *salt = args[10], *salts = args[11];
    if (get_list(args[6], "block_hashes", 0, &block_hashes) < 0 ||
        get_list(args[12], "blocks", 0, &blocks) < 0 ||
        get_list(args[13], "serials", 0, &serials) < 0 || get_ssize(args[7], &start) < 0 ||
        get_ssize(args[8], &max_blocks) < 0 || get_int64(args[9], &link) < 0 ||
        check_salts(salts) < 0) {
        goto done;
    }
    seq = PySequence_Fast(args[5], "token_ids must be a sequence");
    if (seq == NULL) goto done;
    if (start < 0 || PyList_GET_SIZE(block_hashes) < max_blocks ||
        max_blocks > PySequence_Fast_GET_SIZE(seq) / bs) {
        PyErr_SetString(PyExc_ValueError, "lookup range exceeds block_hashes or token_ids");
        goto done;
    }
    const Py_ssize_t most = max_blocks > start ? max_blocks - start : 0;
    /* the blocks found and their serials */
    if ((found_ids = scratch(most, sizeof *found_ids, stack, sizeof stack)) == NULL ||
        (found_serials = scratch(most, sizeof *found_serials, sstack, sizeof sstack)) == NULL) {
        goto done;
    }

    Py_ssize_t found = 0;
    for (Py_ssize_t i = start; i < max_blocks; i++) {
        int err;
        const int64_t h = seq_int(block_hashes, i, &err);
        if (err) goto done;
        const int64_t j = find_slot(keys, pool.mask, h);
        if (j < 0) goto done;
        if (keys[j] == NO_HASH) {
            break;
        }
        const int32_t b = values[j];
        if (b < 0 || b >= num_blocks) {
            index_error("index value", b, num_blocks);
            goto done;
        }
        if (parent[b] != link) {
            break;
        }
        if (i == 0 && salt != Py_None) {
            int match = salt_matches(salts, b, salt);
            if (match < 0) goto done;
            if (!match) break;
        }
        link = serial[b];
        found_ids[found] = b;
        found_serials[found] = link;
        found++;
    }
    /* Verify the tokens of every block found (all packed first, as the Python path does). */
    if (found) {
        packed = scratch(found * rb, 1, bstack, sizeof bstack);
        if (packed == NULL || pack_tokens(seq, start * bs, (start + found) * bs, packed) < 0)
            goto done;
        while (n < found &&
               memcmp(tok + (Py_ssize_t)found_ids[n] * rb, packed + n * rb, (size_t)rb) == 0) {
            n++;
        }
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        if (append_long(blocks, found_ids[t]) < 0 || append_long(serials, found_serials[t]) < 0)
            goto done;
    }
    ok = 1;
done:
    free_scratch(found_ids, stack);
    free_scratch(found_serials, sstack);
    free_scratch(packed, bstack);
    Py_XDECREF(seq);
    release_all(&pool.bufs);
    return ok ? PyLong_FromSsize_t(n) : NULL;
}

/* -- module ------------------------------------------------------------------------------- */

static PyMethodDef cpool_methods[] = {
    {"allocate", (PyCFunction)(void (*)(void))cpool_allocate, METH_FASTCALL, allocate_doc},
    {"touch", (PyCFunction)(void (*)(void))cpool_touch, METH_FASTCALL, touch_doc},
    {"free", (PyCFunction)(void (*)(void))cpool_free, METH_FASTCALL, free_doc},
    {"commit", (PyCFunction)(void (*)(void))cpool_commit, METH_FASTCALL, commit_doc},
    {"find_hit", (PyCFunction)(void (*)(void))cpool_find_hit, METH_FASTCALL, find_hit_doc},
    {"extend_hashes", (PyCFunction)(void (*)(void))cpool_extend_hashes, METH_FASTCALL,
     extend_hashes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cpool_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "servekit.kv._cpool",
    .m_doc = "Optional C core of servekit.kv.BlockPool's per-block loops (see blocks.py).",
    .m_size = 0,
    .m_methods = cpool_methods,
};

PyMODINIT_FUNC
PyInit__cpool(void)
{
    return PyModuleDef_Init(&cpool_module);
}
