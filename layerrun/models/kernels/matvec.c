/* Matrix-vector products for decode: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) for a few input rows m,
 * on a plain row-major weight w (N, K) of float32 or bfloat16.
 *
 * Decode streams every weight from memory once per token, so what counts is the bytes moved per
 * second: the weight is read once per call (rows of x are held together, up to MAXM at a time), a
 * few weight rows at a time so that each x chunk loaded serves several of them. Accumulation is in
 * float32; a bfloat16 result is rounded once at the end (round to nearest even), as oneDNN does.
 * bfloat16 weights are widened with one shift or one mask per 32-bit lane: the even element of a
 * lane is (lane << 16), the odd one (lane & 0xffff0000), multiplied by x split into even / odd halves.
 *
 * Built by layerrun/models/kernels/__init__.py with the system C compiler (-O3 -march=native): the
 * AVX-512 path where the compiler targets it, else AVX2 + FMA; anything else does not compile, and the
 * loader falls back to torch. Plain C with intrinsics, no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXM 8
/* Software prefetch this many bytes ahead in each weight row: measured (bench/RESULTS.md) +20-30% for
 * bfloat16 from memory, +0-10% for float32; 1024 and 2048 were no better. */
#ifndef LR_PF
#define LR_PF 512
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define ISA "avx512"
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VILOAD(p) _mm512_loadu_si512((const void *)(p))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(a) _mm512_reduce_add_ps(a)
#define BF_EVEN(v) _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
#define BF_ODD(v) _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)))
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA "avx2"
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VILOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float VSUM(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define BF_EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define BF_ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)))
#else
#error "matvec.c needs AVX2 and FMA (or AVX-512): the caller falls back to torch"
#endif

#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 8") /* M and NB are constants: unrolled, the accumulators stay in registers */

const char *lr_isa(void) { return ISA; }
int lr_maxm(void) { return MAXM; }

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN (quiet) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- float32 ---------------------------------------------------------------------------------- */

/* M input rows, NB weight rows at a time; M and NB are constants at each call site so the loops unroll
 * and the accumulators stay in registers. */
INLINE void f32_block(int M, int NB, const float *x, int64_t ldx, const float *w, int64_t ldw, const float *b,
                      float *y, int64_t ldy, int64_t n0, int64_t K) {
    vf acc[MAXM][8];
    int64_t Kv = K - K % VL;
    UNROLL
    for (int m = 0; m < M; m++)
        UNROLL
        for (int j = 0; j < NB; j++) acc[m][j] = VZERO();
    const float *wr[8];
    UNROLL
    for (int j = 0; j < NB; j++) wr[j] = w + (n0 + j) * ldw;
    for (int64_t k = 0; k < Kv; k += VL) {
        vf wv[8];
        UNROLL
        for (int j = 0; j < NB; j++) {
            if (LR_PF) _mm_prefetch((const char *)(wr[j] + k) + LR_PF, _MM_HINT_T0);
            wv[j] = VLOAD(wr[j] + k);
        }
        UNROLL
        for (int m = 0; m < M; m++) {
            vf xv = VLOAD(x + m * ldx + k);
            UNROLL
            for (int j = 0; j < NB; j++) acc[m][j] = VFMA(wv[j], xv, acc[m][j]);
        }
    }
    UNROLL
    for (int m = 0; m < M; m++)
        UNROLL
        for (int j = 0; j < NB; j++) {
            float s = VSUM(acc[m][j]);
            for (int64_t k = Kv; k < K; k++) s += wr[j][k] * x[m * ldx + k];
            if (b) s += b[n0 + j];
            y[m * ldy + n0 + j] = s;
        }
}

#define F32_RUN(M, NB)                                                                   \
    do {                                                                                 \
        int64_t n = 0;                                                                   \
        for (; n + (NB) <= N; n += (NB)) f32_block(M, NB, x, ldx, w, ldw, b, y, ldy, n, K); \
        for (; n < N; n++) f32_block(M, 1, x, ldx, w, ldw, b, y, ldy, n, K);            \
    } while (0)

#if VL == 16
#define NB_ONE 8   /* one input row: 8 weight rows in flight (bfloat16: 8 + 16 + 2 registers) */
#define NB_SMALL 4 /* M <= 4: 16 accumulators + 4 weight vectors + 1 input vector of 32 registers */
#define NB_LARGE 2
#else
#define NB_ONE 4 /* 16 registers */
#define NB_SMALL 2
#define NB_LARGE 1
#endif

static void f32_rows(int M, const float *x, int64_t ldx, const float *w, int64_t ldw, const float *b, float *y,
                     int64_t ldy, int64_t N, int64_t K) {
    switch (M) {
    case 1: F32_RUN(1, NB_ONE); break;
    case 2: F32_RUN(2, 4); break;
    case 3: F32_RUN(3, NB_SMALL); break;
    case 4: F32_RUN(4, NB_SMALL); break;
    case 5: F32_RUN(5, NB_LARGE); break;
    case 6: F32_RUN(6, NB_LARGE); break;
    case 7: F32_RUN(7, NB_LARGE); break;
    default: F32_RUN(8, NB_LARGE); break;
    }
}

/* y (rows, N) = x (rows, K; row stride ldx) @ w (N, K; row stride ldw).T + b; returns 0. */
int lr_linear_f32(const float *x, int64_t ldx, const float *w, int64_t ldw, const float *b, float *y, int64_t rows,
                  int64_t N, int64_t K) {
    for (int64_t r = 0; r < rows; r += MAXM) {
        int M = (int)(rows - r < MAXM ? rows - r : MAXM);
        f32_rows(M, x + r * ldx, ldx, w, ldw, b, y + r * N, N, N, K);
    }
    return 0;
}

/* ---- bfloat16 --------------------------------------------------------------------------------- */

/* xe / xo: the M input rows widened to float32 and split into even / odd elements (K2 = Kv / 2 each,
 * row stride K2); the weight's first Kv elements of a row go through the vector loop, the rest scalar. */
INLINE void bf16_block(int M, int NB, const float *xe, const float *xo, int64_t K2, const uint16_t *x, int64_t ldx,
                       const uint16_t *w, int64_t ldw, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t n0,
                       int64_t K) {
    vf acc[MAXM][8];
    int64_t Kv = 2 * K2;
    UNROLL
    for (int m = 0; m < M; m++)
        UNROLL
        for (int j = 0; j < NB; j++) acc[m][j] = VZERO();
    const uint16_t *wr[8];
    UNROLL
    for (int j = 0; j < NB; j++) wr[j] = w + (n0 + j) * ldw;
    for (int64_t k = 0; k < K2; k += VL) { /* VL lanes of 32 bits: 2 * VL weights a row */
        vf we[8], wo[8];
        UNROLL
        for (int j = 0; j < NB; j++) {
            if (LR_PF) _mm_prefetch((const char *)(wr[j] + 2 * k) + LR_PF, _MM_HINT_T0);
            vi v = VILOAD(wr[j] + 2 * k);
            we[j] = BF_EVEN(v);
            wo[j] = BF_ODD(v);
        }
        UNROLL
        for (int m = 0; m < M; m++) {
            vf xev = VLOAD(xe + m * K2 + k), xov = VLOAD(xo + m * K2 + k);
            UNROLL
            for (int j = 0; j < NB; j++) acc[m][j] = VFMA(wo[j], xov, VFMA(we[j], xev, acc[m][j]));
        }
    }
    UNROLL
    for (int m = 0; m < M; m++)
        UNROLL
        for (int j = 0; j < NB; j++) {
            float s = VSUM(acc[m][j]);
            for (int64_t k = Kv; k < K; k++) s += bf16_to_f32(wr[j][k]) * bf16_to_f32(x[m * ldx + k]);
            if (b) s += bf16_to_f32(b[n0 + j]);
            y[m * ldy + n0 + j] = f32_to_bf16(s);
        }
}

#define BF16_RUN(M, NB)                                                                                      \
    do {                                                                                                     \
        int64_t n = 0;                                                                                       \
        for (; n + (NB) <= N; n += (NB)) bf16_block(M, NB, xe, xo, K2, x, ldx, w, ldw, b, y, ldy, n, K);    \
        for (; n < N; n++) bf16_block(M, 1, xe, xo, K2, x, ldx, w, ldw, b, y, ldy, n, K);                  \
    } while (0)

static void bf16_rows(int M, const float *xe, const float *xo, int64_t K2, const uint16_t *x, int64_t ldx,
                      const uint16_t *w, int64_t ldw, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t N,
                      int64_t K) {
    switch (M) {
    case 1: BF16_RUN(1, NB_ONE); break;
    case 2: BF16_RUN(2, NB_SMALL); break;
    case 3: BF16_RUN(3, NB_SMALL); break;
    case 4: BF16_RUN(4, NB_SMALL); break;
    case 5: BF16_RUN(5, NB_LARGE); break;
    case 6: BF16_RUN(6, NB_LARGE); break;
    case 7: BF16_RUN(7, NB_LARGE); break;
    default: BF16_RUN(8, NB_LARGE); break;
    }
}

/* The bfloat16 product (same layout as lr_linear_f32); returns 0, or 1 if scratch memory was refused. */
int lr_linear_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw, const uint16_t *b, uint16_t *y,
                   int64_t rows, int64_t N, int64_t K) {
    int64_t K2 = (K / (2 * VL)) * VL; /* lanes of the vector loop; 2 * K2 weights a row */
    float *buf = NULL;
    if (K2 > 0) {
        buf = (float *)malloc(sizeof(float) * 2 * MAXM * (size_t)K2);
        if (!buf) return 1;
    }
    for (int64_t r = 0; r < rows; r += MAXM) {
        int M = (int)(rows - r < MAXM ? rows - r : MAXM);
        float *xe = buf, *xo = buf ? buf + MAXM * K2 : NULL;
        const uint16_t *xr = x + r * ldx;
        UNROLL
        for (int m = 0; m < M; m++)
            for (int64_t k = 0; k < K2; k++) {
                xe[m * K2 + k] = bf16_to_f32(xr[m * ldx + 2 * k]);
                xo[m * K2 + k] = bf16_to_f32(xr[m * ldx + 2 * k + 1]);
            }
        bf16_rows(M, xe, xo, K2, xr, ldx, w, ldw, b, y + r * N, N, N, K);
    }
    free(buf);
    return 0;
}
