/* MixLoRA's SiLU-gated expert rows on a CPU, fp32: the rows gathered with their experts' LoRA up step, then one
   pass forward and one backward over each token's rows (loaded by ../native.py, used by ../native_rows.py, which
   states the math and the shapes).

   Rows i are the M routed (token, expert) pairs, sorted by expert. The by-token passes list a token's rows with
   CSR arrays, each token's rows in increasing row order (the order in which index_add_ adds them, so the sums
   here are the eager path's sums). The loops over f are written so that the compiler vectorizes them (-O3
   -fno-trapping-math); exp is a polynomial for that reason: libm's expf is a call. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2/2, p the degree-7 Taylor polynomial: its truncation error is
   below 1e-8 relative on r's range, within fp32 rounding of libm's expf. x is clamped where fp32's range ends
   (a NaN passes through the clamps and the polynomial as NaN). */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 in two parts: r exact to fp32 */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* 16 floats as one value (GCC/clang vector extension; split into narrower registers where the CPU has none this
   wide), aligned to a float so that it may load from any row position. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* out[i] = frozen[token[i]] + low_i B_eᵀ (e = row_expert[i]; e >= experts, or low NULL: no LoRA), rows i in
   parallel in their order (sorted by expert, so that consecutive rows read the same B_e from cache).
   frozen: (N, f); out: (M, f); low: (M, r) with row stride low_stride; Bt: (experts, r, f), each B_e transposed. */
static void gathered_lora_rows(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* token,
                               const int64_t* row_expert, const float* frozen, const float* low, int64_t low_stride,
                               const float* Bt, float* out, int32_t threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; i++) {
        const float* src = frozen + token[i] * f;
        float* dst = out + i * f;
        const int64_t e = row_expert[i];
        if (!low || e >= experts) { memcpy(dst, src, sizeof(float) * f); continue; }
        const float* li = low + i * low_stride;
        const float* Be = Bt + e * r * f;
        int64_t j = 0;
        for (; j + 64 <= f; j += 64) { /* 64 columns of the row stay in four registers over the r products */
            v16 a0 = *(const v16*)(src + j), a1 = *(const v16*)(src + j + 16);
            v16 a2 = *(const v16*)(src + j + 32), a3 = *(const v16*)(src + j + 48);
            for (int64_t k = 0; k < r; k++) {
                const float* b = Be + k * f + j;
                const v16 c = (v16){0} + li[k];
                a0 += c * *(const v16*)b;
                a1 += c * *(const v16*)(b + 16);
                a2 += c * *(const v16*)(b + 32);
                a3 += c * *(const v16*)(b + 48);
            }
            *(v16*)(dst + j) = a0;
            *(v16*)(dst + j + 16) = a1;
            *(v16*)(dst + j + 32) = a2;
            *(v16*)(dst + j + 48) = a3;
        }
        for (; j < f; j++) {
            float acc = src[j];
            for (int64_t k = 0; k < r; k++) acc += li[k] * Be[k * f + j];
            dst[j] = acc;
        }
    }
}

/* B (experts, f, r) → Bt (experts, r, f). */
static float* transposed(const float* B, int64_t experts, int64_t f, int64_t r) {
    if (!B) return 0;
    float* Bt = (float*)malloc(sizeof(float) * experts * f * r);
    for (int64_t e = 0; e < experts; e++)
        for (int64_t j = 0; j < f; j++)
            for (int64_t k = 0; k < r; k++) Bt[(e * r + k) * f + j] = B[(e * f + j) * r + k];
    return Bt;
}

/* The rows of the gate and up projections (gathered_lora_rows; a NULL low and B: that projection has no LoRA):
   g, u (M, f). B_gate, B_up: (experts, f, r), the experts' B with the scale folded in. */
void swiglu_gathered_rows(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* token,
                          const int64_t* row_expert, const float* gate, const float* up,
                          const float* low_gate, const float* low_up, int64_t low_stride,
                          const float* B_gate, const float* B_up, float* g, float* u, int32_t threads) {
    float* Bt_gate = transposed(B_gate, experts, f, r);
    float* Bt_up = transposed(B_up, experts, f, r);
    gathered_lora_rows(rows, f, r, experts, token, row_expert, gate, low_gate, low_stride, Bt_gate, g, threads);
    gathered_lora_rows(rows, f, r, experts, token, row_expert, up, low_up, low_stride, Bt_up, u, threads);
    free(Bt_gate);
    free(Bt_up);
}

/* Forward. y_i = w_i silu(g_i) u_i; mixed[t] = sum of y_i over token t's rows (0 without rows);
   rows_out[i] = y_i * keep[i] (keep NULL: y_i); rows_out NULL: not written.
   g, u, rows_out: (M, f); mixed: (N, f); w: (M,); keep: (M, f) bytes 0/1 or NULL;
   row_of: (M,) the rows sorted by token; token_start: (N + 1,) where each token's rows start in row_of. */
void swiglu_rows_forward(int64_t num_tokens, int64_t f, const int64_t* row_of, const int64_t* token_start,
                         const float* g, const float* u, const float* w, const uint8_t* keep,
                         float* mixed, float* rows_out, int32_t threads) {
    #pragma omp parallel num_threads(threads)
    {
        float* y = (float*)malloc(sizeof(float) * f);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            float* restrict m = mixed + t * f;
            if (token_start[t] == token_start[t + 1]) memset(m, 0, sizeof(float) * f);
            for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) {
                const int64_t i = row_of[k];
                const float* restrict gi = g + i * f;
                const float* restrict ui = u + i * f;
                const float wi = w[i];
                for (int64_t j = 0; j < f; j++) { float x = gi[j]; y[j] = x * sigmoid(x) * ui[j] * wi; }
                if (k == token_start[t]) memcpy(m, y, sizeof(float) * f);
                else for (int64_t j = 0; j < f; j++) m[j] += y[j];
                if (rows_out && keep) {
                    float* restrict ri = rows_out + i * f;
                    const uint8_t* restrict ki = keep + i * f;
                    for (int64_t j = 0; j < f; j++) ri[j] = y[j] * (float)ki[j];
                } else if (rows_out) {
                    memcpy(rows_out + i * f, y, sizeof(float) * f);
                }
            }
        }
        free(y);
    }
}

#define LANES 16

/* Backward. Row i's gradient: d_i = grad_mixed[t] + grad_rows[i] * keep[i] (a NULL term is 0).
   grad_w[i] = sum_f d_i silu(g_i) u_i; grad_u[i] = d_i w_i silu(g_i); grad_g[i] = d_i w_i u_i silu'(g_i),
   silu'(x) = s (1 + x (1 - s)), s = sigmoid(x). grad_gate[t], grad_up[t] (N, f): the sums of grad_g, grad_u
   over token t's rows (the gradient of the frozen outputs the rows were gathered from), or NULL: not wanted. */
void swiglu_rows_backward(int64_t num_tokens, int64_t f, const int64_t* row_of, const int64_t* token_start,
                          const float* grad_mixed, const float* grad_rows, const uint8_t* keep,
                          const float* g, const float* u, const float* w,
                          float* grad_g, float* grad_u, float* grad_w, float* grad_gate, float* grad_up,
                          int32_t threads) {
    #pragma omp parallel num_threads(threads)
    {
        float* d = (float*)malloc(sizeof(float) * f);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            const float* restrict gm = grad_mixed ? grad_mixed + t * f : 0;
            for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) {
                const int64_t i = row_of[k];
                const float* restrict gi = g + i * f;
                const float* restrict ui = u + i * f;
                const float wi = w[i];
                float* restrict ggi = grad_g + i * f;
                float* restrict gui = grad_u + i * f;
                const float* restrict gri = grad_rows ? grad_rows + i * f : 0;
                const uint8_t* restrict ki = keep ? keep + i * f : 0;
                if (gm && gri && ki) for (int64_t j = 0; j < f; j++) d[j] = gm[j] + gri[j] * (float)ki[j];
                else if (gm && gri) for (int64_t j = 0; j < f; j++) d[j] = gm[j] + gri[j];
                else if (gm) memcpy(d, gm, sizeof(float) * f);
                else if (gri && ki) for (int64_t j = 0; j < f; j++) d[j] = gri[j] * (float)ki[j];
                else if (gri) memcpy(d, gri, sizeof(float) * f);
                else memset(d, 0, sizeof(float) * f);
                float acc[LANES] = {0}; /* LANES partial sums: a vectorizable reduction without reassociation flags */
                int64_t j = 0;
                for (; j + LANES <= f; j += LANES) {
                    for (int l = 0; l < LANES; l++) {
                        float x = gi[j + l], s = sigmoid(x), silu = x * s, up = ui[j + l], dw = d[j + l] * wi;
                        acc[l] += d[j + l] * silu * up;
                        gui[j + l] = dw * silu;
                        ggi[j + l] = dw * up * (s * (1.0f + x * (1.0f - s)));
                    }
                }
                float total = 0.0f;
                for (int l = 0; l < LANES; l++) total += acc[l];
                for (; j < f; j++) {
                    float x = gi[j], s = sigmoid(x), silu = x * s, up = ui[j], dw = d[j] * wi;
                    total += d[j] * silu * up;
                    gui[j] = dw * silu;
                    ggi[j] = dw * up * (s * (1.0f + x * (1.0f - s)));
                }
                grad_w[i] = total;
            }
            const int64_t first = token_start[t], end = token_start[t + 1];
            float* outs[2] = {grad_gate, grad_up};
            const float* rows[2] = {grad_g, grad_u};
            for (int o = 0; o < 2; o++) {
                if (!outs[o]) continue;
                float* restrict dst = outs[o] + t * f;
                if (first == end) { memset(dst, 0, sizeof(float) * f); continue; }
                memcpy(dst, rows[o] + row_of[first] * f, sizeof(float) * f);
                for (int64_t k = first + 1; k < end; k++) {
                    const float* restrict src = rows[o] + row_of[k] * f;
                    for (int64_t jj = 0; jj < f; jj++) dst[jj] += src[jj];
                }
            }
        }
        free(d);
    }
}
