/*
 * Fused CPU kernels of AM-AdamW and AM-SGD (hf_am/kernels/cpu_build.py builds and loads this,
 * hf_am/kernels/cpu.py calls it).
 *
 * Why: on CPU every torch op is a separate pass over memory with its own
 * dispatch; the AM step needs about twice AdamW's elementwise work, so the
 * multi-tensor path stays well above AdamW.  Here each phase of a step is one
 * pass over each tensor: phase 1 only reads, and returns the three weighted sums
 * of docs/algorithm.md §2 per tensor (with AdamW's new second moment, not yet
 * stored); phase 2 applies the update with the coefficient computed in Python
 * from those sums, and stores the second moment it computes again.
 *
 * Plain C, no torch headers: it compiles in about a second.  Work is cut into
 * fixed chunks that threads take from a shared counter; partial sums are per
 * chunk and added in chunk order, so results are deterministic (and the same for
 * every thread count and either threading).  The threads are torch's own OpenMP
 * pool when built with AM_OPENMP (see "threading" below), else pthreads.  AdamW's
 * inner loops form x * (x / D') and accumulate blocks in the parameter precision,
 * SGD's form products in double; blocks are added in double.
 * Every per-tensor scalar comes in as an array of doubles (read from tensors the
 * caller built on the CPU, so the caller never converts device values).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define AM_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define AM_CLONES
#endif

#define AM_BLOCK 2048

typedef struct {
    int64_t n;             /* number of tensors */
    const int64_t *numel;  /* elements per tensor */
    void **a, **b, **c, **d; /* up to four tensor-pointer arrays (meaning per kernel) */
    double h0;             /* kernel-specific uniform scalar */
    const double *s0, *s1, *s2, *s3, *s4; /* per-tensor scalars (meaning per kernel, may be NULL) */
} Work;

typedef void (*RangeFn)(const Work *w, int64_t tensor, int64_t lo, int64_t hi, double *out3);

/* ------------------------------------------------------------------ AM-AdamW */
/* The second moment of this step: v' = beta2 v + (1 - beta2) g^2 (both phases, the same expression). */
#define AM_NEXT_V(v, g) (beta2 * (v) + one_m * ((g) * (g)))

/* Phase 1 (reads only): v' as above;  D' = sqrt(v') + eps'_i;  d = scale_i m;
 * sums [d^2/D', g d/D', (g - d)^2/D'].   a=g b=m c=v, h0=beta2, s0=eps', s1=scale. */
#define ADAMW_SUMS(T, SQRT, NAME)                                                              \
    AM_CLONES static void NAME(const Work *w, int64_t i, int64_t lo, int64_t hi, double *o) { \
        const T *g = (const T *)w->a[i], *m = (const T *)w->b[i], *v = (const T *)w->c[i]; \
        const T beta2 = (T)w->h0, one_m = (T)(1.0 - w->h0);                              \
        const T eps = (T)w->s0[i], scale = (T)w->s1[i];                                  \
        for (int64_t start = lo; start < hi; start += AM_BLOCK) {                        \
            int64_t stop = start + AM_BLOCK < hi ? start + AM_BLOCK : hi;               \
            T sdd = 0, sgd = 0, sdiff = 0;                                               \
            _Pragma("omp simd reduction(+ : sdd, sgd, sdiff)")                          \
            for (int64_t k = start; k < stop; ++k) {                                     \
                T gk = g[k];                                                             \
                T vk = AM_NEXT_V(v[k], gk);                                              \
                T inv = (T)1 / (SQRT(vk) + eps);                                            \
                T dk = scale * m[k];                                                     \
                T diff = gk - dk;                                                        \
                T d_inv = dk * inv; /* x * (x / D'): finite where x * x would overflow */  \
                sdd += dk * d_inv;                                                       \
                sgd += gk * d_inv;                                                       \
                sdiff += diff * (diff * inv);                                            \
            }                                                                            \
            o[0] += sdd; o[1] += sgd; o[2] += sdiff;                                     \
        }                                                                                \
    }

/* Phase 2: v = v';  m = keep_i m;  m += w_i (g - m);  p = decay_i p + step_i m / (sqrt(v') + eps'_i).
 * a=p b=g c=m d=v, h0=beta2, s0=eps', s1=keep (or NULL), s2=weight, s3=decay, s4=step. */
#define ADAMW_UPDATE(T, SQRT, NAME)                                                            \
    AM_CLONES static void NAME(const Work *w, int64_t i, int64_t lo, int64_t hi, double *o) { \
        (void)o;                                                                         \
        T *p = (T *)w->a[i], *m = (T *)w->c[i], *v = (T *)w->d[i];                       \
        const T *g = (const T *)w->b[i];                                                 \
        const T beta2 = (T)w->h0, one_m = (T)(1.0 - w->h0);                              \
        const T eps = (T)w->s0[i], keep = w->s1 ? (T)w->s1[i] : (T)1;                    \
        const T weight = (T)w->s2[i], decay = (T)w->s3[i], step = (T)w->s4[i];           \
        _Pragma("omp simd")                                                              \
        for (int64_t k = lo; k < hi; ++k) {                                              \
            T gk = g[k], vk = AM_NEXT_V(v[k], gk);                                      \
            T mk = keep * m[k];                                                          \
            mk = mk + weight * (gk - mk);                                                \
            v[k] = vk;                                                                   \
            m[k] = mk;                                                                   \
            p[k] = decay * p[k] + step * mk / (SQRT(vk) + eps);                          \
        }                                                                                \
    }

/* -------------------------------------------------------------------- AM-SGD */
/* Phase 1: g' = g + wd x;  sums [d^2, g' d, (g' - d)^2].   a=g b=p c=d, h0=wd. */
/* Products in double: d * d overflows float32 for |d| > 1.8e19, where SGD itself stays finite. */
#define SGD_SUMS(T, NAME)                                                                \
    AM_CLONES static void NAME(const Work *w, int64_t i, int64_t lo, int64_t hi, double *o) { \
        const T *g = (const T *)w->a[i], *x = (const T *)w->b[i], *d = (const T *)w->c[i]; \
        const T wd = (T)w->h0;                                                           \
        for (int64_t start = lo; start < hi; start += AM_BLOCK) {                        \
            int64_t stop = start + AM_BLOCK < hi ? start + AM_BLOCK : hi;               \
            double sdd = 0, sgd = 0, sdiff = 0;                                          \
            _Pragma("omp simd reduction(+ : sdd, sgd, sdiff)")                          \
            for (int64_t k = start; k < stop; ++k) {                                     \
                double gk = (double)(g[k] + wd * x[k]), dk = (double)d[k], diff = gk - dk; \
                sdd += dk * dk;                                                          \
                sgd += gk * dk;                                                          \
                sdiff += diff * diff;                                                    \
            }                                                                            \
            o[0] += sdd; o[1] += sgd; o[2] += sdiff;                                     \
        }                                                                                \
    }

/* Phase 2: g' = g + wd x;  d = (1 - w_i) d + w_i g';  x += step_i d.   a=p b=g c=d, h0=wd,
 * s0=weight, s1=step (-lr). */
#define SGD_UPDATE(T, NAME)                                                              \
    AM_CLONES static void NAME(const Work *w, int64_t i, int64_t lo, int64_t hi, double *o) { \
        (void)o;                                                                         \
        T *x = (T *)w->a[i], *d = (T *)w->c[i];                                          \
        const T *g = (const T *)w->b[i];                                                 \
        const T wd = (T)w->h0, weight = (T)w->s0[i], step = (T)w->s1[i];                 \
        const T keep = (T)1 - weight; /* keep d + weight g': no g' - d to overflow */        \
        _Pragma("omp simd")                                                              \
        for (int64_t k = lo; k < hi; ++k) {                                              \
            T gk = g[k] + wd * x[k];                                                     \
            T dk = keep * d[k] + weight * gk;                                            \
            d[k] = dk;                                                                   \
            x[k] = x[k] + step * dk;                                                     \
        }                                                                                \
    }

ADAMW_SUMS(float, sqrtf, adamw_sums_f32)
ADAMW_SUMS(double, sqrt, adamw_sums_f64)
ADAMW_UPDATE(float, sqrtf, adamw_update_f32)
ADAMW_UPDATE(double, sqrt, adamw_update_f64)
SGD_SUMS(float, sgd_sums_f32)
SGD_SUMS(double, sgd_sums_f64)
SGD_UPDATE(float, sgd_update_f32)
SGD_UPDATE(double, sgd_update_f64)

/* ------------------------------------------------------------- the coefficient */
/* hf_am.coefficient.step_coefficients (docs/algorithm.md §2, §7) for sums that are on the CPU already:
 * one scope per row of `sums` ([A, B, C], n x 3).  It is the same double operations in the same order as
 * that Python definition, with no multiply-adds contracted (the attribute), so it gives the same bits
 * (tests/unit/test_coefficient_kernel.py); it exists because the Python definition is ~25 torch ops of
 * a few microseconds of dispatch each, every step, on vectors of a few dozen numbers.
 * `hyper` holds four rows (lam, beta_min, beta_max, restart threshold) of `hyper_len` values, 1 (every
 * scope alike) or n; a NaN threshold is a scope without the Restart variant, `has_threshold` 0 means no
 * scope has it.  `loss_delta`: NULL (the linear estimate) or one value.  `out` (5 x n): the adaptive,
 * reported and applied coefficients, the restart flags and the fallback flags. */
#define AM_CLAMP(x, lo, hi) ((x) < (lo) ? (lo) : ((x) > (hi) ? (hi) : (x))) /* NaN stays NaN, like torch.clamp */
/* One scope's row: sums a, b, c; hyperparameter column h of `hyper`; writes out[0..4 * stride] with stride
 * between the five results.  Shared by am_coefficients and am_adamw_step (noinline: it keeps its own
 * fp-contract=off wherever it is called from). */
__attribute__((noinline, optimize("fp-contract=off")))
static void coefficient_row(double a, double b, double c, const double *hyper, int64_t hyper_len, int64_t h,
                            int has_threshold, const double *loss_delta, double *out, int64_t stride) {
    const double lam = hyper[h], beta_min = hyper[hyper_len + h], beta_max = hyper[2 * hyper_len + h];
    const double threshold = hyper[3 * hyper_len + h];
    double numerator = a - b;
    if (loss_delta) numerator = numerator + loss_delta[0];
    numerator = numerator * (1.0 + lam);
    const int positive_c = !(c <= 0.0); /* NaN counts as positive: a NaN sum gives a NaN beta */
    double alpha = positive_c ? numerator / c : (numerator > 0.0 ? 1.0 : 0.0);
    alpha = AM_CLAMP(alpha, 0.0, 1.0);
    double beta = 1.0 - alpha;
    beta = AM_CLAMP(beta, beta_min, beta_max);
    const int finite = isfinite(a) && isfinite(b) && isfinite(c) && (!loss_delta || isfinite(loss_delta[0]));
    if (!finite) beta = beta_max;
    double restart = 0.0, base = beta, reported = beta;
    if (has_threshold) {
        restart = (beta < threshold && finite) ? 1.0 : 0.0; /* a NaN threshold: never */
        base = isnan(threshold) ? beta : beta_max;
        reported = base * (1.0 - restart);
    }
    out[0] = beta;
    out[stride] = reported;
    out[2 * stride] = (base + lam) / (1.0 + lam);
    out[3 * stride] = restart;
    out[4 * stride] = finite ? 0.0 : 1.0;
}

int am_coefficients(int64_t n, const double *sums, const double *hyper, int64_t hyper_len, int has_threshold,
                    const double *loss_delta, double *out) {
    if (n < 0 || (hyper_len != 1 && hyper_len != n)) return 2;
    for (int64_t i = 0; i < n; ++i)
        coefficient_row(sums[3 * i], sums[3 * i + 1], sums[3 * i + 2], hyper, hyper_len, hyper_len == 1 ? 0 : i,
                        has_threshold, loss_delta, out + i, n);
    return 0;
}

/* ------------------------------------------------------------- per-tensor scalars */
/* AM-AdamW's per-tensor scalars of a step, read from each tensor's step count and product of applied
 * coefficients (one-element tensors of the parameter type T, passed by address): the definitions are
 * hf_am.am_adamw._counts_and_products and hf_am.multi_tensor.adamw_bias_terms, which are ~10 torch ops
 * on vectors of a few dozen numbers, every step, costing more host time than the rest of a small model's
 * one-call step outside the kernel.  Written to `out` (5 x n values of T): the count t = step + 1, the
 * product, c = sqrt(1 - beta2^t), d's scale 1 / (1 - product) (0 where the product is not below 1: no
 * momentum yet) and eps' = eps c, each operation in T as torch rounds it (beta2 and eps rounded to T
 * first).  One difference: beta2^t is libm's double pow (rounded once to float for float32), where torch's
 * vector pow is within an ulp of it (tests/unit/test_step_scalars.py holds the two to that). */
static float am_pow_f32(float base, float t) { return (float)pow((double)base, (double)t); }
#define ADAMW_SCALARS(T, POW, SQRT, NAME)                                                                      \
    __attribute__((noinline, optimize("fp-contract=off")))                                                     \
    static void NAME(int64_t n, void **steps, void **prods, double beta2, double eps, T *out) {                \
        const T base = (T)beta2, e = (T)eps, one = (T)1;                                                     \
        for (int64_t i = 0; i < n; ++i) {                                                                    \
            const T t = *(const T *)steps[i] + one, prod = *(const T *)prods[i];                             \
            const T c = SQRT(one - POW(base, t));                                                            \
            out[i] = t;                                                                                      \
            out[n + i] = prod;                                                                               \
            out[2 * n + i] = c;                                                                              \
            out[3 * n + i] = prod < one ? one / (one - prod) : (T)0;                                         \
            out[4 * n + i] = e * c;                                                                          \
        }                                                                                                    \
    }
ADAMW_SCALARS(float, am_pow_f32, sqrtf, adamw_scalars_f32)
ADAMW_SCALARS(double, pow, sqrt, adamw_scalars_f64)

/* Return 0 on success, 2 for arguments out of range (a dtype other than 32/64 bits, n < 0, a NULL address),
 * before anything is written.  Each address must hold one value of the parameter type. */
int am_adamw_scalars(int dtype_bits, int64_t n, void **steps, void **prods, double beta2, double eps, void *out) {
    if ((dtype_bits != 32 && dtype_bits != 64) || n < 0 || (n > 0 && (!steps || !prods || !out))) return 2;
    for (int64_t i = 0; i < n; ++i)
        if (!steps[i] || !prods[i]) return 2;
    if (dtype_bits == 64)
        adamw_scalars_f64(n, steps, prods, beta2, eps, (double *)out);
    else
        adamw_scalars_f32(n, steps, prods, beta2, eps, (float *)out);
    return 0;
}

/* ------------------------------------------------------------- one-element state */
/* What the statistics of a step (hf_am.statistics.record_step) write: one value per one-element state
 * tensor, a hundred or more of them a step at small models.  torch copies them one dispatch at a time
 * (~1.6 us each on CPU, most of that function's time); here they are one loop.  Each address holds one
 * float (is_double[i] == 0) or one double (is_double[i] == 1).
 *
 * am_store_scalars: values[i] is stored at dest[i], rounded once to its type; where adds[i] is 1 the
 * value stored is the value held plus values[i], added in double (a count plus its increment, as torch
 * adds a float32 count to a float64 increment).  Every value is formed before anything is stored, so
 * destinations that share memory see what a copy of the formed values would give them: `values`
 * is overwritten with the formed values (the caller's scratch).
 * Return 0, or 2 for arguments out of range (n < 0, a NULL address, a flag other than 0/1) before
 * anything is written. */
static int scalar_args_ok(int64_t n, void **addr, const unsigned char *is_double, const unsigned char *adds, const void *buf) {
    if (n < 0 || (n > 0 && (!addr || !is_double || !buf))) return 0;
    for (int64_t i = 0; i < n; ++i)
        if (!addr[i] || is_double[i] > 1 || (adds && adds[i] > 1)) return 0;
    return 1;
}

static double scalar_at(void *addr, unsigned char is_double) {
    return is_double ? *(const double *)addr : (double)*(const float *)addr;
}

int am_store_scalars(int64_t n, void **dest, const unsigned char *is_double, const unsigned char *adds, double *values) {
    if (!scalar_args_ok(n, dest, is_double, adds, values)) return 2;
    if (adds)
        for (int64_t i = 0; i < n; ++i)
            if (adds[i]) values[i] = scalar_at(dest[i], is_double[i]) + values[i];
    for (int64_t i = 0; i < n; ++i) {
        if (is_double[i])
            *(double *)dest[i] = values[i];
        else
            *(float *)dest[i] = (float)values[i];
    }
    return 0;
}

/* ------------------------------------------------------------------ threading */
/* Work is cut into chunks of at most AM_CHUNK elements of one tensor, fixed by the tensor sizes
 * alone, and the threads take chunks in turn from a shared counter.  A thread that loses its
 * core to another process (shared machines) thus delays the step by one chunk, not by half the
 * work.  Sum kernels write each chunk's sums to its own slot; the slots are added per tensor in
 * chunk order, so the sums do not depend on which thread ran a chunk, nor on the thread count.
 *
 * Order: the sums pass takes the chunks last to first and the update pass first to last.  What a
 * pass read last is what the caches still hold when the next pass starts, so the update pass begins
 * on the gradients and moments the sums pass just read, and the sums pass begins on the gradients
 * the backward pass and gradient clipping touched last (they walk the parameters in order, so the
 * last parameters' are the freshest).  At models whose state is a few caches' worth this saves
 * 5-25% of the two passes (benchmarks/RESULTS.md); being slot-per-chunk, the sums' bits do not
 * depend on it. */
#define AM_CHUNK (32 * AM_BLOCK)          /* 65536 elements: a multiple of AM_BLOCK */
#define AM_MIN_PER_THREAD (4 * AM_CHUNK)  /* a thread costs tens of microseconds to start */

typedef struct {
    Work work;
    RangeFn fn;
    const int64_t *first; /* first[i]: index of tensor i's first chunk; first[n] = chunk count */
    double *chunk_out;    /* 3 sums per chunk (sum kernels), else NULL */
    int64_t next;         /* next chunk to take (atomic) */
    int last_first;       /* take chunks last to first (the sums pass, see "Order" above) */
    const unsigned char *skip; /* skip[i]: tensor i is left out (NULL: none) */
} Shared;

/* Run `fn` on chunk `c` (global index) of tensor `i`, whose chunks start at first[i]: elements
 * [(c - first[i]) * AM_CHUNK, +AM_CHUNK) clipped to the tensor. */
static void run_chunk(RangeFn fn, const Work *w, int64_t i, int64_t c, const int64_t *first, double *out) {
    const int64_t lo = (c - first[i]) * AM_CHUNK;
    const int64_t hi = lo + AM_CHUNK < w->numel[i] ? lo + AM_CHUNK : w->numel[i];
    fn(w, i, lo, hi, out);
}

static void *run_chunks(void *arg) {
    Shared *sh = (Shared *)arg;
    const Work *w = &sh->work;
    int64_t total = sh->first[w->n], i = sh->last_first && w->n > 0 ? w->n - 1 : 0;
    for (;;) {
        int64_t c = __atomic_fetch_add(&sh->next, 1, __ATOMIC_RELAXED);
        if (c >= total) break;
        if (sh->last_first) {
            c = total - 1 - c;
            while (sh->first[i] > c) --i; /* a thread takes its chunks in decreasing order */
        } else {
            while (sh->first[i + 1] <= c) ++i; /* a thread takes its chunks in increasing order */
        }
        if (sh->skip && sh->skip[i]) continue;
        run_chunk(sh->fn, w, i, c, sh->first, sh->chunk_out ? sh->chunk_out + 3 * c : NULL);
    }
    return NULL;
}

/* The chunk count of tensors 0..n-1 of `base`, with first[i] (n + 1 entries) as in Shared. */
static int64_t chunk_starts(const Work *base, int64_t *first) {
    first[0] = 0;
    for (int64_t i = 0; i < base->n; ++i) first[i + 1] = first[i] + (base->numel[i] + AM_CHUNK - 1) / AM_CHUNK;
    return first[base->n];
}

/* Run `fn(arg)` on a team of `threads` threads (the caller's thread among them), each taking work from a
 * shared counter until none is left.  A thread that cannot be started leaves its work to the others. */
static void run_team(void *(*fn)(void *), void *arg, int threads) {
#ifdef AM_OPENMP
    /* torch's OpenMP pool (hf_am/kernels/cpu_build.py links this library against the runtime torch
     * loaded): right after the backward pass its workers are awake and spinning, so a pass started
     * on them costs no thread start, and does not compete with them for the cores, as fresh pthreads
     * would (measured in benchmarks/RESULTS.md).  Any team size gives the same results. */
#pragma omp parallel num_threads(threads)
    fn(arg);
#else
    pthread_t ids[64];
    int started = 0;
    for (int t = 1; t < threads && t < 64; ++t) {
        if (pthread_create(&ids[started], NULL, fn, arg) != 0) break;
        ++started;
    }
    fn(arg);
    for (int t = 0; t < started; ++t) pthread_join(ids[t], NULL);
#endif
}

/* Teams of 1 to 64 threads (the pthread fallback's table holds 64). */
static int clamp_threads(int threads) { return threads < 1 ? 1 : threads > 64 ? 64 : threads; }

/* The team size for `total` elements on up to `threads` threads, `units` pieces of work at most. */
static int team_size(int64_t total, int threads, int64_t units) {
    threads = clamp_threads(threads);
    if (total < AM_MIN_PER_THREAD * (int64_t)threads) threads = (int)(total / AM_MIN_PER_THREAD) + 1;
    if (threads > units) threads = units > 0 ? (int)units : 1;
    return threads;
}

/* Run `fn` over all elements of the tensors not marked in `skip` (NULL: all) on up to `threads` threads;
 * sum kernels add each such tensor's chunk sums, in chunk order, into `out` (n * 3 doubles).  `first`
 * (n + 1 entries) and, for sum kernels, `chunk_out` (3 doubles per chunk) are the caller's scratch:
 * nothing here can fail, so a caller that allocated them can run several passes and know that each one
 * runs to its end. */
static void run_in(Work base, RangeFn fn, int threads, double *out, int64_t *first, double *chunk_out,
                   const unsigned char *skip) {
    int64_t total = 0;
    for (int64_t i = 0; i < base.n; ++i)
        if (!skip || !skip[i]) total += base.numel[i];
    int64_t chunks = chunk_starts(&base, first);
    if (total == 0) return;
    Shared sh;
    sh.work = base;
    sh.fn = fn;
    sh.first = first;
    sh.chunk_out = out ? chunk_out : NULL;
    sh.next = 0;
    sh.last_first = out != NULL;
    sh.skip = skip;
    if (sh.chunk_out) memset(sh.chunk_out, 0, (size_t)chunks * 3 * sizeof(double));
    run_team(run_chunks, &sh, team_size(total, threads, chunks));
    if (out) {
        for (int64_t i = 0; i < base.n; ++i) {
            if (skip && skip[i]) continue;
            for (int64_t c = first[i]; c < first[i + 1]; ++c)
                for (int k = 0; k < 3; ++k) out[3 * i + k] += sh.chunk_out[3 * c + k];
        }
    }
}

/* run_in with its scratch allocated here (1: out of memory, before any element is touched). */
static int run(Work base, RangeFn fn, int threads, double *out) {
    int64_t *first = (int64_t *)malloc(((size_t)base.n + 1) * sizeof(int64_t));
    if (!first) return 1;
    double *chunk_out = NULL;
    if (out) {
        int64_t chunks = chunk_starts(&base, first);
        chunk_out = (double *)malloc(((size_t)chunks + 1) * 3 * sizeof(double));
        if (!chunk_out) {
            free(first);
            return 1;
        }
    }
    run_in(base, fn, threads, out, first, chunk_out, NULL);
    free(chunk_out);
    free(first);
    return 0;
}

/* ---------------------------------------------------------------- entry points */
/* The file name this build was installed under (hf_am/kernels/cpu_build.py passes it at compile time and
 * checks it after loading: given a name it loaded before, /proc/self/fd/N of a descriptor since closed,
 * the dynamic loader returns that earlier library instead of opening the file). */
#ifndef AM_BUILD_NAME
#define AM_BUILD_NAME ""
#endif
const char *am_build_name(void) { return AM_BUILD_NAME; }

/* How this build runs its threads: 1 on the OpenMP pool of the process (torch's), 0 on pthreads. */
int am_threading(void) {
#ifdef AM_OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Return 0 on success; `dtype_bits` is 32 or 64. `out` must hold n * 3 zeros. */
int am_adamw_sums(int dtype_bits, int threads, int64_t n, const int64_t *numel, void **g, void **m, void **v,
                  double beta2, const double *eps_scaled, const double *d_scale, double *out) {
    Work w;
    memset(&w, 0, sizeof w);
    w.n = n; w.numel = numel; w.a = g; w.b = m; w.c = v; w.h0 = beta2; w.s0 = eps_scaled; w.s1 = d_scale;
    return run(w, dtype_bits == 64 ? adamw_sums_f64 : adamw_sums_f32, threads, out);
}

int am_adamw_update(int dtype_bits, int threads, int64_t n, const int64_t *numel, void **p, void **g, void **m,
                    void **v, double beta2, const double *eps_scaled, const double *keep, const double *weight,
                    const double *decay, const double *step) {
    Work w;
    memset(&w, 0, sizeof w);
    w.n = n; w.numel = numel; w.a = p; w.b = g; w.c = m; w.d = v; w.h0 = beta2;
    w.s0 = eps_scaled; w.s1 = keep; w.s2 = weight; w.s3 = decay; w.s4 = step;
    return run(w, dtype_bits == 64 ? adamw_update_f64 : adamw_update_f32, threads, NULL);
}

/* ------------------------------------------------------------ AM-AdamW in one call */
/* A whole AM-AdamW step in one call, for the case where nothing between the passes needs Python: every
 * tensor its own scope (scope="tensor"), the linear loss estimate, no collective (docs/algorithm.md §10).
 * The sums pass, each tensor's coefficient, then the update pass, with the same operations as the
 * two-call step: the same chunks summed in the same order, and between the passes the double and
 * parameter-precision operations of the Python definitions, in their order, uncontracted (adamw_between);
 * tests/unit/test_one_call_step.py holds the two to the same bits.  What it saves is the host work between
 * the passes (about twenty torch ops on vectors of a few dozen numbers) and a second call; and, for the
 * tensors it steps whole on one thread ("tasks", below), the second read of g, m and v from memory.
 * (Cache-sized windows of all tensors, sums then update per window on all threads, were measured too and
 * were slower: each window ends in a barrier of the team.  Tasks need none: a thread takes whole
 * tensors.) */
typedef struct {
    const double *bias2_sqrt;  /* c = sqrt(1 - beta2^t) per tensor (values of the parameter type) */
    const double *prods;       /* product of applied coefficients so far (values of the parameter type) */
    const double *eta, *eta_b; /* the learning-rate weights of A and C, and of B (eta + eta') */
    const int64_t *scope;      /* scope index of each tensor */
    int64_t n_scopes;
    const double *hyper;       /* 4 x hyper_len: lam, beta_min, beta_max, restart threshold (NaN: none) */
    int64_t hyper_len;         /* 1 or n_scopes */
    int has_threshold, has_restarts;
    double neg_lr;             /* -lr, as Python negated it */
    double *coef_out;          /* 5 x n_scopes: adaptive, reported, applied, restart, fallback */
    void *prods_out;           /* n values of the parameter type: the new products */
} StepArgs;

typedef void (*BetweenFn)(const StepArgs *a, int64_t i, const double *raw, double *keep, double *weight, double *step);

/* hf_am.am_adamw._sums_fused (sums * c), hf_am.reduction.scope_sums (times the lr weights, added to a zero
 * total), the closed form (coefficient_row), AMAdamW._apply_update (the new product, reset by a restart)
 * and _update_fused (step size -lr c / (1 - product), weight 1 - applied, keep 1 - restart). */
#define ADAMW_BETWEEN(T, NAME)                                                                             \
    __attribute__((noinline, optimize("fp-contract=off")))                                                 \
    static void NAME(const StepArgs *a, int64_t i, const double *raw, double *keep, double *weight, double *step) { \
        const double c = a->bias2_sqrt[i];                                                                 \
        const double s0 = 0.0 + (raw[0] * c) * a->eta[i];                                                  \
        const double s1 = 0.0 + (raw[1] * c) * a->eta_b[i];                                                \
        const double s2 = 0.0 + (raw[2] * c) * a->eta[i];                                                  \
        const int64_t sid = a->scope[i];                                                                   \
        double *col = a->coef_out + sid;                                                                   \
        coefficient_row(s0, s1, s2, a->hyper, a->hyper_len, a->hyper_len == 1 ? 0 : sid, a->has_threshold, \
                        NULL, col, a->n_scopes);                                                           \
        const double applied = col[2 * a->n_scopes], restart = col[3 * a->n_scopes];                      \
        T prod = (T)a->prods[i];                                                                           \
        if (a->has_restarts && restart > 0) prod = (T)1;                                                   \
        const T prod_new = prod * (T)applied;                                                              \
        ((T *)a->prods_out)[i] = prod_new;                                                                 \
        step[i] = (double)(((T)a->neg_lr * (T)c) / ((T)1 - prod_new));                                     \
        weight[i] = 1.0 - applied;                                                                         \
        if (keep) keep[i] = 1.0 - restart;                                                                 \
    }

ADAMW_BETWEEN(float, adamw_between_f32)
ADAMW_BETWEEN(double, adamw_between_f64)

/* Tensors the one call steps whole on one thread, sums then update ("tasks"), so that the update finds
 * g, m and v where the sums pass left them, in the caches.  Every tensor is its own scope in the one call,
 * so a tensor's coefficient needs its own sums only.  Measured on the 2-core EPYC of benchmarks/RESULTS.md
 * (round 6, 32 MB L3), against both passes over all tensors in the same rounds: 1.55-1.71x -> 1.39-1.52x
 * fused AdamW at 25M in LLaMA-like shapes, 1.47-1.48x -> 1.27-1.38x at 101M.  The 8 MB limit comes from a
 * one-off sweep of equal tensors with a prototype: 4 MB arrays gained most, 16 MB ones little.  A task's
 * chunks are the chunks of the two passes, summed into their slots and added in chunk order, so the bits
 * are those of the two passes whichever thread takes the tensor.  Larger tensors, and tensors too large a
 * share of the step for the threads to finish together, take both passes with all threads as before. */
#define AM_TASK_BYTES ((int64_t)8 << 20) /* one array of the tensor (8 MB: 2M float32 elements) */
#define AM_TASK_SHARE 4                  /* at most 1 / (4 x threads) of the step's elements */

typedef struct {
    const Work *sums, *update;
    RangeFn sums_fn, update_fn;
    BetweenFn between;
    const StepArgs *args;
    const int64_t *first;
    double *chunk_out, *sums_out, *keep, *weight, *step;
    const int64_t *order; /* the task tensors, in the order they are taken */
    int64_t n_tasks;
    int64_t next;         /* next task to take (atomic) */
} Tasks;

static void *run_tasks(void *arg) {
    Tasks *t = (Tasks *)arg;
    for (;;) {
        int64_t k = __atomic_fetch_add(&t->next, 1, __ATOMIC_RELAXED);
        if (k >= t->n_tasks) break;
        const int64_t i = t->order[k];
        /* Sums last chunk to first, so the update, first to last, starts on what the sums read last. */
        for (int64_t c = t->first[i + 1] - 1; c >= t->first[i]; --c) {
            double *o = t->chunk_out + 3 * c;
            o[0] = o[1] = o[2] = 0.0;
            run_chunk(t->sums_fn, t->sums, i, c, t->first, o);
        }
        for (int64_t c = t->first[i]; c < t->first[i + 1]; ++c)
            for (int j = 0; j < 3; ++j) t->sums_out[3 * i + j] += t->chunk_out[3 * c + j];
        t->between(t->args, i, t->sums_out + 3 * i, t->keep, t->weight, t->step);
        for (int64_t c = t->first[i]; c < t->first[i + 1]; ++c) run_chunk(t->update_fn, t->update, i, c, t->first, NULL);
    }
    return NULL;
}

/* Mark in `is_task` (n entries) the tensors am_adamw_step takes as tasks on `threads` threads; return how
 * many, or -1 (nothing written) for a dtype other than 32/64 bits, n < 0 or a negative numel.  Exported so
 * that the tests can see which of their tensors take which path. */
int64_t am_adamw_step_tasks(int dtype_bits, int threads, int64_t n, const int64_t *numel, unsigned char *is_task) {
    if ((dtype_bits != 32 && dtype_bits != 64) || n < 0) return -1;
    for (int64_t i = 0; i < n; ++i)
        if (numel[i] < 0) return -1;
    const int64_t elem = dtype_bits == 64 ? 8 : 4, team = clamp_threads(threads);
    int64_t total = 0, n_tasks = 0;
    for (int64_t i = 0; i < n; ++i) total += numel[i];
    const int64_t share_bytes = total / (AM_TASK_SHARE * team) * elem;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t bytes = numel[i] * elem;
        is_task[i] = bytes <= AM_TASK_BYTES && bytes <= share_bytes;
        n_tasks += is_task[i];
    }
    return n_tasks;
}

/* Return 0 on success, 2 for arguments out of range (a scope index repeated among them), 1 when out of
 * memory; in both failures before any tensor is touched.  `sums_out` (n x 3) must hold zeros; it receives
 * each tensor's unweighted sums. */
int am_adamw_step(int dtype_bits, int threads, int64_t n, const int64_t *numel, void **p, void **g, void **m, void **v,
                  double beta2, const double *eps_scaled, const double *d_scale, const double *bias2_sqrt,
                  const double *prods, const double *eta, const double *eta_b, const double *decay, double neg_lr,
                  int has_restarts, const int64_t *scope, int64_t n_scopes, const double *hyper, int64_t hyper_len,
                  int has_threshold, double *coef_out, void *prods_out, double *sums_out) {
    if ((dtype_bits != 32 && dtype_bits != 64) || n < 0 || n_scopes < 0) return 2;
    if (hyper_len != 1 && hyper_len != n_scopes) return 2;
    for (int64_t i = 0; i < n; ++i)
        if (numel[i] < 0 || scope[i] < 0 || scope[i] >= n_scopes) return 2;
    /* Every tensor its own scope: tasks on different threads write their own column of coef_out. */
    unsigned char *seen = (unsigned char *)calloc((size_t)n_scopes + 1, 1);
    if (!seen) return 1;
    int repeated = 0;
    for (int64_t i = 0; i < n && !repeated; ++i) {
        repeated = seen[scope[i]];
        seen[scope[i]] = 1;
    }
    free(seen);
    if (repeated) return 2;
    Work sums;
    memset(&sums, 0, sizeof sums);
    sums.n = n; sums.numel = numel; sums.a = g; sums.b = m; sums.c = v; sums.h0 = beta2; sums.s0 = eps_scaled; sums.s1 = d_scale;
    int64_t *first = (int64_t *)malloc(((size_t)n + 1) * sizeof(int64_t));
    int64_t *order = (int64_t *)malloc(((size_t)n + 1) * sizeof(int64_t));
    unsigned char *is_task = (unsigned char *)malloc((size_t)n + 1);
    double *scalars = (double *)malloc(((size_t)n * 3 + 1) * sizeof(double)); /* keep, weight, step per tensor */
    double *chunk_out = first ? (double *)malloc(((size_t)chunk_starts(&sums, first) + 1) * 3 * sizeof(double)) : NULL;
    if (!first || !order || !is_task || !scalars || !chunk_out) {
        free(first);
        free(order);
        free(is_task);
        free(scalars);
        free(chunk_out);
        return 1;
    }
    double *keep = has_restarts ? scalars : NULL, *weight = scalars + n, *step = scalars + 2 * (size_t)n;
    Work update;
    memset(&update, 0, sizeof update);
    update.n = n; update.numel = numel; update.a = p; update.b = g; update.c = m; update.d = v; update.h0 = beta2;
    update.s0 = eps_scaled; update.s1 = keep; update.s2 = weight; update.s3 = decay; update.s4 = step;
    StepArgs args = {bias2_sqrt, prods, eta, eta_b, scope, n_scopes, hyper, hyper_len, has_threshold, has_restarts,
                     neg_lr, coef_out, prods_out};
    const int wide = dtype_bits == 64;
    RangeFn sums_fn = wide ? adamw_sums_f64 : adamw_sums_f32, update_fn = wide ? adamw_update_f64 : adamw_update_f32;
    BetweenFn between = wide ? adamw_between_f64 : adamw_between_f32;

    const int64_t n_tasks = am_adamw_step_tasks(dtype_bits, threads, n, numel, is_task);
    int64_t task_total = 0, k = 0;
    for (int64_t i = n - 1; i >= 0; --i) /* tasks are taken last to first (the freshest gradients first) */
        if (is_task[i]) {
            order[k++] = i;
            task_total += numel[i];
        }
    run_in(sums, sums_fn, threads, sums_out, first, chunk_out, is_task);
    for (int64_t i = 0; i < n; ++i)
        if (!is_task[i]) between(&args, i, sums_out + 3 * i, keep, weight, step);
    run_in(update, update_fn, threads, NULL, first, NULL, is_task);
    if (n_tasks > 0) {
        Tasks tasks = {&sums, &update, sums_fn, update_fn, between, &args, first, chunk_out, sums_out,
                       keep, weight, step, order, n_tasks, 0};
        run_team(run_tasks, &tasks, team_size(task_total, threads, n_tasks));
    }
    free(chunk_out);
    free(scalars);
    free(is_task);
    free(order);
    free(first);
    return 0;
}

int am_sgd_sums(int dtype_bits, int threads, int64_t n, const int64_t *numel, void **g, void **x, void **d,
                double weight_decay, double *out) {
    Work w;
    memset(&w, 0, sizeof w);
    w.n = n; w.numel = numel; w.a = g; w.b = x; w.c = d; w.h0 = weight_decay;
    return run(w, dtype_bits == 64 ? sgd_sums_f64 : sgd_sums_f32, threads, out);
}

int am_sgd_update(int dtype_bits, int threads, int64_t n, const int64_t *numel, void **x, void **g, void **d,
                  double weight_decay, const double *weight, const double *step) {
    Work w;
    memset(&w, 0, sizeof w);
    w.n = n; w.numel = numel; w.a = x; w.b = g; w.c = d; w.h0 = weight_decay; w.s0 = weight; w.s1 = step;
    return run(w, dtype_bits == 64 ? sgd_update_f64 : sgd_update_f32, threads, NULL);
}
