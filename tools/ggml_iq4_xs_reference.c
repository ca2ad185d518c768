// ggml's reference IQ4_XS quantiser (`quantize_row_iq4_nl_impl` as `quantize_iq4_xs` calls it
// without an importance matrix, `best_index_int8`, `nearest_int`), copied unchanged from
// ggml/src/ggml-quants.c of the llama.cpp vendored in llama-cpp-python 0.3.36 (MIT licence,
// Copyright (c) 2023-2024 The ggml authors), with the few ggml definitions it needs. It wrote
// crates/gguf/tests/fixtures/quant/IQ4_XS.quantized and IQ4_NL.quantized (`main` is kiln's):
//   gcc -O2 -mf16c -o iq4xs tools/ggml_iq4_xs_reference.c -lm
//   ./iq4xs < crates/gguf/tests/fixtures/quant/IQ4_XS.in.f32 > crates/gguf/tests/fixtures/quant/IQ4_XS.quantized
//   cp crates/gguf/tests/fixtures/quant/IQ4_XS.in.f32 crates/gguf/tests/fixtures/quant/IQ4_NL.in.f32
//   ./iq4xs nl < crates/gguf/tests/fixtures/quant/IQ4_NL.in.f32 > crates/gguf/tests/fixtures/quant/IQ4_NL.quantized
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <assert.h>
#include <immintrin.h>
#define GGML_RESTRICT
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MAX(a,b) ((a)>(b)?(a):(b))
#define MIN(a,b) ((a)<(b)?(a):(b))
typedef uint16_t ggml_fp16_t;
typedef uint16_t ggml_half;
#define GGML_FP32_TO_FP16(x) _cvtss_sh(x, 0)
static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
typedef struct { ggml_half d; uint16_t scales_h; uint8_t scales_l[QK_K/64]; uint8_t qs[QK_K/2]; } block_iq4_xs;
static inline int best_index_int8(int n, const int8_t * val, float x) {
    if (x <= val[0]) return 0;
    if (x >= val[n-1]) return n-1;
    int ml = 0, mu = n-1;
    while (mu-ml > 1) {
        int mav = (ml+mu)/2;
        if (x < val[mav]) mu = mav; else ml = mav;
    }
    return x - val[mu-1] < val[mu] - x ? mu-1 : mu;
}

static inline int nearest_int(float fval) {
    assert(fabsf(fval) <= 4194303.f);
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}
static void quantize_row_iq4_nl_impl(const int super_block_size, const int block_size, const float * GGML_RESTRICT x,
        ggml_fp16_t * dh, uint8_t * q4, uint16_t * scales_h, uint8_t * scales_l,
        float * scales, float * weight, uint8_t * L,
        const int8_t * values,
        const float * quant_weights,
        const int ntry) {

    float sigma2 = 0;
    for (int j = 0; j < super_block_size; ++j) sigma2 += x[j]*x[j];
    sigma2 *= 2.f/super_block_size;

    memset(q4, 0, super_block_size/2);
    dh[0] = GGML_FP32_TO_FP16(0.f);

    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < super_block_size/block_size; ++ib) {
        const float * xb = x + ib*block_size;
        uint8_t * Lb = L + ib*block_size;
        if (quant_weights) {
            const float * qw = quant_weights + ib*block_size;
            for (int j = 0; j < block_size; ++j) weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j]);
        } else {
            for (int j = 0; j < block_size; ++j) weight[j] = xb[j]*xb[j];
        }
        float amax = 0, max = 0;
        for (int j = 0; j < block_size; ++j) {
            float ax = fabsf(xb[j]);
            if (ax > amax) {
                amax = ax; max = xb[j];
            }
        }
        if (amax < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float d = ntry > 0 ? -max/values[0] : max/values[0];
        float id = 1/d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < block_size; ++j) {
            float al = id*xb[j];
            int l = best_index_int8(16, values, al);
            Lb[j] = l;
            float q = values[l];
            float w = weight[j];
            sumqx += w*q*xb[j];
            sumq2 += w*q*q;
        }
        d = sumq2 > 0 ? sumqx/sumq2 : 0.f;
        float best = d*sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (itry + values[0])/max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < block_size; ++j) {
                float al = id*xb[j];
                int l = best_index_int8(16, values, al);
                float q = values[l];
                float w = weight[j];
                sumqx += w*q*xb[j];
                sumq2 += w*q*q;
            }
            if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                d = sumqx/sumq2; best = d * sumqx;
            }
        }
        scales[ib] = d;
        float abs_d = fabsf(d);
        if (abs_d > amax_scale) {
            amax_scale = abs_d; max_scale = d;
        }
    }

    if (super_block_size/block_size > 1) {
        int nb = super_block_size/block_size;
        memset(scales_h, 0, ((nb+7)/8)*sizeof(uint16_t));
        float d = -max_scale/32;
        dh[0] = GGML_FP32_TO_FP16(d);
        float id = d ? 1/d : 0.f;
        for (int ib = 0; ib < super_block_size/block_size; ++ib) {
            int l = nearest_int(id*scales[ib]);
            l = MAX(-32, MIN(31, l));
            float dl = d * l;
            float idl = dl ? 1/dl : 0.f;
            uint8_t * Lb = L + ib*block_size;
            const float * xb = x + ib*block_size;
            for (int j = 0; j < block_size; ++j) {
                Lb[j] = best_index_int8(16, values, idl*xb[j]);
            }
            l += 32;
            uint8_t l_l = l & 0xf;
            uint8_t l_h = l >>  4;
            if (ib%2 == 0) scales_l[ib/2] = l_l;
            else scales_l[ib/2] |= (l_l << 4);
            scales_h[ib/8] |= (l_h << 2*(ib%8));
        }
    } else {
        dh[0] = GGML_FP32_TO_FP16(scales[0]);
        if (ntry > 0) {
            float id = scales[0] ? 1/scales[0] : 0;
            for (int j = 0; j < super_block_size; ++j) {
                L[j] = best_index_int8(16, values, id*x[j]);
            }
        }
    }

    for (int i = 0; i < super_block_size/32; ++i) {
        for (int j = 0; j < 16; ++j) {
            q4[16*i + j] = L[32*i + j] | (L[32*i + 16 + j] << 4);
        }
    }
}
// f32 values on stdin (a whole number of 256-value blocks), their IQ4_XS blocks on stdout;
// with the argument `nl`, their IQ4_NL blocks (`quantize_iq4_nl`'s call: one block of 32).
typedef struct { ggml_half d; uint8_t qs[16]; } block_iq4_nl;
int main(int argc, char ** argv) {
    static float x[QK_K * 64];
    size_t n = fread(x, 4, QK_K * 64, stdin) / QK_K;
    if (argc > 1 && strcmp(argv[1], "nl") == 0) {
        static block_iq4_nl y[QK_K * 64 / 32];
        uint16_t unused_h;
        uint8_t * unused_l = NULL;
        float scale, weight[32];
        uint8_t L[32];
        for (size_t ib = 0; ib < n * QK_K / 32; ++ib) {
            quantize_row_iq4_nl_impl(32, 32, x + 32*ib, &y[ib].d, y[ib].qs, &unused_h, unused_l,
                    &scale, weight, L, kvalues_iq4nl, NULL, 7);
        }
        fwrite(y, sizeof(block_iq4_nl), n * QK_K / 32, stdout);
        return 0;
    }
    static block_iq4_xs y[64];
    uint8_t L[QK_K];
    float weight[32];
    float scales[QK_K/32];
    for (size_t ibl = 0; ibl < n; ++ibl) {
        quantize_row_iq4_nl_impl(QK_K, 32, x + QK_K*ibl, &y[ibl].d, y[ibl].qs, &y[ibl].scales_h, y[ibl].scales_l,
                scales, weight, L, kvalues_iq4nl, NULL, 7);
    }
    fwrite(y, sizeof(block_iq4_xs), n, stdout);
    return 0;
}
