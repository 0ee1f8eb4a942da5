/* A stack of 2x2 butterfly levels on feature-major activations (P rows of n values), forward and
 * backward, with no permutation and no temporary: the fused CPU kernel behind ksmm.native.
 *
 * Level t has KS pattern (a, 2, 2, d) with a * 2 * d = P. Its weight is stored as KSLinear
 * stores it, (a*d, c=2, b=2): wb = w + (i*d + l)*4 and wb[k*2 + j] is the entry from input k
 * to output j of the 2x2 block (i, l), which mixes rows i*2d + l and i*2d + d + l. With
 * trans[t] the level applies the transposed block. acts holds L + 1 slabs of P*n: slab 0 is the
 * input, slab t + 1 the output of level t (kept for the backward pass).
 */
#include <stddef.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KS_CLONES
#endif

/* m[j*2 + k]: output j from input k, for this level's orientation */
#define KS_BLOCK(T, wb, tr, m)                                                                 \
    do {                                                                                       \
        if (tr) { m[0] = wb[0]; m[1] = wb[1]; m[2] = wb[2]; m[3] = wb[3]; }                    \
        else { m[0] = wb[0]; m[1] = wb[2]; m[2] = wb[1]; m[3] = wb[3]; }                       \
    } while (0)

/* The 2x2 block pair index e stands for at level t: its matrix m and the offsets r0, r1 of
 * the two rows it mixes */
#define KS_PAIR(T, e, t, d, m, r0, r1)                                                         \
    const long i = (e) / (d), l = (e) % (d);                                                   \
    T m[4];                                                                                    \
    const T *wb = ws[t] + (i * (d) + l) * 4;                                                   \
    KS_BLOCK(T, wb, trans[t], m);                                                              \
    const size_t r0 = (size_t)(i * 2 * (d) + l) * n, r1 = r0 + (size_t)(d) * n

#define KS_DEFINE(T, S)                                                                        \
    KS_CLONES void ks_butterfly_forward_##S(T *acts, long P, long n, int L, const long *as,    \
                                            const long *ds, T *const *ws, const int *trans,    \
                                            int nthreads) {                                    \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        for (int t = 0; t < L; ++t) {                                                          \
            const T *x = acts + (size_t)t * P * n;                                             \
            T *y = acts + (size_t)(t + 1) * P * n;                                             \
            const long a = as[t], d = ds[t];                                                   \
            _Pragma("omp for schedule(static)")                                                \
            for (long e = 0; e < a * d; ++e) {                                                 \
                    KS_PAIR(T, e, t, d, m, r0, r1);                                            \
                    const T *x0 = x + r0, *x1 = x + r1;                                        \
                    T *y0 = y + r0, *y1 = y + r1;                                              \
                    for (long c = 0; c < n; ++c) {                                             \
                        const T u = x0[c], v = x1[c];                                          \
                        y0[c] = m[0] * u + m[1] * v;                                           \
                        y1[c] = m[2] * u + m[3] * v;                                           \
                    }                                                                          \
                }                                                                              \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* g: the output's gradient (P*n), overwritten; gx: the input's gradient (P*n); gws[t]:   \
     * each level's weight gradient in the weight's layout, overwritten. */                    \
    KS_CLONES void ks_butterfly_backward_##S(const T *acts, T *g, T *gx, long P, long n,       \
                                             int L, const long *as, const long *ds,            \
                                             T *const *ws, const int *trans, T *const *gws,    \
                                             int nthreads) {                                   \
        /* ping-pong between g and gx so that the last level writes into gx */                 \
        if (L % 2 == 0)                                                                        \
            for (size_t e = 0; e < (size_t)P * n; ++e) gx[e] = g[e];                           \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                        \
        {                                                                                      \
        T *cur = L % 2 == 0 ? gx : g, *nxt = L % 2 == 0 ? g : gx;                              \
        for (int t = L - 1; t >= 0; --t) {                                                     \
            const T *x = acts + (size_t)t * P * n;                                             \
            const long a = as[t], d = ds[t];                                                   \
            _Pragma("omp for schedule(static)")                                                \
            for (long e = 0; e < a * d; ++e) {                                                 \
                    KS_PAIR(T, e, t, d, m, r0, r1);                                            \
                    const T *x0 = x + r0, *x1 = x + r1, *g0 = cur + r0, *g1 = cur + r1;        \
                    T *h0 = nxt + r0, *h1 = nxt + r1;                                          \
                    T s00 = 0, s01 = 0, s10 = 0, s11 = 0;                                      \
                    _Pragma("omp simd reduction(+ : s00, s01, s10, s11)")                      \
                    for (long c = 0; c < n; ++c) {                                             \
                        const T u = x0[c], v = x1[c], p = g0[c], q = g1[c];                    \
                        s00 += p * u; s01 += p * v; s10 += q * u; s11 += q * v;                \
                        h0[c] = m[0] * p + m[2] * q;                                           \
                        h1[c] = m[1] * p + m[3] * q;                                           \
                    }                                                                          \
                    /* s_jk = d loss / d m[j*2 + k]; back to the stored layout */              \
                    T *gb = gws[t] + (i * d + l) * 4;                                          \
                    if (trans[t]) { gb[0] = s00; gb[1] = s01; gb[2] = s10; gb[3] = s11; }      \
                    else { gb[0] = s00; gb[2] = s01; gb[1] = s10; gb[3] = s11; }               \
                }                                                                              \
            T *tmp = cur; cur = nxt; nxt = tmp;                                                \
        }                                                                                      \
        }                                                                                      \
    }

KS_DEFINE(float, f32)
KS_DEFINE(double, f64)
