/* The AVX512-BF16 primitives of kernels.c (included there when built with -mavx512bf16). */
#define S3E_ISA "avx512_bf16"

static inline __m512bh load_bf16(const uint16_t* p, int64_t n) { /* n in 1..32 */
    if (n >= 32) return (__m512bh)_mm512_loadu_si512(p);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

/* Rows of x as row_dot reads them: bf16 as they are (VDPBF16PS takes bf16 pairs). */
typedef uint16_t xrow_t;

static inline void prepare_row(const uint16_t* x, int64_t K, uint16_t* out) {
    memcpy(out, x, (size_t)K * sizeof(uint16_t));
}

/* x [M, K] contiguous in row_dot's form: x itself (*owned: nothing to free). */
static inline const uint16_t* prepare_rows(const uint16_t* x, int64_t M, int64_t K,
                                           uint16_t** owned) {
    (void)M;
    (void)K;
    *owned = NULL;
    return x;
}

static inline void put_x(uint16_t* row, int64_t j, int64_t K, uint16_t v) {
    (void)K;
    row[j] = v;
}

/* One weight row against M (<= 8) rows of x (row stride ldx): sums[m] = dot(x[m], w). Two
 * accumulators per row of x (even and odd 32-wide steps) hide VDPBF16PS's latency when M is 1.
 * M is a constant in every caller (run_rows_m, dot_rows below), so the loops over m unroll and
 * acc stays in registers. */
INLINE void row_dot(const uint16_t* w, const uint16_t* x, const int64_t M, int64_t K,
                    int64_t ldx, float* sums) {
    __m512 acc0[8], acc1[8];
    for (int64_t m = 0; m < M; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
        for (int64_t m = 0; m < M; m++) {
            acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
            acc1[m] = _mm512_dpbf16_ps(acc1[m], w1,
                                       (__m512bh)_mm512_loadu_si512(x + m * ldx + k + 32));
        }
    }
    for (; k < K; k += 32) {
        __m512bh wv = load_bf16(w + k, K - k);
        for (int64_t m = 0; m < M; m++)
            acc0[m] = _mm512_dpbf16_ps(acc0[m], wv, load_bf16(x + m * ldx + k, K - k));
    }
    for (int64_t m = 0; m < M; m++) sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
}

static inline __m512 bf16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* sum of x[i]^2 over bf16 x [n], float32 */
static inline float sumsq_bf16(const uint16_t* x, int64_t n) {
    __m512 ss = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(x + i)));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    float sum = _mm512_reduce_add_ps(ss);
    for (; i < n; i++) sum += bf16_to_float(x[i]) * bf16_to_float(x[i]);
    return sum;
}

/* exp(x) for x <= 0 (scores less their maximum): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2] and Cephes' degree-6 polynomial, ~1 ulp; below -87 it returns ~1e-38. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* fp8 e4m3fn bytes -> float32, bit for bit `quantize.schemes.fp8_to_float` (sign-extend,
 * shift the 7 magnitude bits to fp32's bits 20-26, keep them and the sign, scale by 2^120;
 * the NaN bytes read as +-480). n % 16 == 0. */
static inline void fp8_row_to_float(const int8_t* src, float* dst, int64_t n) {
    const __m512i mask = _mm512_set1_epi32((int32_t)0x87F00000u);
    const __m512 scale = _mm512_set1_ps(0x1p120f);
    for (int64_t c = 0; c < n; c += 16) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + c)));
        v = _mm512_and_si512(_mm512_slli_epi32(v, 20), mask);
        _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_castsi512_ps(v), scale));
    }
}

/* r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once (pairs, then quads within each
 * 128-bit lane, then across lanes: 15 adds instead of 16 full reductions). */
static inline __m512 hsum16(const __m512* v) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; k++)
        t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                             _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44),
                                    _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44),
                                    _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* Keys [j0, j1) of one sequence for all H heads of its query (qs: float32 [H, D], scaled):
 * scores[h * ldg + j] = exp(q_h . k_j - m[h]), m[h] their maximum, l[h] their sum and
 * acc[h] the sum of exp-weighted values (unnormalised: chunks combine in `s3e_decode_mfa`).
 * Keys go in blocks of 16 rows decoded once into blk (float32 [16, D], L1-sized for common
 * D): each head's 16 dot products end in one `hsum16`, and its value sums stay in registers
 * across the block. */
static void attend_chunk(const float* restrict qs, const void* kplane, const void* vplane,
                         int kind, const int64_t* gather, int64_t j0, int64_t j1, int64_t H,
                         int64_t D, float* restrict scores, int64_t ldg, float* restrict m,
                         float* restrict l, float* restrict acc, float* restrict blk) {
    for (int64_t h = 0; h < H; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int64_t d = 0; d < D; d++) acc[h * D + d] = 0.0f;
    }
    for (int64_t j = j0; j < j1; j += 16) {
        const int64_t n = j1 - j < 16 ? j1 - j : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        for (int64_t i = 0; i < 16; i++) {
            if (i < n) load_kv_row(kplane, kind, gather[j + i], blk + i * D, D);
            else memset(blk + i * D, 0, (size_t)D * sizeof(float));
        }
        for (int64_t h = 0; h < H; h++) {
            __m512 dots[16];
            for (int64_t i = 0; i < 16; i++) dots[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 q = _mm512_loadu_ps(qs + h * D + d);
                for (int64_t i = 0; i < 16; i++)
                    dots[i] = _mm512_fmadd_ps(q, _mm512_loadu_ps(blk + i * D + d), dots[i]);
            }
            const __m512 sc = hsum16(dots);
            _mm512_mask_storeu_ps(scores + h * ldg + j, live, sc);
            const float mx = _mm512_mask_reduce_max_ps(live, sc);
            m[h] = mx > m[h] ? mx : m[h];
        }
    }
    for (int64_t h = 0; h < H; h++) {
        float* e = scores + h * ldg;
        __m512 sum = _mm512_setzero_ps(), mx = _mm512_set1_ps(m[h]);
        for (int64_t j = j0; j < j1; j += 16) {
            __mmask16 live = j1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j1 - j)) - 1);
            __m512 x = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, e + j), mx));
            _mm512_mask_storeu_ps(e + j, live, x);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, x));
        }
        l[h] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t j = j0; j < j1; j += 16) {
        const int64_t n = j1 - j < 16 ? j1 - j : 16;
        for (int64_t i = 0; i < n; i++) load_kv_row(vplane, kind, gather[j + i], blk + i * D, D);
        for (int64_t h = 0; h < H; h++) {
            const float* p = scores + h * ldg + j;
            float* a = acc + h * D;
            int64_t d = 0;
            for (; d + 64 <= D; d += 64) {
                __m512 a0 = _mm512_loadu_ps(a + d), a1 = _mm512_loadu_ps(a + d + 16),
                       a2 = _mm512_loadu_ps(a + d + 32), a3 = _mm512_loadu_ps(a + d + 48);
                for (int64_t i = 0; i < n; i++) {
                    const __m512 w = _mm512_set1_ps(p[i]);
                    const float* v = blk + i * D + d;
                    a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v), a0);
                    a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16), a1);
                    a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 32), a2);
                    a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 48), a3);
                }
                _mm512_storeu_ps(a + d, a0);
                _mm512_storeu_ps(a + d + 16, a1);
                _mm512_storeu_ps(a + d + 32, a2);
                _mm512_storeu_ps(a + d + 48, a3);
            }
            for (; d < D; d += 16) {
                __m512 a0 = _mm512_loadu_ps(a + d);
                for (int64_t i = 0; i < n; i++)
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), _mm512_loadu_ps(blk + i * D + d),
                                         a0);
                _mm512_storeu_ps(a + d, a0);
            }
        }
    }
}

/* The first index of the maximum of row [n] (n < 2^31; a NaN counts as above everything: the
 * first NaN). Each of 16 lanes keeps its best value and index (a later element only when
 * strictly greater, or the first NaN), then the lanes are compared in index order. */
static int64_t argmax_row(const float* row, int64_t n) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __mmask16 first = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    __m512 best = _mm512_maskz_loadu_ps(first, row);
    __m512i idx = _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), first, lane);
    for (int64_t j = 16; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff
                                           : (__mmask16)((1u << (n - j)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, row + j);
        const __mmask16 take =
            _mm512_mask_cmp_ps_mask(live, v, best, _CMP_GT_OQ) |
            (_mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q) &
             ~_mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q));
        best = _mm512_mask_mov_ps(best, take, v);
        idx = _mm512_mask_mov_epi32(idx, take,
                                    _mm512_add_epi32(lane, _mm512_set1_epi32((int)j)));
    }
    float bv[16];
    int32_t bi[16];
    _mm512_storeu_ps(bv, best);
    _mm512_storeu_si512(bi, idx);
    int64_t win = -1;
    for (int l = 0; l < 16; l++) {
        if (bi[l] < 0) continue;
        if (win < 0) { win = l; continue; }
        const int nan_l = isnan(bv[l]), nan_w = isnan(bv[win]);
        if (nan_l != nan_w ? nan_l
                           : (!nan_l && bv[l] != bv[win] ? bv[l] > bv[win] : bi[l] < bi[win]))
            win = l;
    }
    return win < 0 ? 0 : bi[win];
}
