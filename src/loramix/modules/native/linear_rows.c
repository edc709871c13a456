/* y = x Wᵀ + b for a few fp32 rows on a CPU, the frozen projections of a decode step (loaded by ../native.py, used
   by ../native_linear.py, which states where it runs).

   x (M, in) and W (out, in) are row-major, y (M, out). Every output is one dot product summed in one fixed order
   whatever M, the block it falls in or the thread that computes it: eight lane sums over k in steps of 8 (the
   remainder of in % 8 added to lanes 0.. in order), the lanes added as ((0+4)+(2+6))+((1+5)+(3+7)), then the bias.
   A row's outputs are therefore the same bit for bit alone or in a batch of any size (batch invariance), and the
   same on any number of threads. lora_linear_rows adds a low-rank term to each output after the bias, its r
   products added one at a time in increasing order of rank.

   Outputs are computed in blocks of 8 weight rows times 2 input rows (one input row for an odd M's last row): 16
   vector accumulators, each loaded weight vector used by both rows and each input vector by 8 weight rows. In a
   one-row decode step the weight read is the cost, and 8 weight rows streamed at once keep the memory busy; the
   vectors are GCC/clang vector extensions, which the compiler maps onto this CPU's units (-march=native). */

#include <stdint.h>

/* Every multiply-add of a dot product is the same operation in every block: one fused multiply-add where this CPU
   has it (x86 FMA, written out), else a multiply then an add; the compiler may not contract some of them and not
   others (GCC's default -ffp-contract=fast does so per inlined copy), which would break the order promised above. */
#pragma GCC optimize("fp-contract=off")
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
#define MULTIPLY_ADD(acc, a, b) ((acc) = (vec8)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(acc)))
#define SCALAR_MULTIPLY_ADD(acc, a, b) ((acc) = __builtin_fmaf((a), (b), (acc)))
#else
#define MULTIPLY_ADD(acc, a, b) ((acc) += (a) * (b))
#define SCALAR_MULTIPLY_ADD(acc, a, b) ((acc) += (a) * (b))
#endif

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));

enum { LANES = 8, OUT_BLOCK = 8, ROW_BLOCK = 2 };

/* 1 where built with OpenMP (the output blocks are shared among `threads` threads), else 0 (one thread). */
int linear_rows_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline float lanes_sum(vec8 a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Lanes 0 .. n-1 of p, the rest 0: the last, partial step of a dot product. */
static inline vec8 partial_load(const float* p, int64_t n) {
    vec8 v = (vec8){0};
    for (int64_t j = 0; j < n; j++) v[j] = p[j];
    return v;
}

/* Outputs [o0, o0 + no) of rows [m0, m0 + nm); nm and no are constants after inlining, so the accumulators stay in
   registers. The partial last step is the same vector multiply-add as the whole ones (its missing lanes 0 · 0). */
static inline __attribute__((always_inline)) void block(const float* x, const float* W, const float* bias,
                                                        int add_y, float* y, int64_t in, int64_t out,
                                                        int64_t m0, const int nm, int64_t o0, const int no) {
    vec8 acc[ROW_BLOCK][OUT_BLOCK];
    for (int m = 0; m < nm; m++)
        for (int o = 0; o < no; o++) acc[m][o] = (vec8){0};
    const int64_t whole = in - in % LANES;
    for (int64_t k = 0; k < in; k += LANES) {
        vec8 xv[ROW_BLOCK], wv[OUT_BLOCK];
        if (k < whole) {
            for (int m = 0; m < nm; m++) xv[m] = *(const vec8_unaligned*)(x + (m0 + m) * in + k);
            for (int o = 0; o < no; o++) wv[o] = *(const vec8_unaligned*)(W + (o0 + o) * in + k);
        } else {
            for (int m = 0; m < nm; m++) xv[m] = partial_load(x + (m0 + m) * in + k, in - k);
            for (int o = 0; o < no; o++) wv[o] = partial_load(W + (o0 + o) * in + k, in - k);
        }
        for (int m = 0; m < nm; m++)
            for (int o = 0; o < no; o++) MULTIPLY_ADD(acc[m][o], wv[o], xv[m]);
    }
    for (int m = 0; m < nm; m++)
        for (int o = 0; o < no; o++) {
            float* target = y + (m0 + m) * out + o0 + o;
            float sum = lanes_sum(acc[m][o]);
            if (bias) sum = sum + bias[o0 + o];
            *target = add_y ? sum + *target : sum;
        }
}

/* Outputs [o0, o0 + no) of every row, no = OUT_BLOCK or 1. */
static inline __attribute__((always_inline)) void outputs(const float* x, const float* W, const float* bias,
                                                          int add_y, float* y, int64_t M, int64_t in, int64_t out,
                                                          int64_t o0, const int no) {
    int64_t m0 = 0;
    for (; m0 + ROW_BLOCK <= M; m0 += ROW_BLOCK) block(x, W, bias, add_y, y, in, out, m0, ROW_BLOCK, o0, no);
    for (; m0 < M; m0++) block(x, W, bias, add_y, y, in, out, m0, 1, o0, no);
}

/* y = x Wᵀ + bias, or (x Wᵀ + bias) + y where add_y. */
static void product(const float* x, const float* W, const float* bias, int add_y, float* y, int64_t M, int64_t in,
                    int64_t out, int threads) {
    const int64_t blocks = out / OUT_BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) outputs(x, W, bias, add_y, y, M, in, out, b * OUT_BLOCK, OUT_BLOCK);
    for (int64_t o = blocks * OUT_BLOCK; o < out; o++) outputs(x, W, bias, add_y, y, M, in, out, o, 1);
}

/* y[m, o] = Σ_j low[m, j] Bt[j, o] for outputs [o0, o1), j in increasing order, one multiply-add at a time: eight
   outputs at once in vector lanes (the loop over o is the inner one, so every multiply-add of a row is independent
   of the last), the rest one by one, the same operations. */
static void low_rank_terms(const float* low, const float* Bt, float* y, int64_t M, int64_t out, int64_t r, int64_t o0,
                           int64_t o1) {
    const int64_t whole = o0 + (o1 - o0) / LANES * LANES;
    for (int64_t m = 0; m < M; m++) {
        float* ym = y + m * out;
        for (int64_t o = o0; o < o1; o++) ym[o] = 0.f;
        for (int64_t j = 0; j < r; j++) {
            const float l = low[m * r + j];
            const vec8 lv = (vec8){0} + l;
            const float* b = Bt + j * out;
            for (int64_t o = o0; o < whole; o += LANES) {
                vec8 acc = *(vec8_unaligned*)(ym + o);
                MULTIPLY_ADD(acc, lv, *(const vec8_unaligned*)(b + o));
                *(vec8_unaligned*)(ym + o) = acc;
            }
            for (int64_t o = whole; o < o1; o++) SCALAR_MULTIPLY_ADD(ym[o], l, b[o]);
        }
    }
}

/* y (M, out) = x (M, in) Wᵀ + bias (out; NULL: none). */
void linear_rows(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t in, int64_t out,
                 int threads) {
    product(x, W, bias, 0, y, M, in, out, threads);
}

/* y (M, out) = (x Wᵀ + bias) + ((x Aᵀ) ⊙ C) Bᵀ, A (r, in), Bt = Bᵀ (r, out): low-rank terms in one pass over W, their
   low-rank input low = (x Aᵀ) ⊙ C (M, r) computed first, with the same dot products, into `low`. C: the rows'
   coefficients (M, r), or NULL for `scale` everywhere (one LoRA; several adapters' ranks side by side take each
   row's own columns, zeros elsewhere). */
void lora_linear_rows(const float* x, const float* W, const float* bias, const float* A, const float* Bt, float scale,
                      const float* coefficients, float* low, float* y, int64_t M, int64_t in, int64_t out, int64_t r,
                      int threads) {
    product(x, A, NULL, 0, low, M, in, r, 1);
    for (int64_t i = 0; i < M * r; i++) low[i] = low[i] * (coefficients ? coefficients[i] : scale);
    /* each thread's share of the outputs as one range (a long inner loop), at multiples of 8 */
    const int64_t share = (out + threads - 1) / threads;
    const int64_t step = (share + LANES - 1) / LANES * LANES;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t o0 = 0; o0 < out; o0 += step)
        low_rank_terms(low, Bt, y, M, out, r, o0, o0 + step < out ? o0 + step : out);
    product(x, W, bias, 1, y, M, in, out, threads);
}
