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

/* rows a pass carries together: they share each level's planes and gradient sums, which
 * otherwise cost more memory traffic than the rows themselves */
#ifndef KS_R
#define KS_R 4
#endif

/* nr rows (x[j] -> y[j]) through one level */
KS_INLINE void ks_fwd_vec(long d, const float *A, const float *B, const float *const *x,
                          float *const *y, long P, const int nr) {
    if (d < KS_V) {
        for (long p = 0; p < P; p += KS_V) {
            const ks_vf a = ks_ld(A + p), b = ks_ld(B + p);
            for (int j = 0; j < nr; ++j) {
                const ks_vf u = ks_ld(x[j] + p);
                ks_st(y[j] + p, a * u + b * ks_partner(u, d));
            }
        }
        return;
    }
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; p += KS_V, q += KS_V) {
            const ks_vf ap = ks_ld(A + p), bp = ks_ld(B + p), aq = ks_ld(A + q), bq = ks_ld(B + q);
            for (int j = 0; j < nr; ++j) {
                const ks_vf u = ks_ld(x[j] + p), v = ks_ld(x[j] + q);
                ks_st(y[j] + p, ap * u + bp * v);
                ks_st(y[j] + q, aq * v + bq * u);
            }
        }
}

/* g[j]: the gradient of row j's output -> h[j]: of its input x[j]; gA, gB accumulate */
KS_INLINE void ks_bwd_vec(long d, const float *A, const float *B, const float *const *x,
                          const float *const *g, float *const *h, float *gA, float *gB, long P,
                          const int nr) {
    if (d < KS_V) {
        for (long p = 0; p < P; p += KS_V) {
            const ks_vf a = ks_ld(A + p), b = ks_ld(B + p);
            ks_vf sa = ks_ld(gA + p), sb = ks_ld(gB + p);
            for (int j = 0; j < nr; ++j) {
                const ks_vf gv = ks_ld(g[j] + p), u = ks_ld(x[j] + p);
                ks_st(h[j] + p, a * gv + ks_partner(b * gv, d));
                sa += gv * u;
                sb += gv * ks_partner(u, d);
            }
            ks_st(gA + p, sa);
            ks_st(gB + p, sb);
        }
        return;
    }
    for (long p0 = 0; p0 < P; p0 += 2 * d)
        for (long p = p0, q = p0 + d; p < p0 + d; p += KS_V, q += KS_V) {
            const ks_vf ap = ks_ld(A + p), bp = ks_ld(B + p), aq = ks_ld(A + q), bq = ks_ld(B + q);
            ks_vf sap = ks_ld(gA + p), sbp = ks_ld(gB + p), saq = ks_ld(gA + q), sbq = ks_ld(gB + q);
            for (int j = 0; j < nr; ++j) {
                const ks_vf u = ks_ld(x[j] + p), v = ks_ld(x[j] + q);
                const ks_vf gp = ks_ld(g[j] + p), gq = ks_ld(g[j] + q);
                ks_st(h[j] + p, ap * gp + bq * gq);
                ks_st(h[j] + q, aq * gq + bp * gp);
                sap += gp * u, sbp += gp * v, saq += gq * v, sbq += gq * u;
            }
            ks_st(gA + p, sap), ks_st(gB + p, sbp), ks_st(gA + q, saq), ks_st(gB + q, sbq);
        }
}

/* rows in scratch are this far apart: rows P = 4096 floats apart all map to one L1 set, and a
 * level streams a dozen of them at once */
#define KS_PITCH(P) ((P) + 16)

/* elements of scratch a pass needs: the planes, each thread's row blocks (and sums), and the
 * rows of the strided arrays among its inputs and outputs */
long ks_scratch_size(int backward, long n, long P, int L, int nthreads, int strided) {
    const long pitch = KS_PITCH(P);
    const long per = backward ? 2 * L * pitch + (long)(L + 1) * KS_R * pitch : 2 * KS_R * pitch;
    return 2 * L * pitch + nthreads * per + strided * n * pitch;
}

#define KS_DEFINE(T, S, VEC)                                                                   \
    KS_INLINE void ks_fwd_##S(long d, const T *A, const T *B, const T *const *x, T *const *y,  \
                              long P, int nr) {                                                \
        if (VEC && ks_vec_ok(d, P)) {                                                          \
            const float *a = (const float *)A, *b = (const float *)B;                          \
            const float *const *xf = (const float *const *)x;                                  \
            float *const *yf = (float *const *)y;                                              \
            if (nr == KS_R) ks_fwd_vec(d, a, b, xf, yf, P, KS_R); /* unrolled */              \
            else ks_fwd_vec(d, a, b, xf, yf, P, nr);                                           \
            return;                                                                            \
        }                                                                                      \
        for (int j = 0; j < nr; ++j)                                                           \
            for (long p0 = 0; p0 < P; p0 += 2 * d)                                             \
                for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {                          \
                    const T u = x[j][p], v = x[j][q];                                          \
                    y[j][p] = A[p] * u + B[p] * v;                                             \
                    y[j][q] = A[q] * v + B[q] * u;                                             \
                }                                                                              \
    }                                                                                          \
                                                                                               \
    KS_INLINE void ks_bwd_##S(long d, const T *A, const T *B, const T *const *x,               \
                              const T *const *g, T *const *h, T *gA, T *gB, long P, int nr) {  \
        if (VEC && ks_vec_ok(d, P)) {                                                          \
            const float *a = (const float *)A, *b = (const float *)B;                          \
            const float *const *xf = (const float *const *)x, *const *gf = (const float *const *)g; \
            float *const *hf = (float *const *)h;                                              \
            float *sa = (float *)gA, *sb = (float *)gB;                                        \
            if (nr == KS_R) ks_bwd_vec(d, a, b, xf, gf, hf, sa, sb, P, KS_R);                  \
            else ks_bwd_vec(d, a, b, xf, gf, hf, sa, sb, P, nr);                               \
            return;                                                                            \
        }                                                                                      \
        for (int j = 0; j < nr; ++j)                                                           \
            for (long p0 = 0; p0 < P; p0 += 2 * d)                                             \
                for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q) {                          \
                    const T u = x[j][p], v = x[j][q], gp = g[j][p], gq = g[j][q];              \
                    h[j][p] = A[p] * gp + B[q] * gq;                                           \
                    h[j][q] = A[q] * gq + B[p] * gp;                                           \
                    gA[p] += gp * u, gB[p] += gp * v, gA[q] += gq * v, gB[q] += gq * u;        \
                }                                                                              \
    }                                                                                          \
                                                                                               \
    /* level t's planes from its weights: position p = i*2d + l (block e = i*d + l, entry 0   \
     * of its pair) and q = p + d (entry 1) */                                                 \
    KS_INLINE void ks_planes_##S(T *A, T *B, long P, long d, const T *w, int trans, T f) {     \
        for (long p0 = 0, e = 0; p0 < P; p0 += 2 * d)                                          \
            for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {                         \
                const T *wb = w + e * 4;                                                       \
                A[p] = f * wb[0], A[q] = f * wb[3];                                            \
                B[p] = f * (trans ? wb[1] : wb[2]), B[q] = f * (trans ? wb[2] : wb[1]);        \
            }                                                                                  \
    }                                                                                          \
                                                                                               \
    /* dst = src for (n, P) arrays with any strides, in 16 x 16 tiles so that both sides are  \
     * read and written a cache line at a time (the inner loop runs along a row: rows P apart  \
     * would all map to one L1 set); shares the work with the enclosing team */               \
    KS_INLINE void ks_copy_##S(const T *src, const long *ss, T *dst, const long *sd, long n,   \
                               long P) {                                                       \
        _Pragma("omp for schedule(static)")                                                    \
        for (long p0 = 0; p0 < P; p0 += 16)                                                    \
            for (long i0 = 0; i0 < n; i0 += 16)                                                \
                for (long i = i0; i < i0 + 16 && i < n; ++i)                                   \
                    for (long p = p0; p < p0 + 16 && p < P; ++p)                               \
                        dst[i * sd[0] + p * sd[1]] = src[i * ss[0] + p * ss[1]];               \
    }                                                                                          \
                                                                                               \
    /* y = scale * (x through the levels); x and y (n, P) with strides (sx[0], sx[1]) and     \
     * (sy[0], sy[1]); mem: ks_scratch_size(0, n, P, L, nthreads, strided) elements of scratch \
     * where strided counts x and y with sx[1] != 1 or sy[1] != 1 */                           \
    KS_CLONES void ks_butterfly_forward_##S(const T *x, const long *sx, T *y, const long *sy,  \
                                            long n, long P, int L, const long *ds,             \
                                            T *const *ws, int trans, T scale, T *mem,          \
                                            int nthreads) {                                    \
        const long pitch = KS_PITCH(P);                                                        \
        T *A = mem, *B = mem + L * pitch, *rows = mem + 2 * L * pitch + (size_t)nthreads * 2 * KS_R * pitch; \
        const long groups = (n + KS_R - 1) / KS_R, rs[2] = {pitch, 1};                             \
        /* strided x and y go through rows of their own */                                     \
        const T *xr = sx[1] == 1 ? x : rows;                                                   \
        T *yr = sy[1] == 1 ? y : rows + (sx[1] == 1 ? 0 : n * pitch);                              \
        const long *sxr = sx[1] == 1 ? sx : rs, *syr = sy[1] == 1 ? sy : rs;                   \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        {                                                                                      \
            int me = 0;                                                                        \
            KS_THREAD_ID(me);                                                                  \
            /* row block k: s + k*KS_R*P; blocks 0 and 1 hold alternate levels' outputs */     \
            T *s = mem + 2 * L * pitch + (size_t)me * 2 * KS_R * pitch;                                \
            if (sx[1] != 1) ks_copy_##S(x, sx, rows, rs, n, P);                                \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t)                                                        \
                ks_planes_##S(A + t * pitch, B + t * pitch, P, ds[t], ws[t], trans,                    \
                              t == L - 1 ? scale : 1);                                         \
            _Pragma("omp for schedule(static)")                                                \
            for (long gi = 0; gi < groups; ++gi) {                                             \
                const long r0 = gi * KS_R;                                                     \
                const int nr = n - r0 < KS_R ? (int)(n - r0) : KS_R;                           \
                const T *cur[KS_R];                                                            \
                T *out[KS_R];                                                                  \
                for (int j = 0; j < nr; ++j) cur[j] = xr + (r0 + j) * sxr[0];                  \
                for (int t = 0; t < L; ++t) {                                                  \
                    for (int j = 0; j < nr; ++j)                                               \
                        out[j] = t == L - 1 ? yr + (r0 + j) * syr[0] : s + (t % 2 * KS_R + j) * pitch; \
                    ks_fwd_##S(ds[t], A + t * pitch, B + t * pitch, cur, out, P, nr);                  \
                    for (int j = 0; j < nr; ++j) cur[j] = out[j];                              \
                }                                                                              \
            }                                                                                  \
            if (sy[1] != 1) ks_copy_##S(yr, rs, y, sy, n, P);                                  \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* gy: the output's gradient; gx: the input's; gws[t]: level t's weight gradient in the   \
     * weight's layout (all overwritten). Strides as in the forward pass; mem:                 \
     * ks_scratch_size(1, n, P, L, nthreads, strided) elements of scratch, strided counting x, \
     * gy and gx. */                                                                           \
    KS_CLONES void ks_butterfly_backward_##S(const T *x, const long *sx, const T *gy,          \
                                             const long *sgy, T *gx, const long *sgx, long n,  \
                                             long P, int L, const long *ds, T *const *ws,      \
                                             int trans, T scale, T *const *gws, T *mem,        \
                                             int nthreads) {                                   \
        /* planes, then per thread: gA and gB sums and L + 1 row blocks; then strided rows */  \
        const long pitch = KS_PITCH(P);                                                        \
        const size_t per = 2 * (size_t)L * pitch + (size_t)(L + 1) * KS_R * pitch;                     \
        T *A = mem, *B = mem + L * pitch, *rows = mem + 2 * L * pitch + nthreads * per;                \
        const long groups = (n + KS_R - 1) / KS_R, rs[2] = {pitch, 1};                             \
        const T *xr = sx[1] == 1 ? x : rows;                                                   \
        rows += sx[1] == 1 ? 0 : n * pitch;                                                        \
        const T *gyr = sgy[1] == 1 ? gy : rows;                                                \
        rows += sgy[1] == 1 ? 0 : n * pitch;                                                       \
        T *gxr = sgx[1] == 1 ? gx : rows;                                                      \
        const long *sxr = sx[1] == 1 ? sx : rs, *sgyr = sgy[1] == 1 ? sgy : rs;                \
        const long *sgxr = sgx[1] == 1 ? sgx : rs;                                             \
        int team = 1;                                                                          \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        {                                                                                      \
            int me = 0;                                                                        \
            KS_THREAD_ID(me);                                                                  \
            KS_TEAM_SIZE(team);                                                                \
            T *gA = mem + 2 * L * pitch + me * per, *gB = gA + L * pitch, *s = gB + L * pitch;             \
            /* row j of block k: s + (k*KS_R + j)*P. Block t (1 <= t < L): the input of level \
             * t; blocks 0 and L: gradients */                                                 \
            memset(gA, 0, sizeof(T) * 2 * L * pitch);                                              \
            if (sx[1] != 1) ks_copy_##S(x, sx, (T *)xr, rs, n, P);                             \
            if (sgy[1] != 1) ks_copy_##S(gy, sgy, (T *)gyr, rs, n, P);                         \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t)                                                        \
                ks_planes_##S(A + t * pitch, B + t * pitch, P, ds[t], ws[t], trans,                    \
                              t == L - 1 ? scale : 1);                                         \
            _Pragma("omp for schedule(static)")                                                \
            for (long gi = 0; gi < groups; ++gi) {                                             \
                const long r0 = gi * KS_R;                                                     \
                const int nr = n - r0 < KS_R ? (int)(n - r0) : KS_R;                           \
                const T *in0[KS_R], *cur[KS_R], *g[KS_R], *lin[KS_R];                          \
                T *out[KS_R];                                                                  \
                for (int j = 0; j < nr; ++j) {                                                 \
                    cur[j] = in0[j] = xr + (r0 + j) * sxr[0];                                  \
                    g[j] = gyr + (r0 + j) * sgyr[0];                                           \
                }                                                                              \
                for (int t = 0; t < L - 1; ++t) { /* the levels' inputs, again */              \
                    for (int j = 0; j < nr; ++j) out[j] = s + ((t + 1) * KS_R + j) * pitch;        \
                    ks_fwd_##S(ds[t], A + t * pitch, B + t * pitch, cur, out, P, nr);                  \
                    for (int j = 0; j < nr; ++j) cur[j] = out[j];                              \
                }                                                                              \
                for (int t = L - 1; t >= 0; --t) {                                             \
                    for (int j = 0; j < nr; ++j) {                                             \
                        lin[j] = t ? s + (t * KS_R + j) * pitch : in0[j];                          \
                        out[j] = t ? s + ((t % 2 ? 0 : L) * KS_R + j) * pitch                      \
                                   : gxr + (r0 + j) * sgxr[0];                                 \
                    }                                                                          \
                    ks_bwd_##S(ds[t], A + t * pitch, B + t * pitch, lin, g, out, gA + t * pitch,           \
                               gB + t * pitch, P, nr);                                             \
                    for (int j = 0; j < nr; ++j) g[j] = out[j];                                \
                }                                                                              \
            }                                                                                  \
            if (sgx[1] != 1) ks_copy_##S(gxr, rs, gx, sgx, n, P);                              \
            /* sum the threads' gA, gB into the weights' layout */                             \
            _Pragma("omp for schedule(static)")                                                \
            for (int t = 0; t < L; ++t) {                                                      \
                const long d = ds[t];                                                          \
                const T f = t == L - 1 ? scale : 1;                                            \
                T *w = gws[t];                                                                 \
                for (long p0 = 0, e = 0; p0 < P; p0 += 2 * d)                                  \
                    for (long p = p0, q = p0 + d; p < p0 + d; ++p, ++q, ++e) {                 \
                        T ap = 0, aq = 0, bp = 0, bq = 0;                                      \
                        for (int k = 0; k < team; ++k) {                                       \
                            const T *a = mem + 2 * L * pitch + k * per + t * pitch;                    \
                            ap += a[p], aq += a[q], bp += a[L * pitch + p], bq += a[L * pitch + q];    \
                        }                                                                      \
                        T *wb = w + e * 4;                                                     \
                        wb[0] = f * ap, wb[3] = f * aq;                                        \
                        wb[trans ? 1 : 2] = f * bp, wb[trans ? 2 : 1] = f * bq;                \
                    }                                                                          \
            }                                                                                  \
        }                                                                                      \
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
