/* The C ABI of the native decode kernels (kernels.c), built once per instruction set: with
 * AVX512-BF16 (isa_avx512.h) or with AVX2 + FMA (isa_avx2.h). ../native.py reads the
 * prototypes below to type its ctypes calls, so this header is the one place the ABI is
 * written: keep each prototype on the lines between `void` and `);`, every argument a pointer,
 * int64_t, int or float. Tensors are passed by their data pointers; their layouts are in the
 * comments of each definition in kernels.c. */
#ifndef S3E_H
#define S3E_H
#include <stdint.h>

/* One layer's attention side, fixed at load (`native.AttentionLayer` builds it): the norms'
 * float32 weights, the bf16 projections ([q | k | v] as up to 3 row segments of [., hidden],
 * wq [heads * head_dim, sq], wo [hidden, heads * head_dim], the router [experts, hidden] or
 * NULL), and which projections split their rows over the team. */
typedef struct {
    int64_t hidden, sq, heads, head_dim, experts, top_k, norm_topk;
    const float *in_norm, *inter_norm, *post_norm;
    const uint16_t* qkv[3];
    int64_t qkv_rows[3], qkv_nseg;
    const uint16_t *wq, *wo, *router;
    int64_t threaded_qkv, threaded_wq, threaded_wo;
    float eps, scale;
} s3e_layer;

/* the instruction set this build targets ("avx512_bf16" or "avx2_fma") */
const char* s3e_isa(void);

void s3e_gemv_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* const* segs,
                   const int64_t* seg_rows, int64_t nseg, void* y, int64_t ldy, int out_f32,
                   int threads);
void s3e_gemv_q8(const float* x, int64_t M, int64_t K, const int8_t* const* segs,
                 const float* const* scales, const int64_t* seg_rows, int64_t nseg, int fmt,
                 int64_t group, int64_t row_block, void* y, int64_t ldy, int out_f32,
                 int threads);
void s3e_rmsnorm_bf16(const uint16_t* x, int64_t ldx, const float* w, uint16_t* y,
                      int64_t rows, int64_t n, float eps);
void s3e_decode_mfa(const uint16_t* y, int64_t ldy, int64_t koff, int64_t voff, uint16_t* q,
                    int64_t ldq, const float* cos, const float* sin, void* pool, int kind,
                    int64_t slots, const int64_t* write, const int64_t* gather, int64_t ldg,
                    const int64_t* lengths, int64_t B, int64_t H, int64_t D, float scale,
                    uint16_t* out, float* scores, float* part, int64_t chunks, int threads);
void s3e_fp8_gather(const int8_t* pool, int64_t slots, int64_t d, const int64_t* idx,
                    int64_t n, float* out, int threads);
void s3e_argmax_f32(const float* x, int64_t B, int64_t n, int64_t ld, int64_t* out,
                    int threads);
void s3e_swiglu_bf16(const uint16_t* x, int64_t M, int64_t K, const int64_t* mlps,
                     const int64_t* pairs, const float* coef, int64_t P, int64_t nbase, void* y,
                     int out_f32, void* xg, void* act, int64_t widest, float* acc,
                     int threads);
void s3e_attention_block(const s3e_layer* L, const uint16_t* h, int64_t B, const float* cos,
                         const float* sin, void* pool, int kind, int64_t slots,
                         const int64_t* write, const int64_t* gather, int64_t ldg,
                         const int64_t* lengths, uint16_t* h_out, uint16_t* x_out, int64_t* ids,
                         float* weights, uint16_t* bscratch, float* fscratch, int64_t chunks,
                         int threads, int team);

#endif
