/* y = x Wᵀ + b for a few fp32 rows on a CPU, the frozen projections of a decode step (loaded by ../native.py, used
   by ../native_linear.py, which states where it runs).

   x (M, in) and W (out, in) are row-major, y (M, out). Every output is one dot product summed in one fixed order
   whatever M, the block it falls in or the thread that computes it: eight lane sums over k in steps of 8 (the
   remainder of in % 8 added to lanes 0.. in order), the lanes added as ((0+4)+(2+6))+((1+5)+(3+7)), then the bias.
   A row's outputs are therefore the same bit for bit alone or in a batch of any size (batch invariance), and the
   same on any number of threads. lora_linear_rows adds a LoRA term to each output after the bias, a dot product
   over the r ranks summed the same way.

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
#else
#define MULTIPLY_ADD(acc, a, b) ((acc) += (a) * (b))
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

/* A LoRA term added to every output: B (out, r) and the rows' low-rank inputs low (M, r), scale included. */
typedef struct {
    const float* B;
    const float* low;
    int64_t r;
} Lora;

/* Lanes 0 .. n-1 of p, the rest 0: the last, partial step of a dot product. */
static inline vec8 partial_load(const float* p, int64_t n) {
    vec8 v = (vec8){0};
    for (int64_t j = 0; j < n; j++) v[j] = p[j];
    return v;
}

/* Σ_j B[o, j] low[m, j] as a dot product of its own (eight lane sums over j, then the lanes as above). */
static inline float lora_term(const Lora* lora, int64_t m, int64_t o) {
    const float* b = lora->B + o * lora->r;
    const float* low = lora->low + m * lora->r;
    vec8 acc = (vec8){0};
    for (int64_t j = 0; j < lora->r; j += LANES) {
        const int64_t n = lora->r - j;
        const vec8 bv = n >= LANES ? *(const vec8_unaligned*)(b + j) : partial_load(b + j, n);
        const vec8 lv = n >= LANES ? *(const vec8_unaligned*)(low + j) : partial_load(low + j, n);
        MULTIPLY_ADD(acc, bv, lv);
    }
    return lanes_sum(acc);
}

/* Outputs [o0, o0 + no) of rows [m0, m0 + nm); nm and no are constants after inlining, so the accumulators stay in
   registers. The partial last step is the same vector multiply-add as the whole ones (its missing lanes 0 · 0). */
static inline __attribute__((always_inline)) void block(const float* x, const float* W, const float* bias,
                                                        const Lora* lora, float* y, int64_t in, int64_t out,
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
            float sum = lanes_sum(acc[m][o]);
            if (bias) sum = sum + bias[o0 + o];
            if (lora) sum = sum + lora_term(lora, m0 + m, o0 + o);
            y[(m0 + m) * out + o0 + o] = sum;
        }
}

/* Outputs [o0, o0 + no) of every row, no = OUT_BLOCK or 1. */
static inline __attribute__((always_inline)) void outputs(const float* x, const float* W, const float* bias,
                                                          const Lora* lora, float* y, int64_t M, int64_t in,
                                                          int64_t out, int64_t o0, const int no) {
    int64_t m0 = 0;
    for (; m0 + ROW_BLOCK <= M; m0 += ROW_BLOCK) block(x, W, bias, lora, y, in, out, m0, ROW_BLOCK, o0, no);
    for (; m0 < M; m0++) block(x, W, bias, lora, y, in, out, m0, 1, o0, no);
}

static void product(const float* x, const float* W, const float* bias, const Lora* lora, float* y, int64_t M,
                    int64_t in, int64_t out, int threads) {
    const int64_t blocks = out / OUT_BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) outputs(x, W, bias, lora, y, M, in, out, b * OUT_BLOCK, OUT_BLOCK);
    for (int64_t o = blocks * OUT_BLOCK; o < out; o++) outputs(x, W, bias, lora, y, M, in, out, o, 1);
}

/* y (M, out) = x (M, in) Wᵀ + bias (out; NULL: none). */
void linear_rows(const float* x, const float* W, const float* bias, float* y, int64_t M, int64_t in, int64_t out,
                 int threads) {
    product(x, W, bias, NULL, y, M, in, out, threads);
}

/* y (M, out) = (x Wᵀ + bias) + (scale · x Aᵀ) Bᵀ, A (r, in), B (out, r): a LoRA projection in one pass over W, its
   low-rank input low = (x Aᵀ) · scale (M, r) computed first, with the same dot products, into `low`. */
void lora_linear_rows(const float* x, const float* W, const float* bias, const float* A, const float* B, float scale,
                      float* low, float* y, int64_t M, int64_t in, int64_t out, int64_t r, int threads) {
    product(x, A, NULL, NULL, low, M, in, r, 1);
    for (int64_t i = 0; i < M * r; i++) low[i] = low[i] * scale;
    const Lora lora = {B, low, r};
    product(x, W, bias, &lora, y, M, in, out, threads);
}
