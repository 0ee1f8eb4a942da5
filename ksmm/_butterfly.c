/* A stack of 2x2 butterfly levels applied to each row of x (n rows of P values), forward and
 * backward: the fused CPU kernel behind ksmm.native.
 *
 * Level t has KS pattern (a, 2, 2, d) with a * 2 * d = P; its 2x2 block (i, l) mixes positions
 * p = i*2d + l and p + d. Written per position, a level is
 *     y[p] = A[p] x[p] + B[p] x[partner(p)],   partner(p) = p + d or p - d,
 * where the planes A (the block's diagonal) and B (its off-diagonal) are laid out like the row
 * itself. So every level, whatever its d, is the same contiguous vector loop, and the weight
 * gradient is gA[p] += g[p] x[p], gB[p] += g[p] x[partner(p)]: per-position sums over rows,
 * with no horizontal reductions. For d < V the partner sits in the same V-float vector (one
 * shuffle); V is 16 (AVX-512 and the generic build) or 8 (AVX2, whose registers hold 8).
 *
 * Memory traffic, not arithmetic, sets the time, so: rows go through the levels in blocks of
 * KS_R, which share each level's planes and sums; two levels run in one pass where both fit
 * whole vectors (radix 4); the backward pass recomputes a block's level inputs instead of
 * keeping them from the forward pass; strided rows are gathered into scratch a group at a
 * time (16 columns of a rank-r factor by V x V vector transposes); rows in scratch are padded so
 * that those a pass streams do not share one L1 set.
 *
 * Weights are stored as KSLinear stores them, (a*d, c=2, b=2): wb = w + (i*d + l)*4 and
 * wb[k*2 + j] is the entry from input k to output j of block (i, l). With trans every block is
 * applied transposed.
 */
#ifndef KS_BODY /* the shared part; the per-variant body follows the #else */
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* The float32 code is compiled once per instruction set, each with its own vector width, and
 * picked at run time (ks_isa): x86-64-v4 (AVX-512 + FMA, 16-float vectors), x86-64-v3 (AVX2 +
 * FMA, 8-float vectors: gcc lowers the shuffles of a 16-float vector to scalar moves on AVX2,
 * which made that build 4-7x slower than AVX-512), and a generic build for the compiler's
 * default target. x86 + gcc only; -DKS_ISA_AVX2 leaves out the AVX-512 code (to measure an
 * AVX2-only CPU on an AVX-512 one), -DKS_ISA_GENERIC builds the generic code alone.
 * ks_build_info reports what a build has. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(KS_ISA_GENERIC)
#define KS_HAVE_V3 1
#ifdef KS_ISA_AVX2
#define KS_HAVE_V4 0
#else
#define KS_HAVE_V4 1
#endif
#else
#define KS_HAVE_V3 0
#define KS_HAVE_V4 0
#endif
/* inlined into the entry points, so compiled for their instruction set */
#define KS_INLINE static inline __attribute__((always_inline))

#ifdef __clang__
#define KS_SHUF(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define KS_SHUF2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define KS_SHUF(v, ...) __builtin_shuffle(v, (VI){__VA_ARGS__})
#define KS_SHUF2(a, b, ...) __builtin_shuffle(a, b, (VI){__VA_ARGS__})
#endif

/* A tile transpose in rounds that swap blocks of b lanes between vectors b apart. Of vectors a
 * and c = v[i + b], a keeps its lanes j without bit b and takes c's lanes j - b; c keeps its
 * lanes with bit b and takes a's lanes j + b (indices >= KS_V are c's). */
#define KS_LO16_8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define KS_HI16_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define KS_LO16_4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define KS_HI16_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define KS_LO16_2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define KS_HI16_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define KS_LO16_1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define KS_HI16_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define KS_LO8_4 0, 1, 2, 3, 8, 9, 10, 11
#define KS_HI8_4 4, 5, 6, 7, 12, 13, 14, 15
#define KS_LO8_2 0, 1, 8, 9, 4, 5, 12, 13
#define KS_HI8_2 2, 3, 10, 11, 6, 7, 14, 15
#define KS_LO8_1 0, 8, 2, 10, 4, 12, 6, 14
#define KS_HI8_1 1, 9, 3, 11, 5, 13, 7, 15
#define KS_SWAP(b, lo, hi)                                                                     \
    for (int i = 0; i < KS_V; ++i)                                                             \
        if (!(i & (b))) {                                                                      \
            const VF a_ = v[i], c_ = v[i + (b)];                                               \
            v[i] = KS_SHUF2(a_, c_, lo), v[i + (b)] = KS_SHUF2(a_, c_, hi);                    \
        }

/* whether a level of distance d over P positions fits whole V-float vectors: d a power of
 * two, its pairs in one vector (d < V) or in two (then bit d of a position tells the lower
 * slot) */
static int ks_vec_ok(long d, long P, int V) {
    return P % V == 0 && (d & (d - 1)) == 0 && (d >= V || V % (2 * d) == 0);
}

/* rows a pass carries together (a block; a short last block is filled up with dummy rows) */
#ifndef KS_R
#define KS_R 4
#endif
/* rows in scratch are this far apart: rows P = 4096 floats apart all map to one L1 set */
#define KS_PITCH(P) ((P) + 16)

/* One or two levels on a block of rows, as slots: a level whose pairs lie in different vectors
 * (big: d >= V) pairs slot k with slot k ^ bit (bit 1 for the first level, 2 for the second);
 * a small level pairs lanes inside a slot (ks_partner). Slots a level does not spread over are
 * unused. */
#define KS_SLOT(k) ((!((k) & 1) || bigA) && (!((k) & 2) || bigB))
#define KS_MIX(v, k, bit, big, d) ((big) ? (v)[(k) ^ (bit)] : KS_FN(ks_partner)((v)[k], d))
#define KS_EACH(k) for (int k = 0; k < 4; ++k) if (KS_SLOT(k))

/* rows of a strided array are gathered (and scattered) a group at a time: a cache line holds
 * the same position of 16 rows */
#define KS_GROUP 16

/* rows to a group: up to KS_GROUP, fewer when the rows would not keep every thread busy */
static long ks_group(long n, int nthreads) {
    long g = (n + nthreads - 1) / nthreads;
    g = (g + KS_R - 1) / KS_R * KS_R;
    return g < KS_R ? KS_R : g < KS_GROUP ? g : KS_GROUP; /* never 0: it is a loop step */
}

/* rows of scratch each thread of a pass owns, pitch apart: its own copy of the planes (built
 * by the thread that reads them: planes built by another core cost a cross-core transfer per
 * cache line, which on a VM whose two vCPUs sit on different dies doubled a rank-8 call), row
 * blocks and group rows, and for the backward pass the planes' gradient sums and a row of
 * zeros */
static long ks_rows_per_thread(int backward, int L) {
    return backward ? 4 * L + (long)(L + 2) * KS_R + 1 + 3 * KS_GROUP
                    : 2 * L + 3 * KS_R + 2 * KS_GROUP;
}

/* elements of scratch a pass needs */
long ks_scratch_size(int backward, long P, int L, int nthreads) {
    return nthreads * ks_rows_per_thread(backward, L) * KS_PITCH(P);
}

/* What this build has, as bits: 1 OpenMP, 2 the AVX2 code, 4 the AVX-512 code. A build that
 * lost one of them still runs (slower), so the loader reads this and says so. */
int ks_build_info(void) {
    int info = 0;
#ifdef _OPENMP
    info |= 1;
#endif
    info |= KS_HAVE_V3 ? 2 : 0;
    info |= KS_HAVE_V4 ? 4 : 0;
    return info;
}

/* The float32 code this CPU runs: 2 x86-64-v4 (AVX-512), 1 x86-64-v3 (AVX2 + FMA), 0 generic.
 * Worked out once (a benign race: every thread computes the same value). */
int ks_isa(void) {
    static int isa = -1;
    if (isa < 0) {
        int found = 0;
#if KS_HAVE_V3
        __builtin_cpu_init();
        if (KS_HAVE_V4 && __builtin_cpu_supports("x86-64-v4")) found = 2;
        else if (__builtin_cpu_supports("x86-64-v3")) found = 1;
#endif
        isa = found;
    }
    return isa;
}

static inline int ks_thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int ks_team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* The per-variant functions are written once, after the #else, and compiled once per variant
 * by including this file into itself with T (the element type), S (the name suffix), KS_VEC
 * (whether the vector code applies), KS_V (its width) and KS_ENTRY (the entry points' linkage)
 * set; the body #undefs them at its end. Unlike a macro body, each line keeps its own line
 * number for compiler errors and debuggers. The x86 variants are compiled under #pragma GCC
 * target for their instruction set. */
#define KS_CAT2(a, b) a##_##b
#define KS_CAT(a, b) KS_CAT2(a, b)
#define KS_FN(name) KS_CAT(name, S)
#define VF KS_FN(ks_vf)
#define VI KS_FN(ks_vi)
#define KS_BODY

#if KS_HAVE_V4
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define T float
#define S f32_v4
#define KS_VEC 1
#define KS_V 16
#define KS_ENTRY static
#include "_butterfly.c" /* this file: quoted includes look in its own folder first */
#pragma GCC pop_options
#endif

#if KS_HAVE_V3
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define T float
#define S f32_v3
#define KS_VEC 1
#define KS_V 8
#define KS_ENTRY static
#include "_butterfly.c"
#pragma GCC pop_options
#endif

#define T float
#define S f32_generic
#define KS_VEC 1
#define KS_V 16
#define KS_ENTRY static
#include "_butterfly.c"

#define T double
#define S f64
#define KS_VEC 0
#define KS_V 16
#define KS_ENTRY
#include "_butterfly.c"

/* y = scale * (x through the levels), float32, with the code for this CPU's instruction set;
 * arguments as ks_butterfly_forward_f64 takes them */
void ks_butterfly_forward_f32(const float *x, const long *sx, float *y, const long *sy, long n,
                              long P, int L, const long *ds, float *const *ws, int trans,
                              float scale, float *mem, int nthreads) {
    switch (ks_isa()) {
#if KS_HAVE_V4
    case 2:
        ks_butterfly_forward_f32_v4(x, sx, y, sy, n, P, L, ds, ws, trans, scale, mem, nthreads);
        return;
#endif
#if KS_HAVE_V3
    case 1:
        ks_butterfly_forward_f32_v3(x, sx, y, sy, n, P, L, ds, ws, trans, scale, mem, nthreads);
        return;
#endif
    default:
        ks_butterfly_forward_f32_generic(x, sx, y, sy, n, P, L, ds, ws, trans, scale, mem,
                                         nthreads);
    }
}

/* its backward pass, float32; arguments as ks_butterfly_backward_f64 takes them */
void ks_butterfly_backward_f32(const float *x, const long *sx, const float *gy, const long *sgy,
                               float *gx, const long *sgx, long n, long P, int L, const long *ds,
                               float *const *ws, int trans, float scale, float *const *gws,
                               float *mem, int nthreads) {
    switch (ks_isa()) {
#if KS_HAVE_V4
    case 2:
        ks_butterfly_backward_f32_v4(x, sx, gy, sgy, gx, sgx, n, P, L, ds, ws, trans, scale, gws,
                                     mem, nthreads);
        return;
#endif
#if KS_HAVE_V3
    case 1:
        ks_butterfly_backward_f32_v3(x, sx, gy, sgy, gx, sgx, n, P, L, ds, ws, trans, scale, gws,
                                     mem, nthreads);
        return;
#endif
    default:
        ks_butterfly_backward_f32_generic(x, sx, gy, sgy, gx, sgx, n, P, L, ds, ws, trans, scale,
                                          gws, mem, nthreads);
    }
}

#else /* KS_BODY: the per-variant functions */

#if KS_VEC
/* KS_V floats, unaligned loads and stores */
typedef float VF __attribute__((vector_size(4 * KS_V), aligned(4), may_alias));
#ifndef __clang__
typedef int VI __attribute__((vector_size(4 * KS_V)));
#endif

KS_INLINE VF KS_FN(ks_ld)(const float *p) { return *(const VF *)p; }
KS_INLINE void KS_FN(ks_st)(float *p, VF v) { *(VF *)p = v; }

/* lane p ^ d, for d < KS_V (a power of two) */
KS_INLINE VF KS_FN(ks_partner)(VF v, long d) {
#if KS_V == 16
    switch (d) {
    case 1: return KS_SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    case 2: return KS_SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    case 4: return KS_SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    default: return KS_SHUF(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    }
#else
    switch (d) {
    case 1: return KS_SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6);
    case 2: return KS_SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5);
    default: return KS_SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3);
    }
#endif
}

/* d[k*dl + j] = s[j*sl + k] for a KS_V x KS_V tile (the rows of one side are the columns of
 * the other) */
KS_INLINE void KS_FN(ks_tile)(const float *s, long sl, float *d, long dl) {
    VF v[KS_V];
    for (int k = 0; k < KS_V; ++k) v[k] = KS_FN(ks_ld)(s + k * sl);
#if KS_V == 16
    KS_SWAP(8, KS_LO16_8, KS_HI16_8)
    KS_SWAP(4, KS_LO16_4, KS_HI16_4)
    KS_SWAP(2, KS_LO16_2, KS_HI16_2)
    KS_SWAP(1, KS_LO16_1, KS_HI16_1)
#else
    KS_SWAP(4, KS_LO8_4, KS_HI8_4)
    KS_SWAP(2, KS_LO8_2, KS_HI8_2)
    KS_SWAP(1, KS_LO8_1, KS_HI8_1)
#endif
    for (int k = 0; k < KS_V; ++k) KS_FN(ks_st)(d + k * dl, v[k]);
}

/* x[j] -> y[j] through level a (planes Aa, Ba) and, if two, level b: one read and one write
 * of each row */
KS_INLINE void KS_FN(ks_pass_fwd_slots)(long da, long db, const float *Aa, const float *Ba,
                                        const float *Ab, const float *Bb, const float *const *x,
                                        float *const *y, long P, const int two, const int bigA,
                                        const int bigB) {
    const long oa = bigA ? da : 0, ob = bigB ? db : 0, off[4] = {0, oa, ob, oa + ob};
    for (long p = 0; p < P; p += KS_V) {
        if (p & (oa | ob)) continue; /* the upper slot of a big pair */
        VF aa[4], ba[4], ab[4], bb[4];
        KS_EACH(k) {
            aa[k] = KS_FN(ks_ld)(Aa + p + off[k]), ba[k] = KS_FN(ks_ld)(Ba + p + off[k]);
            if (two) ab[k] = KS_FN(ks_ld)(Ab + p + off[k]), bb[k] = KS_FN(ks_ld)(Bb + p + off[k]);
        }
        for (int j = 0; j < KS_R; ++j) {
            VF v[4], m[4];
            KS_EACH(k) v[k] = KS_FN(ks_ld)(x[j] + p + off[k]);
            KS_EACH(k) m[k] = aa[k] * v[k] + ba[k] * KS_MIX(v, k, 1, bigA, da);
            if (two) KS_EACH(k) v[k] = ab[k] * m[k] + bb[k] * KS_MIX(m, k, 2, bigB, db);
            KS_EACH(k) KS_FN(ks_st)(y[j] + p + off[k], two ? v[k] : m[k]);
        }
    }
}

/* x: level a's inputs, g: the gradients of the pass's outputs -> h: of its inputs; sAa .. sBb
 * accumulate the planes' gradients. Level a's outputs (level b's inputs) are recomputed. */
KS_INLINE void KS_FN(ks_pass_bwd_slots)(long da, long db, const float *Aa, const float *Ba,
                                        const float *Ab, const float *Bb, const float *const *x,
                                        const float *const *g, float *const *h, float *sAa,
                                        float *sBa, float *sAb, float *sBb, long P, const int two,
                                        const int bigA, const int bigB) {
    const long oa = bigA ? da : 0, ob = bigB ? db : 0, off[4] = {0, oa, ob, oa + ob};
    for (long p = 0; p < P; p += KS_V) {
        if (p & (oa | ob)) continue;
        VF aa[4], ba[4], ab[4], bb[4], saa[4], sba[4], sab[4], sbb[4];
        KS_EACH(k) {
            const long q = p + off[k];
            aa[k] = KS_FN(ks_ld)(Aa + q), ba[k] = KS_FN(ks_ld)(Ba + q);
            saa[k] = KS_FN(ks_ld)(sAa + q), sba[k] = KS_FN(ks_ld)(sBa + q);
            if (two) {
                ab[k] = KS_FN(ks_ld)(Ab + q), bb[k] = KS_FN(ks_ld)(Bb + q);
                sab[k] = KS_FN(ks_ld)(sAb + q), sbb[k] = KS_FN(ks_ld)(sBb + q);
            }
        }
        for (int j = 0; j < KS_R; ++j) {
            VF v[4], m[4], gm[4], t[4];
            KS_EACH(k) {
                v[k] = KS_FN(ks_ld)(x[j] + p + off[k]);
                gm[k] = KS_FN(ks_ld)(g[j] + p + off[k]);
            }
            if (two) {
                KS_EACH(k) m[k] = aa[k] * v[k] + ba[k] * KS_MIX(v, k, 1, bigA, da);
                KS_EACH(k) t[k] = bb[k] * gm[k];
                KS_EACH(k) { /* through level b: gm becomes the gradient of level a's output */
                    sab[k] += gm[k] * m[k];
                    sbb[k] += gm[k] * KS_MIX(m, k, 2, bigB, db);
                    gm[k] = ab[k] * gm[k] + KS_MIX(t, k, 2, bigB, db);
                }
            }
            KS_EACH(k) t[k] = ba[k] * gm[k];
            KS_EACH(k) {
                KS_FN(ks_st)(h[j] + p + off[k], aa[k] * gm[k] + KS_MIX(t, k, 1, bigA, da));
                saa[k] += gm[k] * v[k];
                sba[k] += gm[k] * KS_MIX(v, k, 1, bigA, da);
            }
        }
        KS_EACH(k) {
            const long q = p + off[k];
            KS_FN(ks_st)(sAa + q, saa[k]), KS_FN(ks_st)(sBa + q, sba[k]);
            if (two) KS_FN(ks_st)(sAb + q, sab[k]), KS_FN(ks_st)(sBb + q, sbb[k]);
        }
    }
}

/* Each combination of (two levels, first big, second big) as constants, so that each compiles
 * to straight-line code. */
static void KS_FN(ks_pass_fwd_vec)(long da, long db, const float *Aa, const float *Ba,
                                   const float *Ab, const float *Bb, const float *const *x,
                                   float *const *y, long P, int two) {
    const int big_a = da >= KS_V, big_b = two && db >= KS_V;
    if (!two && big_a) KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 0, 1, 0);
    else if (!two) KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 0, 0, 0);
    else if (big_a && big_b) KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 1, 1, 1);
    else if (big_a) KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 1, 1, 0);
    else if (big_b) KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 1, 0, 1);
    else KS_FN(ks_pass_fwd_slots)(da, db, Aa, Ba, Ab, Bb, x, y, P, 1, 0, 0);
}

static void KS_FN(ks_pass_bwd_vec)(long da, long db, const float *Aa, const float *Ba,
                                   const float *Ab, const float *Bb, const float *const *x,
                                   const float *const *g, float *const *h, float *sAa, float *sBa,
                                   float *sAb, float *sBb, long P, int two) {
    const int big_a = da >= KS_V, big_b = two && db >= KS_V;
    if (!two && big_a)
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 0, 1, 0);
    else if (!two)
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 0, 0, 0);
    else if (big_a && big_b)
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 1, 1, 1);
    else if (big_a)
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 1, 1, 0);
    else if (big_b)
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 1, 0, 1);
    else
        KS_FN(ks_pass_bwd_slots)(da, db, Aa, Ba, Ab, Bb, x, g, h, sAa, sBa, sAb, sBb, P, 1, 0, 0);
}

#endif /* KS_VEC */

/* levels in the pass that starts at level t: two when both fit whole vectors and their
 * distances differ (each must own a bit of the position) */
static int KS_FN(ks_step)(const long *ds, int t, int L, long P) {
    if (KS_VEC && t + 1 < L && ks_vec_ok(ds[t], P, KS_V) && ks_vec_ok(ds[t + 1], P, KS_V) &&
        ds[t] != ds[t + 1])
        return 2;
    return 1;
}

/* the pass of levels t .. t+k-1 on a block: x[j] -> y[j]; A, B: planes, pitch apart */
KS_INLINE void KS_FN(ks_fwd)(const long *ds, int t, int k, const T *A, const T *B,
                             long pitch, const T *const *x, T *const *y, long P) {
    const T *a = A + t * pitch, *b = B + t * pitch;
#if KS_VEC
    if (ks_vec_ok(ds[t], P, KS_V)) {
        KS_FN(ks_pass_fwd_vec)(ds[t], k == 2 ? ds[t + 1] : 0, a, b, a + pitch, b + pitch, x, y,
                               P, k == 2);
        return;
    }
#endif
    (void)k; /* the scalar loop runs one level a pass */
    const long d = ds[t];
    for (int j = 0; j < KS_R; ++j)
        for (long p0 = 0; p0 < P; p0 += 2 * d)
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {
                const T u = x[j][p], v = x[j][q];
                y[j][p] = a[p] * u + b[p] * v;
                y[j][q] = a[q] * v + b[q] * u;
            }
}

/* its backward: g[j], the gradient of y[j] -> h[j], of x[j]; gA, gB accumulate */
KS_INLINE void KS_FN(ks_bwd)(const long *ds, int t, int k, const T *A, const T *B, T *gA,
                             T *gB, long pitch, const T *const *x, const T *const *g,
                             T *const *h, long P) {
    const T *a = A + t * pitch, *b = B + t * pitch;
    T *sa = gA + t * pitch, *sb = gB + t * pitch;
#if KS_VEC
    if (ks_vec_ok(ds[t], P, KS_V)) {
        KS_FN(ks_pass_bwd_vec)(ds[t], k == 2 ? ds[t + 1] : 0, a, b, a + pitch, b + pitch, x, g,
                               h, sa, sb, sa + pitch, sb + pitch, P, k == 2);
        return;
    }
#endif
    (void)k; /* the scalar loop runs one level a pass */
    const long d = ds[t];
    for (int j = 0; j < KS_R; ++j)
        for (long p0 = 0; p0 < P; p0 += 2 * d)
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {
                const T u = x[j][p], v = x[j][q], gp = g[j][p], gq = g[j][q];
                h[j][p] = a[p] * gp + b[q] * gq;
                h[j][q] = a[q] * gq + b[p] * gp;
                sa[p] += gp * u, sb[p] += gp * v, sa[q] += gq * v, sb[q] += gq * u;
            }
}

/* level t's planes from its weights, times f: position p = i*2d + l (block e = i*d + l, entry
 * 0 of its pair) and q = p + d (entry 1) */
KS_INLINE void KS_FN(ks_planes)(T *A, T *B, long P, long d, const T *w, int trans, T f) {
    long e = 0;
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {
            const T *wb = w + e * 4;
            A[p] = f * wb[0], A[q] = f * wb[3];
            B[p] = f * (trans ? wb[1] : wb[2]), B[q] = f * (trans ? wb[2] : wb[1]);
        }
}

/* every level's planes, the last one's times scale (the chain's output scale, for free) */
KS_INLINE void KS_FN(ks_all_planes)(T *A, T *B, long pitch, long P, int L, const long *ds,
                                    T *const *ws, int trans, T scale) {
    for (int t = 0; t < L; ++t)
        KS_FN(ks_planes)(A + t * pitch, B + t * pitch, P, ds[t], ws[t], trans,
                         t == L - 1 ? scale : 1);
}

/* dst = src for (n, P) arrays with any strides, in 16 x 16 tiles so that both sides are read
 * and written a cache line at a time (the inner loop runs along a row: rows P apart would all
 * map to one L1 set) */
KS_INLINE void KS_FN(ks_copy)(const T *src, const long *ss, T *dst, const long *sd, long n,
                              long P) {
#if KS_VEC
    /* rows between columns (rows 1 apart) and rows (positions 1 apart), e.g. a rank-r
     * factor's rows into scratch and back: a vector transpose per V x V tile */
    if (n % KS_V == 0 && P % KS_V == 0 && ss[0] == 1 && sd[1] == 1) {
        for (long i0 = 0; i0 < n; i0 += KS_V)
            for (long p0 = 0; p0 < P; p0 += KS_V)
                KS_FN(ks_tile)(src + i0 + p0 * ss[1], ss[1], dst + i0 * sd[0] + p0, sd[0]);
        return;
    }
    if (n % KS_V == 0 && P % KS_V == 0 && ss[1] == 1 && sd[0] == 1) {
        for (long i0 = 0; i0 < n; i0 += KS_V)
            for (long p0 = 0; p0 < P; p0 += KS_V)
                KS_FN(ks_tile)(src + i0 * ss[0] + p0, ss[0], dst + i0 + p0 * sd[1], sd[1]);
        return;
    }
#endif
    for (long p0 = 0; p0 < P; p0 += 16)
        for (long i = 0; i < n; ++i)
            for (long p = p0; p < p0 + 16 && p < P; ++p)
                dst[i * sd[0] + p * sd[1]] = src[i * ss[0] + p * ss[1]];
}

/* y = scale * (x through the levels); x and y (n, P) with strides (sx[0], sx[1]) and (sy[0],
 * sy[1]); mem: ks_scratch_size(0, P, L, nthreads) elements of scratch */
KS_ENTRY void KS_FN(ks_butterfly_forward)(const T *x, const long *sx, T *y, const long *sy,
                                           long n, long P, int L, const long *ds, T *const *ws,
                                           int trans, T scale, T *mem, int nthreads) {
    const long pitch = KS_PITCH(P), G = ks_group(n, nthreads), gs[2] = {pitch, 1};
    const long per = ks_rows_per_thread(0, L) * pitch;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        /* the planes; then row j of block k: s + (k*KS_R + j)*pitch; blocks 0 and 1 hold
         * alternate passes' outputs, block 2 those of dummy rows; then a group of strided x and
         * y rows */
        T *A = mem + ks_thread_num() * per, *B = A + L * pitch, *s = B + L * pitch;
        T *xbuf = s + 3 * KS_R * pitch, *ybuf = xbuf + KS_GROUP * pitch;
        KS_FN(ks_all_planes)(A, B, pitch, P, L, ds, ws, trans, scale);
#pragma omp for schedule(static)
        for (long g0 = 0; g0 < n; g0 += G) { /* a group of rows: up to KS_GROUP */
            const long gn = n - g0 < G ? n - g0 : G;
            const T *xg = x + g0 * sx[0];
            T *yg = sy[1] == 1 ? y + g0 * sy[0] : ybuf;
            const long xs = sx[1] == 1 ? sx[0] : pitch, ys = sy[1] == 1 ? sy[0] : pitch;
            if (sx[1] != 1) KS_FN(ks_copy)(xg, sx, xbuf, gs, gn, P), xg = xbuf;
            for (long r0 = 0; r0 < gn; r0 += KS_R) {
                const T *cur[KS_R];
                T *out[KS_R];
                for (int j = 0; j < KS_R; ++j) cur[j] = xg + (r0 + j < gn ? r0 + j : r0) * xs;
                for (int t = 0, i = 0, k; t < L; t += k, ++i) { /* pass i: levels t.. */
                    k = KS_FN(ks_step)(ds, t, L, P);
                    for (int j = 0; j < KS_R; ++j)
                        out[j] = t + k < L    ? s + (i % 2 * KS_R + j) * pitch
                                 : r0 + j < gn ? yg + (r0 + j) * ys
                                               : s + (2 * KS_R + j) * pitch;
                    KS_FN(ks_fwd)(ds, t, k, A, B, pitch, cur, out, P);
                    for (int j = 0; j < KS_R; ++j) cur[j] = out[j];
                }
            }
            if (sy[1] != 1) KS_FN(ks_copy)(ybuf, gs, y + g0 * sy[0], sy, gn, P);
        }
    }
}

/* Level t's weight gradient in the weight's layout from every thread's gA, gB sums (thread k's
 * start at sums + k * per; gB is L * pitch after gA). */
KS_INLINE void KS_FN(ks_weight_grad)(const T *sums, long per, int team, int t, int L,
                                     long pitch, long P, long d, int trans, T f, T *w) {
    long e = 0;
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {
            T ap = 0, aq = 0, bp = 0, bq = 0;
            for (int k = 0; k < team; ++k) {
                const T *a = sums + k * per + t * pitch;
                ap += a[p], aq += a[q];
                bp += a[L * pitch + p], bq += a[L * pitch + q];
            }
            T *wb = w + e * 4;
            wb[0] = f * ap, wb[3] = f * aq;
            wb[trans ? 1 : 2] = f * bp, wb[trans ? 2 : 1] = f * bq;
        }
}

/* gy: the output's gradient; gx: the input's (NULL: not wanted); gws[t]: level t's weight
 * gradient in the weight's layout (all overwritten). Strides as in the forward pass; mem:
 * ks_scratch_size(1, P, L, nthreads) elements of scratch. */
KS_ENTRY void KS_FN(ks_butterfly_backward)(const T *x, const long *sx, const T *gy,
                                            const long *sgy, T *gx, const long *sgx, long n,
                                            long P, int L, const long *ds, T *const *ws,
                                            int trans, T scale, T *const *gws, T *mem,
                                            int nthreads) {
    /* planes; per thread: gA and gB sums, L + 2 row blocks, a row of zeros, and a group of
     * strided x, gy and gx rows */
    const long pitch = KS_PITCH(P), G = ks_group(n, nthreads), gs[2] = {pitch, 1};
    const long per = ks_rows_per_thread(1, L) * pitch;
    T *const sums = mem + 2 * L * pitch; /* thread k's gA: sums + k * per */
    int ts[L + 1], np = 0; /* the passes' first levels */
    for (int t = 0; t < L; t += KS_FN(ks_step)(ds, t, L, P)) ts[np++] = t;
    ts[np] = L;
    int team = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp single
        team = ks_team_size();
        /* the planes, their gradient sums, then row j of block k: s + (k*KS_R + j)*pitch.
         * Block i (1 <= i < np): the input of pass i; blocks 0 and np: gradients; block
         * L + 1: dummy rows' gradients */
        T *A = mem + ks_thread_num() * per, *B = A + L * pitch;
        T *gA = B + L * pitch, *gB = gA + L * pitch, *s = gB + L * pitch;
        T *zero = s + (L + 2) * KS_R * pitch, *xbuf = zero + pitch;
        T *gybuf = xbuf + KS_GROUP * pitch, *gxbuf = gybuf + KS_GROUP * pitch;
        memset(gA, 0, sizeof(T) * 2 * L * pitch);
        memset(zero, 0, sizeof(T) * P);
        KS_FN(ks_all_planes)(A, B, pitch, P, L, ds, ws, trans, scale);
#pragma omp for schedule(static)
        for (long g0 = 0; g0 < n; g0 += G) {
            const long gn = n - g0 < G ? n - g0 : G;
            const T *xg = x + g0 * sx[0], *gyg = gy + g0 * sgy[0];
            T *gxg = sgx[1] == 1 ? gx + g0 * sgx[0] : gxbuf;
            const long xs = sx[1] == 1 ? sx[0] : pitch, gys = sgy[1] == 1 ? sgy[0] : pitch;
            const long gxs = sgx[1] == 1 ? sgx[0] : pitch;
            if (sx[1] != 1) KS_FN(ks_copy)(xg, sx, xbuf, gs, gn, P), xg = xbuf;
            if (sgy[1] != 1) KS_FN(ks_copy)(gyg, sgy, gybuf, gs, gn, P), gyg = gybuf;
            for (long r0 = 0; r0 < gn; r0 += KS_R) {
                /* dummy rows: row r0's input and a zero gradient, which adds nothing */
                const T *in0[KS_R], *cur[KS_R], *g[KS_R], *lin[KS_R];
                T *out[KS_R];
                for (int j = 0; j < KS_R; ++j) {
                    cur[j] = in0[j] = xg + (r0 + j < gn ? r0 + j : r0) * xs;
                    g[j] = r0 + j < gn ? gyg + (r0 + j) * gys : zero;
                }
                for (int i = 0; i < np - 1; ++i) { /* the passes' inputs, again */
                    for (int j = 0; j < KS_R; ++j) out[j] = s + ((i + 1) * KS_R + j) * pitch;
                    KS_FN(ks_fwd)(ds, ts[i], ts[i + 1] - ts[i], A, B, pitch, cur, out, P);
                    for (int j = 0; j < KS_R; ++j) cur[j] = out[j];
                }
                for (int i = np - 1; i >= 0; --i) {
                    for (int j = 0; j < KS_R; ++j) {
                        lin[j] = i ? s + (i * KS_R + j) * pitch : in0[j];
                        out[j] = i                   ? s + ((i % 2 ? 0 : np) * KS_R + j) * pitch
                                 : r0 + j < gn && gx ? gxg + (r0 + j) * gxs
                                                     : s + ((L + 1) * KS_R + j) * pitch;
                    }
                    KS_FN(ks_bwd)(ds, ts[i], ts[i + 1] - ts[i], A, B, gA, gB, pitch, lin, g, out,
                                  P);
                    for (int j = 0; j < KS_R; ++j) g[j] = out[j];
                }
            }
            if (gx && sgx[1] != 1) KS_FN(ks_copy)(gxbuf, gs, gx + g0 * sgx[0], sgx, gn, P);
        }
        /* sum the threads' gA, gB into the weights' layout */
#pragma omp for schedule(static)
        for (int t = 0; t < L; ++t)
            KS_FN(ks_weight_grad)(sums, per, team, t, L, pitch, P, ds[t], trans,
                                  t == L - 1 ? scale : 1, gws[t]);
    }
}

/* the variant's parameters, so that the next #include can set them again */
#undef T
#undef S
#undef KS_VEC
#undef KS_V
#undef KS_ENTRY

#endif /* KS_BODY */
