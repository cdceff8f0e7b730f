/* Decode-step kernels for x86 CPUs (built and loaded by ../native.py; the ABI is s3e.h). The
 * instruction-set-specific primitives (the bf16 dot products, exp, fp8 decoding, the
 * attention's key blocks, argmax) are in isa_avx512.h (AVX512-BF16: VDPBF16PS) and
 * isa_avx2.h (AVX2 + FMA); everything else is written once here.
 *
 * s3e_gemv_bf16: y[m, r] = sum_k x[m, k] * W[r, k] for the few rows of x of a decode step
 * (M <= 16) and a weight given as one or more row segments (a fused q|k|v or gate|up is its
 * parts' own [rows, K] tensors, not a concatenated copy). Products of bf16 pairs are
 * accumulated in float32, the sum is rounded once to bf16 (round to nearest even)
 * or, with out_f32, stored as float32 holding that same bf16 value (the lm_head writes
 * straight into the float32 logits buffer).
 * Why: oneDNN's prepacked kernel costs 15-35 us per decode-sized call on the VMs measured and
 * reads large weights (the 132 MB lm_head) at ~60% of a plain read. This loop walks each
 * weight row front to back, so the hardware prefetcher sees one stream per thread, and the rows
 * are split across the calling thread's OpenMP team (torch's own libgomp, already loaded).
 *
 * s3e_rmsnorm_bf16: the reference RMSNorm (float32 x * rsqrt(mean(x^2) + eps) * w, rounded
 * to bf16) of bf16 rows in one call, where torch spends ~10 small ops (~15-25 us).
 *
 * s3e_decode_mfa: a decode step's attention after the projections (RoPE of the queries and
 * the key, the key and value written to the KV pool, one query per head and sequence against
 * MFA's single K/V head) in one call, where torch spends ~25 ops.
 *
 * s3e_swiglu_bf16: SwiGLU MLPs (a dense MLP, or a MoE layer's shared expert and the routed
 * experts a decode step's rows chose) in one call: gate and up GEMVs, silu(gate) * up, the down
 * GEMV and the routing-weighted sum over experts, each rounded where the reference's bf16 ops
 * round, where torch spends ~6 ops per MLP plus ~12 to gather, weigh and scatter routed
 * experts.
 *
 * s3e_attention_block: one layer's whole attention side for a decode group of a few
 * sequences (norms, projections, s3e_decode_mfa, residual, router) in one call.
 *
 * s3e_fp8_gather: an fp8 KV pool's rows gathered and decoded (prefill chunks' attention).
 *
 * s3e_argmax_f32: each row's greedy token from float32 logits.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "s3e.h"

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define INLINE static inline __attribute__((always_inline))

enum { KV_FP8 = 0, KV_BF16 = 1, KV_F32 = 2 };
static void load_kv_row(const void* pool, int kind, int64_t row, float* out, int64_t D);

#include "avx2_common.h"

#if defined(__AVX512BF16__)
#include "isa_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "isa_avx2.h"
#else
#error "kernels.c needs AVX512-BF16 or AVX2 + FMA"
#endif

const char* s3e_isa(void) { return S3E_ISA; }

/* One weight row against M (<= 16) prepared rows of x: row_dot on blocks of 8 (the row is
 * read from memory once, then from cache). */
INLINE void dot_block(const uint16_t* w, const xrow_t* x, const int64_t M, int64_t K,
                      int64_t ldx, float* sums) {
    if (M <= 8) {
        row_dot(w, x, M, K, ldx, sums);
    } else {
        row_dot(w, x, 8, K, ldx, sums);
        row_dot(w, x + 8 * ldx, M - 8, K, ldx, sums + 8);
    }
}

/* Rows [lo, hi) of the segments laid end to end. */
INLINE void run_rows_m(const xrow_t* x, const int64_t M, int64_t K, const uint16_t* const* segs,
                       const int64_t* seg_rows, int64_t nseg, void* y, int64_t ldy, int out_f32,
                       int64_t lo, int64_t hi) {
    float sums[MAX_ROWS];
    int64_t base = 0;
    for (int64_t s = 0; s < nseg && base < hi; base += seg_rows[s], s++) {
        int64_t a = lo > base ? lo : base, b = hi < base + seg_rows[s] ? hi : base + seg_rows[s];
        for (int64_t r = a; r < b; r++) {
            dot_block(segs[s] + (r - base) * K, x, M, K, K, sums);
            for (int64_t m = 0; m < M; m++) {
                if (out_f32)
                    ((float*)y)[m * ldy + r] = bf16_to_float(round_bf16(sums[m]));
                else
                    ((uint16_t*)y)[m * ldy + r] = round_bf16(sums[m]);
            }
        }
    }
}

/* dot_block for a run-time M (1..16). */
static void dot_rows(const uint16_t* w, const xrow_t* x, int64_t M, int64_t K, int64_t ldx,
                     float* sums) {
    switch (M) {
#define CASE(n) case n: dot_block(w, x, n, K, ldx, sums); break;
        CASES
#undef CASE
    }
}

static void run_rows(const xrow_t* x, int64_t M, int64_t K, const uint16_t* const* segs,
                     const int64_t* seg_rows, int64_t nseg, void* y, int64_t ldy, int out_f32,
                     int64_t lo, int64_t hi) {
    switch (M) {
#define CASE(n) case n: run_rows_m(x, n, K, segs, seg_rows, nseg, y, ldy, out_f32, lo, hi); break;
        CASES
#undef CASE
    }
}

/* Entry point. x: bf16 [M <= 16, K] contiguous; segs[s]: bf16 [seg_rows[s], K] contiguous;
 * y: [M, ldy] bf16 (or float32 with out_f32), columns 0 .. sum(seg_rows) written;
 * threads: the OpenMP team to split rows over (1 = the calling thread alone). */
void s3e_gemv_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* const* segs,
                   const int64_t* seg_rows, int64_t nseg, void* y, int64_t ldy, int out_f32,
                   int threads) {
    int64_t rows = 0;
    for (int64_t s = 0; s < nseg; s++) rows += seg_rows[s];
    xrow_t* owned;
    const xrow_t* xp = prepare_rows(x, M, K, &owned);
    if (threads <= 1) {
        run_rows(xp, M, K, segs, seg_rows, nseg, y, ldy, out_f32, 0, rows);
    } else {
#pragma omp parallel num_threads(threads)
        {
            int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            int64_t per = ((rows + T - 1) / T + 15) & ~(int64_t)15; /* whole cache lines of y */
            int64_t lo = t * per, hi = lo + per < rows ? lo + per : rows;
            if (lo < hi) run_rows(xp, M, K, segs, seg_rows, nseg, y, ldy, out_f32, lo, hi);
        }
    }
    free(owned);
}

/* Entry point for quantized weights. x: float32 [M, K] contiguous (the bf16 activations
 * widened); segs[s]: int8 or fp8 e4m3fn bytes (fmt) [seg_rows[s], K] contiguous; scales[s]:
 * float32 [ceil(seg_rows[s] / row_block), ceil(K / group)] contiguous, the scale of each
 * block of row_block rows and group inputs (per channel: row_block 1, group K; int8_block:
 * 1, 128; block_fp8: 128, 128); y as `s3e_gemv_bf16`'s: each output the float32 sum of the
 * groups' scaled dot products, rounded to bf16. */
void s3e_gemv_q8(const float* x, int64_t M, int64_t K, const int8_t* const* segs,
                 const float* const* scales, const int64_t* seg_rows, int64_t nseg, int fmt,
                 int64_t group, int64_t row_block, void* y, int64_t ldy, int out_f32,
                 int threads) {
    int64_t rows = 0;
    for (int64_t s = 0; s < nseg; s++) rows += seg_rows[s];
    if (threads <= 1) {
        run_rows_q8(x, M, K, segs, scales, seg_rows, nseg, fmt, group, row_block, y, ldy,
                    out_f32, 0, rows);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t per = ((rows + T - 1) / T + 15) & ~(int64_t)15; /* whole cache lines of y */
        int64_t lo = t * per, hi = lo + per < rows ? lo + per : rows;
        if (lo < hi)
            run_rows_q8(x, M, K, segs, scales, seg_rows, nseg, fmt, group, row_block, y, ldy,
                        out_f32, lo, hi);
    }
}

/* x: bf16 rows [rows, n] with row stride ldx; w: float32 [n]; y: bf16 [rows, n] contiguous. */
void s3e_rmsnorm_bf16(const uint16_t* x, int64_t ldx, const float* w, uint16_t* y,
                      int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* xr = x + r * ldx;
        uint16_t* yr = y + r * n;
        float inv = 1.0f / sqrtf(sumsq_bf16(xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) yr[i] = round_bf16((bf16_to_float(xr[i]) * inv) * w[i]);
    }
}

/* float -> fp8 e4m3fn byte as `cast_fp8` (clamp to +-448, then round to nearest even;
 * NaN stays NaN): normal results round the float's mantissa to 3 bits in place, subnormal
 * ones (below 2^-6) are whole multiples of 2^-9. */
static inline uint8_t float_to_fp8(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    if ((u & 0x7fffffffu) > 0x7f800000u) return sign | 0x7f;
    float a = fabsf(f);
    a = a < 448.0f ? a : 448.0f;
    if (a < 0x1p-6f) return sign | (uint8_t)rintf(a * 512.0f);
    memcpy(&u, &a, 4);
    u += 0x7ffffu + ((u >> 20) & 1u);
    return sign | (uint8_t)((u >> 20) - ((127 - 7) << 3));
}

/* RoPE of one bf16 head [D] (rotate-half) as `model.apply_rope`: float32 x * cos + rot * sin
 * (two products, one sum: no FMA), rounded to bf16; out may be x. */
static void rope_head(const uint16_t* x, const float* cos, const float* sin, int64_t D,
                      uint16_t* out) {
    float xf[512];
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) xf[i] = bf16_to_float(x[i]);
    for (int64_t i = 0; i < D; i++) {
        const float rot = i < half ? -xf[i + half] : xf[i - half];
        out[i] = round_bf16(xf[i] * cos[i] + rot * sin[i]);
    }
}

static void store_kv_row(void* pool, int kind, int64_t row, const uint16_t* x, int64_t D) {
    for (int64_t i = 0; i < D; i++) {
        if (kind == KV_FP8) ((uint8_t*)pool)[row * D + i] = float_to_fp8(bf16_to_float(x[i]));
        else if (kind == KV_BF16) ((uint16_t*)pool)[row * D + i] = x[i];
        else ((float*)pool)[row * D + i] = bf16_to_float(x[i]);
    }
}

static void load_kv_row(const void* pool, int kind, int64_t row, float* out, int64_t D) {
    if (kind == KV_FP8) fp8_row_to_float((const int8_t*)pool + row * D, out, D);
    else if (kind == KV_BF16)
        for (int64_t i = 0; i < D; i++)
            out[i] = bf16_to_float(((const uint16_t*)pool)[row * D + i]);
    else memcpy(out, (const float*)pool + row * D, (size_t)D * sizeof(float));
}

/* One decode step of MFA attention for B sequences (one new token each), after the q/k/v and
 * wq projections: RoPE of the H query heads (in place) and of the key, the key and value
 * written to the KV pool, then each head's attention over the sequence's keys, as the
 * reference's `apply_rope`, `GroupCache.update` and `mfa_attention` compute them (float32
 * scores, softmax and sums; another summation order than its bmm).
 *   y: bf16 rows at y + b * ldy holding the key at +koff and the value at +voff [D];
 *   q: bf16 [B, H * D] rows at q + b * ldq (rotated in place);
 *   cos, sin: float32 [B, D];
 *   pool: [2, slots, D] of fp8 e4m3fn / bf16 / float32 (kind), K plane then V plane;
 *   write: [B] slots of the new tokens; gather: [B, ldg] slots of each sequence's keys, of which
 *   the first lengths[b] (the new one included) are attended;
 *   out: bf16 [B, H, D]; scores: float32 [B * H * ldg];
 *   part: float32 [B * chunks * (H * (2 * D + 2) + 16 * D)].
 * D % 16 == 0, D <= 512. Each sequence's keys are split into `chunks` (<= 64; 1 unless there
 * are fewer sequences than threads), the chunks over `threads`, and each chunk's partial
 * softmax merged per head at the end (flash-decoding). */
void s3e_decode_mfa(const uint16_t* y, int64_t ldy, int64_t koff, int64_t voff, uint16_t* q,
                    int64_t ldq, const float* cos, const float* sin, void* pool, int kind,
                    int64_t slots, const int64_t* write, const int64_t* gather, int64_t ldg,
                    const int64_t* lengths, int64_t B, int64_t H, int64_t D, float scale,
                    uint16_t* out, float* scores, float* part, int64_t chunks, int threads) {
    const size_t esz = kind == KV_FP8 ? 1 : kind == KV_BF16 ? 2 : 4;
    void* vplane = (char*)pool + (size_t)slots * (size_t)D * esz;
    /* one chunk's partials: acc [H, D], m [H], l [H], then its scaled query [H, D] and a
     * block of 16 decoded key / value rows [16, D] */
    const int64_t per = H * (2 * D + 2) + 16 * D;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            uint16_t k[512];
            rope_head(y + b * ldy + koff, cos + b * D, sin + b * D, D, k);
            store_kv_row(pool, kind, write[b], k, D);
            store_kv_row(vplane, kind, write[b], y + b * ldy + voff, D);
            for (int64_t h = 0; h < H; h++)
                rope_head(q + b * ldq + h * D, cos + b * D, sin + b * D, D, q + b * ldq + h * D);
        }
        /* the implied barrier: every new key is written before any is read back */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * chunks; i++) {
            const int64_t b = i / chunks, c = i % chunks, n = lengths[b];
            float *pt = part + i * per, *qs = pt + H * (D + 2);
            for (int64_t t = 0; t < H * D; t++) qs[t] = bf16_to_float(q[b * ldq + t]) * scale;
            attend_chunk(qs, pool, vplane, kind, gather + b * ldg, c * n / chunks,
                         (c + 1) * n / chunks, H, D, scores + b * H * ldg, ldg, pt + H * D,
                         pt + H * D + H, pt, qs + H * D);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const float* p0 = part + b * chunks * per;
            float mx = -INFINITY, sum = 0.0f, w[64], o[512];
            for (int64_t c = 0; c < chunks; c++) {
                const float mc = p0[c * per + H * D + h];
                mx = mc > mx ? mc : mx;
            }
            for (int64_t c = 0; c < chunks; c++) {
                const float mc = p0[c * per + H * D + h];
                w[c] = mc == -INFINITY ? 0.0f : expf(mc - mx);   /* an empty chunk adds 0 */
                sum += w[c] * p0[c * per + H * D + H + h];
            }
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t c = 0; c < chunks; c++)
                for (int64_t d = 0; d < D; d++) o[d] += w[c] * p0[c * per + h * D + d];
            const float inv = 1.0f / sum;
            for (int64_t d = 0; d < D; d++) out[bh * D + d] = round_bf16(o[d] * inv);
        }
    }
}

/* An fp8 (e4m3fn) KV pool's rows gathered and decoded (`fp8_row_to_float`): pool int8
 * [2, slots, d] (K and V planes), idx [n] slot numbers -> out float32 [2, n, d]. d % 16 == 0. */
void s3e_fp8_gather(const int8_t* pool, int64_t slots, int64_t d, const int64_t* idx,
                    int64_t n, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < 2 * n; r++)
        fp8_row_to_float(pool + ((r / n) * slots + idx[r % n]) * d, out + r * d, d);
}

/* Each row's first index of its maximum, as torch's `max(dim)` and `argmax` give it (a NaN
 * counts as above everything: the first NaN). x: float32 [B, ld], n (< 2^31) columns;
 * out: int64 [B]. Each of 16 lanes keeps its best value and index (a later element only when
 * strictly greater, or the first NaN), then the lanes are compared in index order. */
void s3e_argmax_f32(const float* x, int64_t B, int64_t n, int64_t ld, int64_t* out,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < B; b++) out[b] = argmax_row(x + b * ld, n);
}

/* silu(g) * u as torch computes it on bf16 tensors: g and u rounded to bf16, silu in float32
 * rounded to bf16, the product in float32 rounded to bf16. */
static inline uint16_t silu_mul(float g, float u) {
    const float gb = bf16_to_float(round_bf16(g));
    const float s = bf16_to_float(round_bf16(gb / (1.0f + expf(-gb))));
    return round_bf16(s * bf16_to_float(round_bf16(u)));
}

/* x: bf16 [M, K] contiguous; mlps: [n, 4] int64 (gate, up, down: bf16 [m, K], [m, K], [K, m]
 * contiguous; m); pairs: [P, 2] int64 (mlp index, row of x), in the order their terms are
 * summed; coef: float32 [P].
 * y[r] = sum over the pairs p of row r, in order, of coef[p] * bf16(down @ a_p) with
 * a_p = silu_mul(gate @ x[r], up @ x[r]); float32 sums (0 + the first term, then in order),
 * stored as float32 [M, K] (out_f32) or rounded to bf16; rows of x without pairs get 0.
 * With nbase > 0 (bf16 output only) the first nbase pairs (a shared expert) are summed apart
 * and y[r] = bf16(bf16(their sum) + bf16(the other pairs' sum)): `shared(x) + routed.to(bf16)`.
 * Consecutive pairs of one MLP (up to 16, other rows each) form a group whose rows of x are
 * gathered, so that each weight row is read once for all of them.
 * Scratch: xg [P, K] and act [P, widest] (widest >= every pair's m) of float32 size (the rows
 * in row_dot's form), acc float32 [2, M, K] (unused with out_f32). The groups' gate/up rows,
 * then the output columns, are split over `threads`. */
void s3e_swiglu_bf16(const uint16_t* x, int64_t M, int64_t K, const int64_t* mlps,
                     const int64_t* pairs, const float* coef, int64_t P, int64_t nbase, void* y,
                     int out_f32, void* xg_, void* act_, int64_t widest, float* acc,
                     int threads) {
    xrow_t *xg = xg_, *act = act_;
    int64_t first[P + 1], groups = 0, total = 0;      /* group g: pairs first[g] .. first[g+1] */
    for (int64_t p = 0; p < P;) {
        int64_t q = p + 1;
        while (q < P && q - p < MAX_ROWS && pairs[2 * q] == pairs[2 * p] &&
               (q < nbase) == (p < nbase))
            q++;
        first[groups++] = p;
        total += mlps[4 * pairs[2 * p] + 3];
        p = q;
    }
    first[groups] = P;
    for (int64_t p = 0; p < P; p++)
        prepare_row(x + pairs[2 * p + 1] * K, K, xg + p * K);
    if (out_f32) acc = (float*)y;
    float* shared = acc + M * K;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        /* phase 1: a_p[j] for the groups' gate/up rows laid end to end */
        const int64_t per1 = (total + T - 1) / T, lo1 = t * per1,
                      hi1 = lo1 + per1 < total ? lo1 + per1 : total;
        for (int64_t g = 0, at = 0; g < groups && at < hi1; g++) {
            const int64_t p0 = first[g], n = first[g + 1] - p0;
            const int64_t* e = mlps + 4 * pairs[2 * p0];
            const int64_t m = e[3], a = lo1 > at ? lo1 - at : 0, b = hi1 < at + m ? hi1 - at : m;
            for (int64_t j = a; j < b; j++) {
                float gs[MAX_ROWS], us[MAX_ROWS];
                dot_rows((const uint16_t*)e[0] + j * K, xg + p0 * K, n, K, K, gs);
                dot_rows((const uint16_t*)e[1] + j * K, xg + p0 * K, n, K, K, us);
                for (int64_t i = 0; i < n; i++)
                    put_x(act + (p0 + i) * widest, j, m, silu_mul(gs[i], us[i]));
            }
            at += m;
        }
#pragma omp barrier
        /* phase 2: output columns [lo, hi) of every row, the pairs' terms in order */
        const int64_t per2 = ((K + T - 1) / T + 15) & ~(int64_t)15, lo = t * per2,
                      hi = lo + per2 < K ? lo + per2 : K;
        for (int64_t r = 0; r < M; r++)
            for (int64_t c = lo; c < hi; c++) {
                acc[r * K + c] = 0.0f;
                if (nbase) shared[r * K + c] = 0.0f;
            }
        for (int64_t g = 0; g < groups; g++) {
            const int64_t p0 = first[g], n = first[g + 1] - p0;
            const int64_t* e = mlps + 4 * pairs[2 * p0];
            const int64_t m = e[3];
            for (int64_t c = lo; c < hi; c++) {
                float d[MAX_ROWS];
                dot_rows((const uint16_t*)e[2] + c * m, act + p0 * widest, n, m, widest, d);
                for (int64_t i = 0; i < n; i++) {
                    const int64_t p = p0 + i;
                    float* out = (p < nbase ? shared : acc) + pairs[2 * p + 1] * K;
                    out[c] += coef[p] * bf16_to_float(round_bf16(d[i]));
                }
            }
        }
        if (!out_f32)
            for (int64_t r = 0; r < M; r++)
                for (int64_t c = lo; c < hi; c++) {
                    const int64_t i = r * K + c;
                    ((uint16_t*)y)[i] = nbase ? round_bf16(bf16_to_float(round_bf16(shared[i])) +
                                                           bf16_to_float(round_bf16(acc[i])))
                                              : round_bf16(acc[i]);
                }
    }
}

/* top_k largest of p [n] (ties: the lower index first), in descending order. */
static void top_k(const float* p, int64_t n, int64_t k, int64_t* ids, float* vals) {
    for (int64_t i = 0; i < k; i++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++) {
            int taken = 0;
            for (int64_t j = 0; j < i; j++) taken |= ids[j] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[i] = best;
        vals[i] = p[best];
    }
}

/* A decode group's attention side for B (<= 8) sequences of one new token each, as
 * `engine._attention_side` and `Step3MoE.route` compute it with the native kernels: input
 * RMSNorm, q|k|v, inter_norm of the shared q, wq, `s3e_decode_mfa` (RoPE, KV write,
 * attention), wo, the residual sum and the post-attention RMSNorm; on MoE layers the router
 * (bf16 logits, float32 softmax, top-k, normalised when norm_topk).
 *   h: bf16 [B, hidden] -> h_out (h + attention), x_out (its norm) bf16 [B, hidden];
 *   ids int64, weights float32 [B, top_k] (MoE layers);
 *   cos .. lengths, threads: as `s3e_decode_mfa`; team: the OpenMP team for the projections
 *   marked threaded;
 *   scratch: bf16 [B * (2 * hidden + 2 * sq + 2 * head_dim + 2 * heads * head_dim + experts)]
 *   and float32 [B * (heads * ldg + chunks * (heads * (2 * head_dim + 2) + 16 * head_dim))
 *   + experts]. */
void s3e_attention_block(const s3e_layer* L, const uint16_t* h, int64_t B, const float* cos,
                         const float* sin, void* pool, int kind, int64_t slots,
                         const int64_t* write, const int64_t* gather, int64_t ldg,
                         const int64_t* lengths, uint16_t* h_out, uint16_t* x_out, int64_t* ids,
                         float* weights, uint16_t* bscratch, float* fscratch, int64_t chunks,
                         int threads, int team) {
    const int64_t hd = L->hidden, D = L->head_dim, nd = L->heads * L->head_dim,
                  wy = L->sq + 2 * D;
    uint16_t *xn = bscratch, *y = xn + B * hd, *qn = y + B * wy, *q = qn + B * L->sq,
             *att = q + B * nd, *o = att + B * nd, *logits = o + B * hd;
    float *scores = fscratch, *part = scores + B * L->heads * ldg,
          *probs = part + B * chunks * (L->heads * (2 * D + 2) + 16 * D);
    s3e_rmsnorm_bf16(h, hd, L->in_norm, xn, B, hd, L->eps);
    s3e_gemv_bf16(xn, B, hd, L->qkv, L->qkv_rows, L->qkv_nseg, y, wy, 0,
                  L->threaded_qkv ? team : 1);
    s3e_rmsnorm_bf16(y, wy, L->inter_norm, qn, B, L->sq, L->eps);
    s3e_gemv_bf16(qn, B, L->sq, &L->wq, &nd, 1, q, nd, 0, L->threaded_wq ? team : 1);
    s3e_decode_mfa(y, wy, L->sq, L->sq + D, q, nd, cos, sin, pool, kind, slots, write, gather,
                   ldg, lengths, B, L->heads, D, L->scale, att, scores, part, chunks, threads);
    s3e_gemv_bf16(att, B, nd, &L->wo, &hd, 1, o, hd, 0, L->threaded_wo ? team : 1);
    for (int64_t i = 0; i < B * hd; i++)
        h_out[i] = round_bf16(bf16_to_float(h[i]) + bf16_to_float(o[i]));
    s3e_rmsnorm_bf16(h_out, hd, L->post_norm, x_out, B, hd, L->eps);
    if (!L->router) return;
    const int64_t E = L->experts, k = L->top_k;
    s3e_gemv_bf16(x_out, B, hd, &L->router, &E, 1, logits, E, 0, 1);
    for (int64_t b = 0; b < B; b++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            probs[e] = bf16_to_float(logits[b * E + e]);
            mx = probs[e] > mx ? probs[e] : mx;
        }
        for (int64_t e = 0; e < E; e++) sum += (probs[e] = expf(probs[e] - mx));
        for (int64_t e = 0; e < E; e++) probs[e] /= sum;
        top_k(probs, E, k, ids + b * k, weights + b * k);
        if (L->norm_topk) {
            float s = 0.0f;
            for (int64_t j = 0; j < k; j++) s += weights[b * k + j];
            for (int64_t j = 0; j < k; j++) weights[b * k + j] /= s;
        }
    }
}
