/* AVX2 helpers both builds share (every AVX512-BF16 CPU has AVX2 and FMA): a horizontal sum
 * and the quantized-weight GEMV (`s3e_gemv_q8`), which is written once, 8 lanes wide, for
 * both. */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define MAX_ROWS 16   /* rows of x per call, taken in blocks of up to 8 */
/* the cases of a switch over the rows of x a call takes (1..MAX_ROWS), each a constant M */
#define CASES CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) \
    CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)

enum { W_INT8 = 0, W_FP8 = 1 };   /* stored weight bytes: int8, or fp8 e4m3fn */

/* 8 stored weight bytes -> float32: int8 as its integer; fp8 bit for bit as
 * `quantize.schemes.fp8_to_float` (the NaN bytes read as +-480). */
static inline __m256 q8_to_f32(const int8_t* p, int fmt) {
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    if (fmt == W_INT8) return _mm256_cvtepi32_ps(v);
    v = _mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int32_t)0x87F00000u));
    return _mm256_mul_ps(_mm256_castsi256_ps(v), _mm256_set1_ps(0x1p120f));
}

static inline float q8_scalar(int8_t b, int fmt) {
    if (fmt == W_INT8) return (float)b;
    uint32_t u = ((uint32_t)(int32_t)b << 20) & 0x87F00000u;
    float f;
    memcpy(&f, &u, 4);
    return f * 0x1p120f;
}

/* One quantized weight row against M (<= 8) float32 rows of x (row stride ldx):
 * sums[m] = sum over groups g of scale[g] * dot(w[g], x[m][g]), a group being `group`
 * consecutive inputs (the last one may be shorter). Up to 4 rows two accumulators each (16
 * inputs a step), more rows one each, so that they and the weight stay in the 16 registers.
 * M is a constant in every caller. */
INLINE void row_dot_q8(const int8_t* w, int fmt, const float* scale, int64_t group,
                       const float* x, const int64_t M, int64_t K, int64_t ldx, float* sums) {
    for (int64_t m = 0; m < M; m++) sums[m] = 0.0f;
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        const int64_t g1 = g0 + group < K ? g0 + group : K;
        __m256 acc0[8], acc1[4];
        for (int64_t m = 0; m < M; m++) acc0[m] = _mm256_setzero_ps();
        for (int64_t m = 0; m < M && m < 4; m++) acc1[m] = _mm256_setzero_ps();
        int64_t k = g0;
        for (; k + 16 <= g1; k += 16) {
            const __m256 w0 = q8_to_f32(w + k, fmt), w1 = q8_to_f32(w + k + 8, fmt);
            for (int64_t m = 0; m < M; m++) {
                const float* xm = x + m * ldx + k;
                acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc0[m]);
                if (M <= 4)
                    acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc1[m]);
                else
                    acc0[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc0[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) {
            float s = hsum8(M <= 4 ? _mm256_add_ps(acc0[m], acc1[m]) : acc0[m]);
            for (int64_t t = k; t < g1; t++) s += q8_scalar(w[t], fmt) * x[m * ldx + t];
            sums[m] += s * scale[g0 / group];
        }
    }
}

/* Rows [lo, hi) of the segments laid end to end (`s3e_gemv_q8`), M <= 16 rows of x in blocks
 * of 8 (each weight row read from memory once). */
INLINE void run_rows_q8_m(const float* x, const int64_t M, int64_t K,
                          const int8_t* const* segs, const float* const* scales,
                          const int64_t* seg_rows, int64_t nseg, int fmt, int64_t group,
                          int64_t row_block, void* y, int64_t ldy, int out_f32, int64_t lo,
                          int64_t hi) {
    const int64_t groups = (K + group - 1) / group;
    float sums[MAX_ROWS];
    int64_t base = 0;
    for (int64_t s = 0; s < nseg && base < hi; base += seg_rows[s], s++) {
        int64_t a = lo > base ? lo : base, b = hi < base + seg_rows[s] ? hi : base + seg_rows[s];
        for (int64_t r = a; r < b; r++) {
            const int8_t* wr = segs[s] + (r - base) * K;
            const float* sr = scales[s] + ((r - base) / row_block) * groups;
            if (M <= 8) {
                row_dot_q8(wr, fmt, sr, group, x, M, K, K, sums);
            } else {
                row_dot_q8(wr, fmt, sr, group, x, 8, K, K, sums);
                row_dot_q8(wr, fmt, sr, group, x + 8 * K, M - 8, K, K, sums + 8);
            }
            for (int64_t m = 0; m < M; m++) {
                if (out_f32)
                    ((float*)y)[m * ldy + r] = bf16_to_float(round_bf16(sums[m]));
                else
                    ((uint16_t*)y)[m * ldy + r] = round_bf16(sums[m]);
            }
        }
    }
}

static void run_rows_q8(const float* x, int64_t M, int64_t K, const int8_t* const* segs,
                        const float* const* scales, const int64_t* seg_rows, int64_t nseg,
                        int fmt, int64_t group, int64_t row_block, void* y, int64_t ldy,
                        int out_f32, int64_t lo, int64_t hi) {
    switch (M) {
#define CASE(n) case n: run_rows_q8_m(x, n, K, segs, scales, seg_rows, nseg, fmt, group, \
                                      row_block, y, ldy, out_f32, lo, hi); break;
        CASES
#undef CASE
    }
}
