/* LoRA dropout on a CPU: the keep mask drawn from a counter-based generator and applied in one pass (loaded by
   ../native.py, used by ../native_dropout.py, which states the contract).

   Element i's 15 random bits are lane i mod 4 of word w = i div 4, and word w is the splitmix64 output
   mix64(seed + (w + 1) * golden): a pure function of (seed, i), so the mask does not depend on how the elements are
   split over threads, and backward could redraw it. An element is kept where its bits >= threshold (a drop
   probability of threshold / 2^15, as the PyTorch fallback draws it). Applying a mask is a bitwise select, the same
   for every dtype of one element size: a kept element keeps its bits, a dropped one becomes +0 (as
   torch.where(keep, x, 0) gives, NaN included). Each word's four mask bytes are built in a register and stored
   at once; the word loop is what the compiler vectorizes (-O3 -march=native). */

#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dropout.c packs four mask bytes into a little-endian word"
#endif

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL;

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The keep bytes (0 or 1) of word w's four elements, packed little-endian: element 4w + l in byte l. */
static inline uint32_t keep_word(uint64_t seed, int64_t w, uint32_t threshold) {
    uint64_t r = mix64(seed + (uint64_t)(w + 1) * GOLDEN);
    uint32_t packed = 0;
    for (int lane = 0; lane < 4; lane++)
        packed |= (uint32_t)(((r >> (16 * lane)) & 0x7FFFu) >= threshold) << (8 * lane);
    return packed;
}

/* The loop after it split into static chunks over `threads` (OpenMP; one thread without it). */
#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static)")
#else
#define PARALLEL_FOR
#endif

/* keep[i] = element i's bits >= threshold, for i < n (keep: n bytes, torch's bool). */
void dropout_keep(int64_t n, uint64_t seed, int32_t threshold, uint8_t* keep, int32_t threads) {
    int64_t full = n / 4;
    (void)threads;
    PARALLEL_FOR
    for (int64_t w = 0; w < full; w++) {
        uint32_t packed = keep_word(seed, w, (uint32_t)threshold);
        memcpy(keep + 4 * w, &packed, 4);
    }
    if (n > 4 * full) {
        uint32_t packed = keep_word(seed, full, (uint32_t)threshold);
        memcpy(keep + 4 * full, &packed, (size_t)(n - 4 * full));
    }
}

/* The select of element i: its bits where keep (a 0/1 byte), else 0. */
#define SELECT(TYPE, value, kept) ((TYPE)((value) & (TYPE)(0u - (TYPE)(kept))))

/* out[i] = keep[i] ? x[i] : 0 for elements of TYPE. */
#define APPLY(TYPE)                                                                                      \
    do {                                                                                                 \
        const TYPE* src = (const TYPE*)x;                                                                \
        TYPE* dst = (TYPE*)out;                                                                          \
        PARALLEL_FOR                                                                                     \
        for (int64_t i = 0; i < n; i++) dst[i] = SELECT(TYPE, src[i], keep[i]);                          \
    } while (0)

/* out[i] = keep[i] ? x[i] : 0 for elements of `element_size` bytes (2 or 4); out may be x. */
void dropout_apply(int64_t n, const void* x, const uint8_t* keep, void* out, int32_t element_size, int32_t threads) {
    (void)threads;
    if (element_size == 4)
        APPLY(uint32_t);
    else
        APPLY(uint16_t);
}

/* The whole words of dropout_forward for elements of TYPE: each word's mask drawn, stored and applied at once. */
#define FORWARD_WORDS(TYPE)                                                                              \
    do {                                                                                                 \
        const TYPE* src = (const TYPE*)x;                                                                \
        TYPE* dst = (TYPE*)out;                                                                          \
        PARALLEL_FOR                                                                                     \
        for (int64_t w = 0; w < full; w++) {                                                             \
            uint32_t packed = keep_word(seed, w, (uint32_t)threshold);                                   \
            memcpy(keep + 4 * w, &packed, 4);                                                            \
            for (int lane = 0; lane < 4; lane++)                                                         \
                dst[4 * w + lane] = SELECT(TYPE, src[4 * w + lane], (packed >> (8 * lane)) & 1u);        \
        }                                                                                                \
    } while (0)

/* dropout_keep and dropout_apply in one pass: keep (n bytes) and out = x where kept, else 0. */
void dropout_forward(int64_t n, uint64_t seed, int32_t threshold, const void* x, uint8_t* keep, void* out,
                     int32_t element_size, int32_t threads) {
    int64_t full = n / 4;
    (void)threads;
    if (element_size == 4)
        FORWARD_WORDS(uint32_t);
    else
        FORWARD_WORDS(uint16_t);
    if (n > 4 * full) {  /* the last, partial word */
        int64_t done = 4 * full;
        uint32_t packed = keep_word(seed, full, (uint32_t)threshold);
        memcpy(keep + done, &packed, (size_t)(n - done));
        dropout_apply(n - done, (const char*)x + done * element_size, keep + done, (char*)out + done * element_size,
                      element_size, 1);
    }
}
