/* The AVX2 + FMA primitives of kernels.c (included there when built without AVX512-BF16):
 * the same functions as isa_avx512.h, 8 float32 lanes wide. bf16 is widened to float32 by a
 * shift (exact), and bf16 products are exact in float32, so results differ from the AVX-512
 * build only in the order of float32 sums. The rows of x are widened once per call
 * (`prepare_row`), the weights as they stream. */
#define S3E_ISA "avx2_fma"

/* 16 bf16 at p as two float32 vectors: *even gets elements 0, 2, .., 14 and *odd 1, 3, .., 15
 * (a bf16 is the top half of its float32: the even ones shift up, the odd ones are masked). */
INLINE void load_bf16_pairs(const uint16_t* p, __m256* even, __m256* odd) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int32_t)0xFFFF0000u)));
}

/* Rows of x as row_dot reads them: float32, each whole chunk of 16 elements as its 8 even then
 * its 8 odd elements (the halves load_bf16_pairs splits a weight chunk into), the last K % 16
 * as they are. Widened once per call, so that in the dot products a weight chunk costs one
 * load and two integer ops and each row of x two FMAs that read it from cache. */
typedef float xrow_t;

static inline void prepare_row(const uint16_t* x, int64_t K, float* out) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 e, o;
        load_bf16_pairs(x + k, &e, &o);
        _mm256_storeu_ps(out + k, e);
        _mm256_storeu_ps(out + k + 8, o);
    }
    for (; k < K; k++) out[k] = bf16_to_float(x[k]);
}

/* x [M, K] contiguous in row_dot's form: widened into a buffer the caller frees (*owned). */
static inline const float* prepare_rows(const uint16_t* x, int64_t M, int64_t K, float** owned) {
    float* p = malloc((size_t)(M * K) * sizeof(float));
    for (int64_t m = 0; m < M; m++) prepare_row(x + m * K, K, p + m * K);
    return *owned = p;
}

/* element j of a prepared row of K, set to the bf16 v */
static inline void put_x(float* row, int64_t j, int64_t K, uint16_t v) {
    row[j < (K & ~(int64_t)15) ? (j & ~(int64_t)15) + (j & 1) * 8 + ((j & 15) >> 1) : j] =
        bf16_to_float(v);
}

/* One weight row against M (<= 8) prepared rows of x (row stride ldx): sums[m] = dot(x[m], w),
 * 16 elements a step (even and odd halves). M <= 2: four accumulators per row of x (two steps
 * in flight) hide the FMA latency; M <= 4: two (even, odd); more rows: one each, so that the
 * accumulators and the weight halves stay in the 16 registers. M is a constant in every
 * caller, so the loops over m unroll. */
INLINE void row_dot(const uint16_t* w, const float* x, const int64_t M, int64_t K,
                    int64_t ldx, float* sums) {
    const int64_t K16 = K & ~(int64_t)15;
    __m256 a0[8], a1[8], a2[8], a3[8];     /* a1: M <= 4; a2, a3: M <= 2 */
    for (int64_t m = 0; m < M; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm256_setzero_ps();
    int64_t k = 0;
    if (M <= 2) {
        for (; k + 32 <= K16; k += 32) {
            __m256 we0, wo0, we1, wo1;
            load_bf16_pairs(w + k, &we0, &wo0);
            load_bf16_pairs(w + k + 16, &we1, &wo1);
            for (int64_t m = 0; m < M; m++) {
                const float* xm = x + m * ldx + k;
                a0[m] = _mm256_fmadd_ps(we0, _mm256_loadu_ps(xm), a0[m]);
                a1[m] = _mm256_fmadd_ps(wo0, _mm256_loadu_ps(xm + 8), a1[m]);
                a2[m] = _mm256_fmadd_ps(we1, _mm256_loadu_ps(xm + 16), a2[m]);
                a3[m] = _mm256_fmadd_ps(wo1, _mm256_loadu_ps(xm + 24), a3[m]);
            }
        }
    }
    for (; k < K16; k += 16) {
        __m256 we, wo;
        load_bf16_pairs(w + k, &we, &wo);
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * ldx + k;
            a0[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xm), a0[m]);
            if (M <= 4)
                a1[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xm + 8), a1[m]);
            else
                a0[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xm + 8), a0[m]);
        }
    }
    for (int64_t m = 0; m < M; m++)
        sums[m] = hsum8(M <= 2 ? _mm256_add_ps(_mm256_add_ps(a0[m], a2[m]),
                                               _mm256_add_ps(a1[m], a3[m]))
                        : M <= 4 ? _mm256_add_ps(a0[m], a1[m]) : a0[m]);
    for (int64_t m = 0; m < M; m++)
        for (int64_t t = K16; t < K; t++) sums[m] += bf16_to_float(w[t]) * x[m * ldx + t];
}

/* sum of x[i]^2 over bf16 x [n], float32 */
static inline float sumsq_bf16(const uint16_t* x, int64_t n) {
    __m256 ss = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(x + i))), 16));
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float sum = hsum8(ss);
    for (; i < n; i++) sum += bf16_to_float(x[i]) * bf16_to_float(x[i]);
    return sum;
}

/* exp(x) for x <= 0, as isa_avx512.h's (Cody-Waite reduction, Cephes' polynomial); 2^n is
 * built in the exponent bits (n >= -126 after the clamp at -87). */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* fp8 e4m3fn bytes -> float32, bit for bit as isa_avx512.h's. n % 8 == 0. */
static inline void fp8_row_to_float(const int8_t* src, float* dst, int64_t n) {
    const __m256i mask = _mm256_set1_epi32((int32_t)0x87F00000u);
    const __m256 scale = _mm256_set1_ps(0x1p120f);
    for (int64_t c = 0; c < n; c += 8) {
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + c)));
        v = _mm256_and_si256(_mm256_slli_epi32(v, 20), mask);
        _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_castsi256_ps(v), scale));
    }
}

/* r[i] = the sum of v[i]'s 8 lanes, for 8 vectors at once. */
static inline __m256 hsum_block(const __m256* v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]),
                 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* As isa_avx512.h's attend_chunk, with key blocks of 8 rows (blk: float32 [8, D]). */
static void attend_chunk(const float* restrict qs, const void* kplane, const void* vplane,
                         int kind, const int64_t* gather, int64_t j0, int64_t j1, int64_t H,
                         int64_t D, float* restrict scores, int64_t ldg, float* restrict m,
                         float* restrict l, float* restrict acc, float* restrict blk) {
    for (int64_t h = 0; h < H; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int64_t d = 0; d < D; d++) acc[h * D + d] = 0.0f;
    }
    for (int64_t j = j0; j < j1; j += 8) {
        const int64_t n = j1 - j < 8 ? j1 - j : 8;
        for (int64_t i = 0; i < 8; i++) {
            if (i < n) load_kv_row(kplane, kind, gather[j + i], blk + i * D, D);
            else memset(blk + i * D, 0, (size_t)D * sizeof(float));
        }
        for (int64_t h = 0; h < H; h++) {
            __m256 dots[8];
            for (int64_t i = 0; i < 8; i++) dots[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 q = _mm256_loadu_ps(qs + h * D + d);
                for (int64_t i = 0; i < 8; i++)
                    dots[i] = _mm256_fmadd_ps(q, _mm256_loadu_ps(blk + i * D + d), dots[i]);
            }
            float sc[8];
            _mm256_storeu_ps(sc, hsum_block(dots));
            for (int64_t i = 0; i < n; i++) {
                scores[h * ldg + j + i] = sc[i];
                m[h] = sc[i] > m[h] ? sc[i] : m[h];
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        float* e = scores + h * ldg;
        const __m256 mx = _mm256_set1_ps(m[h]);
        __m256 sum = _mm256_setzero_ps();
        int64_t j = j0;
        for (; j + 8 <= j1; j += 8) {
            const __m256 x = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(e + j), mx));
            _mm256_storeu_ps(e + j, x);
            sum = _mm256_add_ps(sum, x);
        }
        float tail = 0.0f;
        if (j < j1) {
            float t[8];
            for (int64_t i = 0; i < 8; i++) t[i] = j + i < j1 ? e[j + i] : m[h];
            _mm256_storeu_ps(t, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(t), mx)));
            for (int64_t i = 0; j + i < j1; i++) tail += (e[j + i] = t[i]);
        }
        l[h] = hsum8(sum) + tail;
    }
    for (int64_t j = j0; j < j1; j += 8) {
        const int64_t n = j1 - j < 8 ? j1 - j : 8;
        for (int64_t i = 0; i < n; i++) load_kv_row(vplane, kind, gather[j + i], blk + i * D, D);
        for (int64_t h = 0; h < H; h++) {
            const float* p = scores + h * ldg + j;
            float* a = acc + h * D;
            int64_t d = 0;
            for (; d + 32 <= D; d += 32) {
                __m256 a0 = _mm256_loadu_ps(a + d), a1 = _mm256_loadu_ps(a + d + 8),
                       a2 = _mm256_loadu_ps(a + d + 16), a3 = _mm256_loadu_ps(a + d + 24);
                for (int64_t i = 0; i < n; i++) {
                    const __m256 w = _mm256_set1_ps(p[i]);
                    const float* v = blk + i * D + d;
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
                    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
                    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
                    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
                }
                _mm256_storeu_ps(a + d, a0);
                _mm256_storeu_ps(a + d + 8, a1);
                _mm256_storeu_ps(a + d + 16, a2);
                _mm256_storeu_ps(a + d + 24, a3);
            }
            for (; d < D; d += 8) {
                __m256 a0 = _mm256_loadu_ps(a + d);
                for (int64_t i = 0; i < n; i++)
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), _mm256_loadu_ps(blk + i * D + d),
                                         a0);
                _mm256_storeu_ps(a + d, a0);
            }
        }
    }
}

/* As isa_avx512.h's argmax_row, with 8 lanes (a comparison and a blend per step) and the
 * last n % 8 elements taken one by one. */
static int64_t argmax_row(const float* row, int64_t n) {
    float bv[8 + 7];
    int32_t bi[8 + 7];
    int64_t lanes = 0, j = 0;
    if (n >= 8) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256 best = _mm256_loadu_ps(row);
        __m256i idx = lane;
        for (j = 8; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(row + j);
            const __m256 take = _mm256_or_ps(
                _mm256_cmp_ps(v, best, _CMP_GT_OQ),
                _mm256_andnot_ps(_mm256_cmp_ps(best, best, _CMP_UNORD_Q),
                                 _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
            best = _mm256_blendv_ps(best, v, take);
            idx = _mm256_blendv_epi8(idx, _mm256_add_epi32(lane, _mm256_set1_epi32((int)j)),
                                     _mm256_castps_si256(take));
        }
        _mm256_storeu_ps(bv, best);
        _mm256_storeu_si256((__m256i*)bi, idx);
        lanes = 8;
    }
    for (; j < n; j++, lanes++) {
        bv[lanes] = row[j];
        bi[lanes] = (int32_t)j;
    }
    int64_t win = -1;
    for (int64_t c = 0; c < lanes; c++) {
        if (win < 0) { win = c; continue; }
        const int nan_c = isnan(bv[c]), nan_w = isnan(bv[win]);
        if (nan_c != nan_w ? nan_c
                           : (!nan_c && bv[c] != bv[win] ? bv[c] > bv[win] : bi[c] < bi[win]))
            win = c;
    }
    return win < 0 ? 0 : bi[win];
}
