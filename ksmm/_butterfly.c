/* A stack of 2x2 butterfly levels applied to each row of x (n rows of P values), forward and
 * backward: the fused CPU kernel behind ksmm.native.
 *
 * Level t has KS pattern (a, 2, 2, d) with a * 2 * d = P; its 2x2 block (i, l) mixes positions
 * p = i*2d + l and p + d. Written per position, a level is
 *     y[p] = A[p] x[p] + B[p] x[partner(p)],   partner(p) = p + d or p - d,
 * where the planes A (the block's diagonal) and B (its off-diagonal) are laid out like the row
 * itself. So every level, whatever its d, is the same contiguous vector loop, and the weight
 * gradient is gA[p] += g[p] x[p], gB[p] += g[p] x[partner(p)]: per-position sums over rows,
 * with no horizontal reductions. For d < 16 the partner sits in the same 16-float vector (one
 * shuffle).
 *
 * Each row runs through all levels while it is in L1 (16 KB at P = 4096), so a call reads x once
 * and writes y once. The backward pass recomputes a row's level inputs instead of storing them
 * in the forward pass: arithmetic is cheap here, memory traffic is not.
 *
 * Weights are stored as KSLinear stores them, (a*d, c=2, b=2): wb = w + (i*d + l)*4 and
 * wb[k*2 + j] is the entry from input k to output j of block (i, l). With trans every block is
 * applied transposed.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef KS_CLONES /* -DKS_CLONES= builds one generic version */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KS_CLONES
#endif
#endif
/* inlined into each clone, so compiled for its instruction set */
#define KS_INLINE static inline __attribute__((always_inline))

/* 16 floats, unaligned loads and stores */
#define KS_V 16
typedef float ks_vf __attribute__((vector_size(64), aligned(4), may_alias));
#ifdef __clang__
#define KS_SHUF(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
typedef int ks_vi __attribute__((vector_size(64)));
#define KS_SHUF(v, ...) __builtin_shuffle(v, (ks_vi){__VA_ARGS__})
#endif

KS_INLINE ks_vf ks_ld(const float *p) { return *(const ks_vf *)p; }
KS_INLINE void ks_st(float *p, ks_vf v) { *(ks_vf *)p = v; }

/* lane p ^ d, for d in {1, 2, 4, 8} */
KS_INLINE ks_vf ks_partner(ks_vf v, long d) {
    switch (d) {
    case 1: return KS_SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    case 2: return KS_SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    case 4: return KS_SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    default: return KS_SHUF(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    }
}

/* whether a level of distance d over P positions fits whole vectors */
KS_INLINE int ks_vec_ok(long d, long P) {
    return P % KS_V == 0 && (d % KS_V == 0 || KS_V % (2 * d) == 0);
}

KS_INLINE void ks_fwd_vec(long d, const float *A, const float *B, const float *x, float *y,
                          long P) {
    if (d < KS_V) {
        for (long p = 0; p < P; p += KS_V) {
            const ks_vf u = ks_ld(x + p);
            ks_st(y + p, ks_ld(A + p) * u + ks_ld(B + p) * ks_partner(u, d));
        }
        return;
    }
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; p += KS_V, q += KS_V) {
            const ks_vf u = ks_ld(x + p), v = ks_ld(x + q);
            ks_st(y + p, ks_ld(A + p) * u + ks_ld(B + p) * v);
            ks_st(y + q, ks_ld(A + q) * v + ks_ld(B + q) * u);
        }
}

/* g: the gradient of y -> h: the gradient of x; gA, gB accumulate */
KS_INLINE void ks_bwd_vec(long d, const float *A, const float *B, const float *x,
                          const float *g, float *h, float *gA, float *gB, long P) {
    if (d < KS_V) {
        for (long p = 0; p < P; p += KS_V) {
            const ks_vf gv = ks_ld(g + p), u = ks_ld(x + p);
            ks_st(h + p, ks_ld(A + p) * gv + ks_partner(ks_ld(B + p) * gv, d));
            ks_st(gA + p, ks_ld(gA + p) + gv * u);
            ks_st(gB + p, ks_ld(gB + p) + gv * ks_partner(u, d));
        }
        return;
    }
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; p += KS_V, q += KS_V) {
            const ks_vf u = ks_ld(x + p), v = ks_ld(x + q), gp = ks_ld(g + p), gq = ks_ld(g + q);
            ks_st(h + p, ks_ld(A + p) * gp + ks_ld(B + q) * gq);
            ks_st(h + q, ks_ld(A + q) * gq + ks_ld(B + p) * gp);
            ks_st(gA + p, ks_ld(gA + p) + gp * u);
            ks_st(gB + p, ks_ld(gB + p) + gp * v);
            ks_st(gA + q, ks_ld(gA + q) + gq * v);
            ks_st(gB + q, ks_ld(gB + q) + gq * u);
        }
}

#define KS_DEFINE(T, S, VEC)                                                                   \
    KS_INLINE void ks_fwd_##S(long d, const T *A, const T *B, const T *x, T *y, long P) {      \
        if (VEC && ks_vec_ok(d, P)) {                                                          \
            ks_fwd_vec(d, (const float *)A, (const float *)B, (const float *)x, (float *)y, P); \
            return;                                                                            \
        }                                                                                      \
        for (long p0 = 0; p0 < P; p0 += 2 * d)                                                 \
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {                              \
                const T u = x[p], v = x[q];                                                    \
                y[p] = A[p] * u + B[p] * v;                                                    \
                y[q] = A[q] * v + B[q] * u;                                                    \
            }                                                                                  \
    }                                                                                          \
                                                                                               \
    KS_INLINE void ks_bwd_##S(long d, const T *A, const T *B, const T *x, const T *g, T *h,    \
                              T *gA, T *gB, long P) {                                          \
        if (VEC && ks_vec_ok(d, P)) {                                                          \
            ks_bwd_vec(d, (const float *)A, (const float *)B, (const float *)x,                \
                       (const float *)g, (float *)h, (float *)gA, (float *)gB, P);             \
            return;                                                                            \
        }                                                                                      \
        for (long p0 = 0; p0 < P; p0 += 2 * d)                                                 \
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {                              \
                const T u = x[p], v = x[q], gp = g[p], gq = g[q];                              \
                h[p] = A[p] * gp + B[q] * gq;                                                  \
                h[q] = A[q] * gq + B[p] * gp;                                                  \
                gA[p] += gp * u; gB[p] += gp * v; gA[q] += gq * v; gB[q] += gq * u;            \
            }                                                                                  \
    }                                                                                          \
                                                                                               \
    /* level t's planes from its weights: position p = i*2d + l (block i*d + l, entry 0 of its \
     * pair) and q = p + d (entry 1) */                                                        \
    KS_INLINE void ks_planes_##S(T *A, T *B, long P, long d, const T *w, int trans) {          \
        for (long p0 = 0, e = 0; p0 < P; p0 += 2 * d)                                          \
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {                         \
                const T *wb = w + e * 4;                                                       \
                A[p] = wb[0], A[q] = wb[3];                                                    \
                B[p] = trans ? wb[1] : wb[2], B[q] = trans ? wb[2] : wb[1];                    \
            }                                                                                  \
    }                                                                                          \
                                                                                               \
    /* row r of a strided (n, P) array: its start; element p is at row + p * sc */              \
    /* a row to read: the row itself when contiguous, else gathered into buf */                \
    KS_INLINE const T *ks_in_##S(const T *row, long sc, long P, T *buf) {                      \
        if (sc == 1) return row;                                                               \
        for (long p = 0; p < P; ++p) buf[p] = row[p * sc];                                     \
        return buf;                                                                            \
    }                                                                                          \
                                                                                               \
    KS_INLINE void ks_out_##S(T *row, long sc, long P, const T *buf) {                         \
        if (sc != 1)                                                                           \
            for (long p = 0; p < P; ++p) row[p * sc] = buf[p];                                 \
    }                                                                                          \
                                                                                               \
    /* y = x through the levels, x and y (n, P) with strides (sx[0], sx[1]) and (sy[0], sy[1]); \
     * returns 0, or -1 when out of memory */                                                  \
    KS_CLONES int ks_butterfly_forward_##S(const T *x, const long *sx, T *y, const long *sy,   \
                                           long n, long P, int L, const long *ds,              \
                                           T *const *ws, int trans, int nthreads) {            \
        /* planes, then per thread: the input row and two rows of scratch */                   \
        T *mem = malloc(sizeof(T) * (2 * L * P + (size_t)nthreads * 3 * P));                   \
        if (!mem) return -1;                                                                   \
        T *A = mem, *B = mem + L * P;                                                          \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        {                                                                                      \
            int me = 0;                                                                        \
            KS_THREAD_ID(me);                                                                  \
            T *s = mem + 2 * L * P + (size_t)me * 3 * P;                                       \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t) ks_planes_##S(A + t * P, B + t * P, P, ds[t], ws[t], trans); \
            _Pragma("omp for schedule(static)")                                                \
            for (long r = 0; r < n; ++r) {                                                     \
                const T *cur = ks_in_##S(x + r * sx[0], sx[1], P, s + 2 * P);                  \
                T *yr = sy[1] == 1 ? y + r * sy[0] : s + (L - 1) % 2 * P;                      \
                for (int t = 0; t < L; ++t) {                                                  \
                    T *out = t == L - 1 ? yr : s + t % 2 * P;                                  \
                    ks_fwd_##S(ds[t], A + t * P, B + t * P, cur, out, P);                      \
                    cur = out;                                                                 \
                }                                                                              \
                ks_out_##S(y + r * sy[0], sy[1], P, yr);                                       \
            }                                                                                  \
        }                                                                                      \
        free(mem);                                                                             \
        return 0;                                                                              \
    }                                                                                          \
                                                                                               \
    /* gy: the output's gradient; gx: the input's; gws[t]: level t's weight gradient in the   \
     * weight's layout (all overwritten). Strides as in the forward pass. Returns 0, or -1     \
     * when out of memory. */                                                                  \
    KS_CLONES int ks_butterfly_backward_##S(const T *x, const long *sx, const T *gy,           \
                                            const long *sgy, T *gx, const long *sgx, long n,   \
                                            long P, int L, const long *ds, T *const *ws,       \
                                            int trans, T *const *gws, int nthreads) {          \
        /* planes, then per thread: gA and gB sums, and L + 3 rows of scratch */               \
        const size_t per = (size_t)(3 * L + 3) * P;                                            \
        T *mem = malloc(sizeof(T) * (2 * L * P + (size_t)nthreads * per));                     \
        if (!mem) return -1;                                                                   \
        T *A = mem, *B = mem + L * P;                                                          \
        int team = 1;                                                                          \
        const long chunk = sgx[1] == 1 ? (n + nthreads - 1) / nthreads : 16;                  \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        {                                                                                      \
            int me = 0;                                                                        \
            KS_THREAD_ID(me);                                                                  \
            KS_TEAM_SIZE(team);                                                                \
            /* s + t*P: the input of level t; s + L*P, s + (L+1)*P: gradients; then gy */      \
            T *gA = mem + 2 * L * P + (size_t)me * per, *gB = gA + L * P, *s = gB + L * P;     \
            memset(gA, 0, sizeof(T) * 2 * L * P);                                              \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t) ks_planes_##S(A + t * P, B + t * P, P, ds[t], ws[t], trans); \
            /* rows scattered into a strided gx share cache lines: 16 rows to a thread */     \
            _Pragma("omp for schedule(static, chunk)")                                         \
            for (long r = 0; r < n; ++r) {                                                     \
                const T *in0 = ks_in_##S(x + r * sx[0], sx[1], P, s);                          \
                const T *g = ks_in_##S(gy + r * sgy[0], sgy[1], P, s + (L + 2) * P);           \
                for (int t = 0; t < L - 1; ++t)                                                \
                    ks_fwd_##S(ds[t], A + t * P, B + t * P, t ? s + t * P : in0,               \
                               s + (t + 1) * P, P);                                            \
                T *gxr = sgx[1] == 1 ? gx + r * sgx[0] : s + L * P;                            \
                for (int t = L - 1; t >= 0; --t) {                                             \
                    T *h = t == 0 ? gxr : s + (L + t % 2) * P;                                 \
                    ks_bwd_##S(ds[t], A + t * P, B + t * P, t ? s + t * P : in0, g, h,         \
                               gA + t * P, gB + t * P, P);                                     \
                    g = h;                                                                     \
                }                                                                              \
                ks_out_##S(gx + r * sgx[0], sgx[1], P, gxr);                                   \
            }                                                                                  \
            /* sum the threads' gA, gB into the weights' layout */                             \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t) {                                                      \
                const long d = ds[t];                                                          \
                T *w = gws[t];                                                                 \
                for (long p0 = 0, e = 0; p0 < P; p0 += 2 * d)                                  \
                    for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {                 \
                        T ap = 0, aq = 0, bp = 0, bq = 0;                                      \
                        for (int j = 0; j < team; ++j) {                                       \
                            const T *a = mem + 2 * L * P + (size_t)j * per + t * P;            \
                            ap += a[p], aq += a[q], bp += a[L * P + p], bq += a[L * P + q];    \
                        }                                                                      \
                        T *wb = w + e * 4;                                                     \
                        wb[0] = ap, wb[3] = aq;                                                \
                        wb[trans ? 1 : 2] = bp, wb[trans ? 2 : 1] = bq;                        \
                    }                                                                          \
            }                                                                                  \
        }                                                                                      \
        free(mem);                                                                             \
        return 0;                                                                              \
    }

#ifdef _OPENMP
#define KS_THREAD_ID(me) me = omp_get_thread_num()
#define KS_TEAM_SIZE(team)                                                                         \
    _Pragma("omp single") team = omp_get_num_threads()
#else
#define KS_THREAD_ID(me) (void)me
#define KS_TEAM_SIZE(team) (void)team
#endif

KS_DEFINE(float, f32, 1)
KS_DEFINE(double, f64, 0)
