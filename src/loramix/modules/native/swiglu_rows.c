/* MixLoRA's SiLU-gated expert rows on a CPU: the rows gathered with their experts' LoRA up step, then one pass
   forward and one backward over each token's rows (loaded by ../native.py, used by ../native_rows.py, which
   states the math and the shapes).

   Rows i are the M routed (token, expert) pairs, sorted by expert. The by-token passes list a token's rows with
   CSR arrays, each token's rows in increasing row order (the order in which index_add_ adds them, so the sums
   here are the eager path's sums). Row tensors are fp32 or bf16 (`dtype`); the arithmetic is fp32 either way, a
   bf16 row converted into an fp32 scratch row on reading and rounded to nearest even on writing, once. The loops
   over f are written so that the compiler vectorizes them (-O3 -fno-trapping-math); exp is a polynomial for
   that reason: libm's expf is a call. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

/* 1 where built with OpenMP (the kernels run on `threads` threads), else 0 (on one). */
int swiglu_rows_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* Round to nearest even, as torch rounds; a NaN stays a NaN (the rounding carry could turn it into -0). */
static inline uint16_t f32_to_bf16(float x) {
    union { uint32_t u; float f; } v;
    v.f = x;
    uint16_t rounded = (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7FC0 : rounded;
}

/* Row `index` of a (rows, f) array of `dtype` as fp32: the row itself (F32), or its conversion into `scratch`. */
static inline const float* row_in(const void* base, int64_t index, int64_t f, int dtype, float* scratch) {
    if (dtype == F32) return (const float*)base + index * f;
    const uint16_t* src = (const uint16_t*)base + index * f;
    for (int64_t j = 0; j < f; j++) scratch[j] = bf16_to_f32(src[j]);
    return scratch;
}

/* Where row `index` is written in fp32: the row itself (F32), or `scratch`, which row_done then rounds into it. */
static inline float* row_out(void* base, int64_t index, int64_t f, int dtype, float* scratch) {
    return dtype == F32 ? (float*)base + index * f : scratch;
}

static inline void row_done(void* base, int64_t index, int64_t f, int dtype, const float* scratch) {
    if (dtype == F32) return;
    uint16_t* dst = (uint16_t*)base + index * f;
    for (int64_t j = 0; j < f; j++) dst[j] = f32_to_bf16(scratch[j]);
}

static inline float value_in(const void* base, int64_t index, int dtype) {
    return dtype == F32 ? ((const float*)base)[index] : bf16_to_f32(((const uint16_t*)base)[index]);
}

static inline void value_out(void* base, int64_t index, int dtype, float value) {
    if (dtype == F32) ((float*)base)[index] = value;
    else ((uint16_t*)base)[index] = f32_to_bf16(value);
}

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

#define BLOCK 4 /* rows of one expert that share each load of B_e (4 rows x 64 columns: 16 vector registers) */

/* dst[q] = src[q] + l[q] Beᵀ for `count` rows (1 or BLOCK, a constant where inlined) of one expert: each 64 columns
   of B_e loaded serve every row, while 64 columns of each row stay in registers over the r products. An element's
   sum is the same, in the same order, whatever the count. l: (count, r); Be: (r, f). */
static inline __attribute__((always_inline)) void lora_up_rows(int count, const float* const* src, float* const* dst,
                                                               const float* l, const float* Be, int64_t f,
                                                               int64_t r) {
    int64_t j = 0;
    for (; j + 64 <= f; j += 64) {
        v16 a[BLOCK][4];
        for (int q = 0; q < count; q++)
            for (int v = 0; v < 4; v++) a[q][v] = *(const v16*)(src[q] + j + 16 * v);
        for (int64_t k = 0; k < r; k++) {
            const float* b = Be + k * f + j;
            const v16 b0 = *(const v16*)b, b1 = *(const v16*)(b + 16);
            const v16 b2 = *(const v16*)(b + 32), b3 = *(const v16*)(b + 48);
            for (int q = 0; q < count; q++) {
                const v16 c = (v16){0} + l[q * r + k];
                a[q][0] += c * b0;
                a[q][1] += c * b1;
                a[q][2] += c * b2;
                a[q][3] += c * b3;
            }
        }
        for (int q = 0; q < count; q++)
            for (int v = 0; v < 4; v++) *(v16*)(dst[q] + j + 16 * v) = a[q][v];
    }
    for (; j < f; j++)
        for (int q = 0; q < count; q++) {
            float acc = src[q][j];
            for (int64_t k = 0; k < r; k++) acc += l[q * r + k] * Be[k * f + j];
            dst[q][j] = acc;
        }
}

/* out[i] = frozen[token[i]] + low_i B_eᵀ (e = row_expert[i]; e >= experts, or low NULL: no LoRA), rows in parallel
   in their order (sorted by expert): BLOCK consecutive rows of one expert together (lora_up_rows), the others (at an
   expert's boundary, the last rows, rows without a LoRA) one at a time. frozen: (N, f), or NULL for zero rows (then
   token is not read); out: (M, f); low: (M, r) with row stride low_stride; Bt: (experts, r, f) fp32, each B_e
   transposed. */
static void gathered_lora_rows(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* token,
                               const int64_t* row_expert, const void* frozen, const void* low, int64_t low_stride,
                               const float* Bt, void* out, int dtype, int32_t threads) {
    const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(threads)
    {
        float* scratch = (float*)malloc(sizeof(float) * (2 * BLOCK * f + BLOCK * r + 1));
        float* l = scratch + 2 * BLOCK * f; /* (BLOCK, r) the rows' lows */
        float* zero = frozen ? 0 : (float*)calloc((size_t)f, sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t first = block * BLOCK, count = rows - first < BLOCK ? rows - first : BLOCK;
            const int64_t e = row_expert[first];
            int together = low && e < experts && count == BLOCK;
            for (int64_t q = 1; together && q < BLOCK; q++) together = row_expert[first + q] == e;
            const float* src[BLOCK];
            float* dst[BLOCK];
            if (together) {
                for (int64_t q = 0; q < BLOCK; q++) {
                    src[q] = frozen ? row_in(frozen, token[first + q], f, dtype, scratch + q * f) : zero;
                    dst[q] = row_out(out, first + q, f, dtype, scratch + (BLOCK + q) * f);
                    for (int64_t k = 0; k < r; k++) l[q * r + k] = value_in(low, (first + q) * low_stride + k, dtype);
                }
                lora_up_rows(BLOCK, src, dst, l, Bt + e * r * f, f, r);
                for (int64_t q = 0; q < BLOCK; q++) row_done(out, first + q, f, dtype, dst[q]);
                continue;
            }
            for (int64_t i = first; i < first + count; i++) {
                src[0] = frozen ? row_in(frozen, token[i], f, dtype, scratch) : zero;
                dst[0] = row_out(out, i, f, dtype, scratch + BLOCK * f);
                const int64_t ei = row_expert[i];
                if (!low || ei >= experts) {
                    memcpy(dst[0], src[0], sizeof(float) * f);
                } else {
                    for (int64_t k = 0; k < r; k++) l[k] = value_in(low, i * low_stride + k, dtype);
                    lora_up_rows(1, src, dst, l, Bt + ei * r * f, f, r);
                }
                row_done(out, i, f, dtype, dst[0]);
            }
        }
        free(zero);
        free(scratch);
    }
}

/* B (experts, f, r) of `dtype` → fp32 Bt (experts, r, f); NULL for NULL. */
static float* transposed(const void* B, int64_t experts, int64_t f, int64_t r, int dtype) {
    if (!B) return 0;
    float* Bt = (float*)malloc(sizeof(float) * experts * f * r);
    for (int64_t e = 0; e < experts; e++)
        for (int64_t j = 0; j < f; j++)
            for (int64_t k = 0; k < r; k++) Bt[(e * r + k) * f + j] = value_in(B, (e * f + j) * r + k, dtype);
    return Bt;
}

/* The rows of the gate and up projections (gathered_lora_rows; a NULL low and B: that projection has no LoRA):
   g, u (M, f). B_gate, B_up: (experts, f, r), the experts' B with the scale folded in. */
void swiglu_gathered_rows(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* token,
                          const int64_t* row_expert, const void* gate, const void* up,
                          const void* low_gate, const void* low_up, int64_t low_stride,
                          const void* B_gate, const void* B_up, void* g, void* u, int32_t dtype, int32_t threads) {
    float* Bt_gate = transposed(B_gate, experts, f, r, dtype);
    float* Bt_up = transposed(B_up, experts, f, r, dtype);
    gathered_lora_rows(rows, f, r, experts, token, row_expert, gate, low_gate, low_stride, Bt_gate, g, dtype, threads);
    gathered_lora_rows(rows, f, r, experts, token, row_expert, up, low_up, low_stride, Bt_up, u, dtype, threads);
    free(Bt_gate);
    free(Bt_up);
}

/* out[i] = low_i Ae (e = row_expert[i]; 0 for e >= experts), fp32: the gradient of a LoRA A step's input rows from
   their lows' gradient, in gathered_lora_rows' blocks. low: (M, r) with row stride low_stride; A: (experts, r, f);
   out: (M, f). */
void swiglu_lora_rows(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* row_expert,
                      const float* low, int64_t low_stride, const float* A, float* out, int32_t threads) {
    gathered_lora_rows(rows, f, r, experts, 0, row_expert, 0, low, low_stride, A, out, 0, threads);
}

/* Forward. y_i = w_i silu(g_i) u_i; mixed[t] = sum of y_i over token t's rows (0 without rows);
   rows_out[i] = y_i * keep[i] (keep NULL: y_i); rows_out NULL: not written.
   g, u, rows_out: (M, f); mixed: (N, f); w: (M,); keep: (M, f) bytes 0/1 or NULL;
   row_of: (M,) the rows sorted by token; token_start: (N + 1,) where each token's rows start in row_of. */
void swiglu_rows_forward(int64_t num_tokens, int64_t f, const int64_t* row_of, const int64_t* token_start,
                         const void* g, const void* u, const void* w, const uint8_t* keep,
                         void* mixed, void* rows_out, int32_t dtype, int32_t threads) {
    #pragma omp parallel num_threads(threads)
    {
        float* scratch = (float*)malloc(sizeof(float) * 5 * f);
        float *y = scratch, *g_row = scratch + f, *u_row = scratch + 2 * f, *m_row = scratch + 3 * f;
        float* out_row = scratch + 4 * f;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            float* restrict m = row_out(mixed, t, f, dtype, m_row);
            if (token_start[t] == token_start[t + 1]) memset(m, 0, sizeof(float) * f);
            for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) {
                const int64_t i = row_of[k];
                const float* restrict gi = row_in(g, i, f, dtype, g_row);
                const float* restrict ui = row_in(u, i, f, dtype, u_row);
                const float wi = value_in(w, i, dtype);
                for (int64_t j = 0; j < f; j++) { float x = gi[j]; y[j] = x * sigmoid(x) * ui[j] * wi; }
                if (k == token_start[t]) memcpy(m, y, sizeof(float) * f);
                else for (int64_t j = 0; j < f; j++) m[j] += y[j];
                if (rows_out) {
                    float* restrict ri = row_out(rows_out, i, f, dtype, out_row);
                    if (keep) {
                        const uint8_t* restrict ki = keep + i * f;
                        for (int64_t j = 0; j < f; j++) ri[j] = y[j] * (float)ki[j];
                    } else {
                        memcpy(ri, y, sizeof(float) * f);
                    }
                    row_done(rows_out, i, f, dtype, ri);
                }
            }
            row_done(mixed, t, f, dtype, m);
        }
        free(scratch);
    }
}

#define LANES 16

/* Backward. Row i's gradient: d_i = grad_mixed[t] + grad_rows[i] * keep[i] (a NULL term is 0).
   grad_w[i] = sum_f d_i silu(g_i) u_i; grad_u[i] = d_i w_i silu(g_i); grad_g[i] = d_i w_i u_i silu'(g_i),
   silu'(x) = s (1 + x (1 - s)), s = sigmoid(x). grad_gate[t], grad_up[t] (N, f): the sums of grad_g, grad_u
   over token t's rows (the gradient of the frozen outputs the rows were gathered from), or NULL: not wanted. */
void swiglu_rows_backward(int64_t num_tokens, int64_t f, const int64_t* row_of, const int64_t* token_start,
                          const void* grad_mixed, const void* grad_rows, const uint8_t* keep,
                          const void* g, const void* u, const void* w,
                          void* grad_g, void* grad_u, void* grad_w, void* grad_gate, void* grad_up,
                          int32_t dtype, int32_t threads) {
    #pragma omp parallel num_threads(threads)
    {
        float* scratch = (float*)malloc(sizeof(float) * 9 * f);
        float *d = scratch, *gm_row = scratch + f, *g_row = scratch + 2 * f, *u_row = scratch + 3 * f;
        float *gr_row = scratch + 4 * f, *gg_row = scratch + 5 * f, *gu_row = scratch + 6 * f;
        float *sum_gate_row = scratch + 7 * f, *sum_up_row = scratch + 8 * f;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            const float* restrict gm = grad_mixed ? row_in(grad_mixed, t, f, dtype, gm_row) : 0;
            float* restrict sum_gate = grad_gate ? row_out(grad_gate, t, f, dtype, sum_gate_row) : 0;
            float* restrict sum_up = grad_up ? row_out(grad_up, t, f, dtype, sum_up_row) : 0;
            for (int64_t k = token_start[t]; k < token_start[t + 1]; k++) {
                const int64_t i = row_of[k];
                const float* restrict gi = row_in(g, i, f, dtype, g_row);
                const float* restrict ui = row_in(u, i, f, dtype, u_row);
                const float wi = value_in(w, i, dtype);
                float* restrict ggi = row_out(grad_g, i, f, dtype, gg_row);
                float* restrict gui = row_out(grad_u, i, f, dtype, gu_row);
                const float* restrict gri = grad_rows ? row_in(grad_rows, i, f, dtype, gr_row) : 0;
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
                value_out(grad_w, i, dtype, total);
                /* the token's sums, from the fp32 row gradients (before any rounding to bf16) */
                if (sum_gate && k == token_start[t]) memcpy(sum_gate, ggi, sizeof(float) * f);
                else if (sum_gate) for (int64_t jj = 0; jj < f; jj++) sum_gate[jj] += ggi[jj];
                if (sum_up && k == token_start[t]) memcpy(sum_up, gui, sizeof(float) * f);
                else if (sum_up) for (int64_t jj = 0; jj < f; jj++) sum_up[jj] += gui[jj];
                row_done(grad_g, i, f, dtype, ggi);
                row_done(grad_u, i, f, dtype, gui);
            }
            const int no_rows = token_start[t] == token_start[t + 1];
            if (sum_gate) {
                if (no_rows) memset(sum_gate, 0, sizeof(float) * f);
                row_done(grad_gate, t, f, dtype, sum_gate);
            }
            if (sum_up) {
                if (no_rows) memset(sum_up, 0, sizeof(float) * f);
                row_done(grad_up, t, f, dtype, sum_up);
            }
        }
        free(scratch);
    }
}

/* The gradients of the LoRA up step g_i = frozen[t_i] + low_i B_eᵀ from the rows' gradient grad (M, f), fp32, rows
   sorted by expert: segment e is rows [start[e], start[e + 1]); rows from start[experts] on have no LoRA.
     grad_low[i][k] = sum_j grad[i][j] Bt[e][k][j]                     (M, r), 0 for rows without LoRA; NULL: not wanted
     grad_Bt[e][k][j] = sum over e's rows i of grad[i][j] low[i][k]   (experts, r, f); NULL: not wanted
   Bt: (experts, r, f), each B_e transposed; low: (M, r) with row stride low_stride. Requires r % 4 == 0 and
   f % 64 == 0 (the caller sends other shapes to torch). Each is a block of 16 vector accumulators: grad_low 4 rows
   of one expert by 4 ranks (16 products for 8 loads: 4 rows' and 4 ranks' 16 columns), one row at a time at an
   expert's boundary; grad_Bt 4 ranks by 64 columns, over the expert's rows (16 products for one row's 64 columns
   and 4 of its ranks), in parallel over (expert, 64 columns). grad_low's sum over j runs in j order within each of
   16 lanes, then across the lanes; grad_Bt's over i in row order. */
void swiglu_lora_grads(int64_t rows, int64_t f, int64_t r, int64_t experts, const int64_t* start,
                       const float* grad, const float* low, int64_t low_stride, const float* Bt, float* grad_low,
                       float* grad_Bt, int32_t threads) {
    (void)threads;
    if (grad_low) {
        const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t first = block * BLOCK, last = first + BLOCK < rows ? first + BLOCK : rows;
            for (int64_t i = first; i < last;) {
                int64_t e = 0;
                while (e < experts && i >= start[e + 1]) e++;
                if (e >= experts) { /* no LoRA: no gradient */
                    memset(grad_low + i * r, 0, sizeof(float) * r);
                    i++;
                    continue;
                }
                const int together = i == first && last - first == BLOCK && last <= start[e + 1];
                const int count = together ? BLOCK : 1;
                const float* Be = Bt + e * r * f;
                for (int64_t k0 = 0; k0 < r; k0 += 4) {
                    v16 acc[BLOCK][4];
                    for (int q = 0; q < BLOCK; q++)
                        for (int kk = 0; kk < 4; kk++) acc[q][kk] = (v16){0};
                    for (int64_t j = 0; j < f; j += 16) {
                        const v16 b0 = *(const v16*)(Be + (k0 + 0) * f + j), b1 = *(const v16*)(Be + (k0 + 1) * f + j);
                        const v16 b2 = *(const v16*)(Be + (k0 + 2) * f + j), b3 = *(const v16*)(Be + (k0 + 3) * f + j);
                        if (count == BLOCK) {
                            for (int q = 0; q < BLOCK; q++) {
                                const v16 g = *(const v16*)(grad + (i + q) * f + j);
                                acc[q][0] += g * b0;
                                acc[q][1] += g * b1;
                                acc[q][2] += g * b2;
                                acc[q][3] += g * b3;
                            }
                        } else {
                            const v16 g = *(const v16*)(grad + i * f + j);
                            acc[0][0] += g * b0;
                            acc[0][1] += g * b1;
                            acc[0][2] += g * b2;
                            acc[0][3] += g * b3;
                        }
                    }
                    for (int q = 0; q < count; q++)
                        for (int kk = 0; kk < 4; kk++) {
                            float sum = 0.0f;
                            for (int lane = 0; lane < 16; lane++) sum += acc[q][kk][lane];
                            grad_low[(i + q) * r + k0 + kk] = sum;
                        }
                }
                i += count;
            }
        }
    }
    if (grad_Bt) {
        const int64_t chunks = f / 64, tasks = experts * chunks;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t e = task / chunks, j = (task % chunks) * 64;
            for (int64_t k0 = 0; k0 < r; k0 += 4) {
                v16 acc[4][4];
                for (int kk = 0; kk < 4; kk++)
                    for (int v = 0; v < 4; v++) acc[kk][v] = (v16){0};
                for (int64_t i = start[e]; i < start[e + 1]; i++) {
                    const float* g = grad + i * f + j;
                    const v16 g0 = *(const v16*)g, g1 = *(const v16*)(g + 16);
                    const v16 g2 = *(const v16*)(g + 32), g3 = *(const v16*)(g + 48);
                    for (int kk = 0; kk < 4; kk++) {
                        const v16 c = (v16){0} + low[i * low_stride + k0 + kk];
                        acc[kk][0] += c * g0;
                        acc[kk][1] += c * g1;
                        acc[kk][2] += c * g2;
                        acc[kk][3] += c * g3;
                    }
                }
                for (int kk = 0; kk < 4; kk++)
                    for (int v = 0; v < 4; v++) *(v16*)(grad_Bt + (e * r + k0 + kk) * f + j + 16 * v) = acc[kk][v];
            }
        }
    }
}
