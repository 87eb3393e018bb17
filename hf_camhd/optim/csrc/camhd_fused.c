/*
 * Fused CPU kernels of the CAM-HD step (hf_camhd.optim._fused). Plain C99 + OpenMP, no Python or
 * torch headers: the Python side passes data pointers of contiguous CPU tensors through ctypes.
 *
 * Every step takes two passes over memory (pass A, the hyper-update, pass B); every entry point runs over all
 * tensors of a param group (and dtype) in one call:
 *   camhd_adam_a_many_<t>  pass A: sum g*dir_old (and sum off*g*dir_old with a parameter level, sum g*g and
 *                          sum dir_old^2 for the normalized rule), per tensor and (units along dim 0, rows of row_len
 *                          elements) per unit; the parameter level's element-wise alpha update; the Adam state and
 *                          the next dir, in one loop
 *   camhd_sgd_a_many_<t>   pass A for SGD / momentum / Nesterov
 *   camhd_hyper_step_<t>   between the passes: alpha of every level but the parameter level, gamma and the
 *                          combined rates from pass A's sums (camhd_hyper_impl.h; <t>: the hyper-state dtype)
 *   camhd_apply_many_<t>   pass B: theta <- theta + K * dir
 *
 * The kernels are written once in camhd_fused_impl.h and included for float (f32) and double (f64).
 * Sums accumulate in double, in an order fixed by the shapes alone (never by the thread count or timing): each
 * chunk is summed with CAMHD_LANES independent accumulators (short blocks in the element type, then double) and the
 * chunks' sums are added in chunk order;
 * per-unit sums are computed whole, row by row. So results are bitwise reproducible on any number of threads
 * (built without OpenMP the chunks simply run in order). The element loops are always-inline bodies instantiated per flag
 * combination (branch-free, so they vectorise); `target_clones` adds AVX-512 and AVX2 builds picked at load time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CAMHD_CHUNK 65536  /* elements per chunk: the unit of work the threads share */
#define CAMHD_LANES 16
#define INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CAMHD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CAMHD_CLONES
#endif

/* a piece of one tensor's work for the many-tensor kernels: elements [lo, hi) of tensor t */
typedef struct {
    int64_t t, lo, hi;
} camhd_chunk;

/* every tensor cut into chunks of about CAMHD_CHUNK elements (whole rows of row_lens[t] elements where > 0, at
 * least one row per chunk), in tensor order; the list is malloc'ed (NULL when out of memory) */
static camhd_chunk *camhd_chunks(int64_t nt, const int64_t *sizes, const int64_t *row_lens, int64_t *count) {
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) {
        int64_t rl = row_lens ? row_lens[t] : 0;
        int64_t step = rl > 0 ? (CAMHD_CHUNK / rl > 0 ? CAMHD_CHUNK / rl : 1) * rl : CAMHD_CHUNK;
        total += sizes[t] > 0 ? (sizes[t] + step - 1) / step : 0;
    }
    camhd_chunk *c = (camhd_chunk *)malloc((size_t)(total > 0 ? total : 1) * sizeof(camhd_chunk));
    if (!c) return 0;
    int64_t k = 0;
    for (int64_t t = 0; t < nt; t++) {
        int64_t rl = row_lens ? row_lens[t] : 0;
        int64_t step = rl > 0 ? (CAMHD_CHUNK / rl > 0 ? CAMHD_CHUNK / rl : 1) * rl : CAMHD_CHUNK;
        for (int64_t lo = 0; lo < sizes[t]; lo += step) {
            c[k].t = t;
            c[k].lo = lo;
            c[k].hi = lo + step < sizes[t] ? lo + step : sizes[t];
            k++;
        }
    }
    *count = total;
    return c;
}

/* Every flag combination of a pass-A loop that the entry points select, as a switch case with constant flags
 * (branch-free loops that vectorise): norms, amsgrad, L2, derived, offsets / norms, L2, first, momentum, derived,
 * offsets. DRV: where the previous direction comes from (see CAMHD_OLD_DIR in camhd_fused_impl.h); in the SGD codes it
 * is stored as 0 (stored), 1 (none: 0) or 2 (the heavy-ball buffer) and mapped back to 0 / 2 / 3. (Bit 1 of the Adam
 * code is unused: AdamW's decoupled decay enters in pass B.) */
#define ADAM_A_CASE(NORMS, AMS, L2, DRV, OFF)                                                        \
    case (NORMS | AMS << 2 | L2 << 3 | DRV << 4 | OFF << 5):                                       \
        SFX(adam_a_loop)(p, g, dir, m, v, vmax, off, oc, olo, ohi, oa0, lo, hi, NORMS, AMS, L2, DRV, OFF, wd, \
                         w1, b2, w2, shift, sp, s);                                                 \
        break;
#define ADAM_A_CASES_N(AMS, L2, DRV) ADAM_A_CASE(0, AMS, L2, DRV, 0)                                  \
    ADAM_A_CASE(1, AMS, L2, DRV, 0) ADAM_A_CASE(0, AMS, L2, DRV, 1) ADAM_A_CASE(1, AMS, L2, DRV, 1)
#define ADAM_A_CASES_D(DRV) ADAM_A_CASES_N(0, 0, DRV) ADAM_A_CASES_N(1, 0, DRV) ADAM_A_CASES_N(0, 1, DRV) \
    ADAM_A_CASES_N(1, 1, DRV)
#define ADAM_A_CASES ADAM_A_CASES_D(0) ADAM_A_CASES_D(1)
#define SGD_A_CASE(NORMS, L2, FIRST, MOM, DRV, OFF)                                                  \
    case (NORMS | L2 << 1 | FIRST << 2 | MOM << 3 | DRV << 5 | OFF << 7):                          \
        SFX(sgd_a_loop)(p, g, dir, buf, off, oc, olo, ohi, oa0, lo, hi, NORMS, MOM, FIRST, L2,          \
                        DRV ? DRV + 1 : 0, OFF, wd, mu, dm, s);                                     \
        break;
#define SGD_A_CASES_N(L2, FIRST, MOM, DRV) SGD_A_CASE(0, L2, FIRST, MOM, DRV, 0)                      \
    SGD_A_CASE(1, L2, FIRST, MOM, DRV, 0) SGD_A_CASE(0, L2, FIRST, MOM, DRV, 1) SGD_A_CASE(1, L2, FIRST, MOM, DRV, 1)
#define SGD_A_CASES_F(L2, MOM) SGD_A_CASES_N(L2, 0, MOM, 0) SGD_A_CASES_N(L2, 1, MOM, 0)
/* plain SGD (MOM 0) has no buffer, so never a first step; the derived codes only with heavy ball (MOM 1): a zero
 * direction (1) on its first step, the buffer (2) after */
#define SGD_A_CASES SGD_A_CASES_N(0, 0, 0, 0) SGD_A_CASES_N(1, 0, 0, 0) SGD_A_CASES_F(0, 1) SGD_A_CASES_F(1, 1) \
    SGD_A_CASES_F(0, 2) SGD_A_CASES_F(1, 2) SGD_A_CASES_N(0, 1, 1, 1) SGD_A_CASES_N(1, 1, 1, 1)       \
    SGD_A_CASES_N(0, 0, 1, 2) SGD_A_CASES_N(1, 0, 1, 2)

/* What camhd_hyper_step_<t> reads and writes (pointers to T are void *: T is the hyper-state's dtype). Sums,
 * alpha, stats, beta and gamma are the C-contiguous buffers of the optimizer's tensors, updated in place. */
#define CAMHD_MAX_LEVELS 8
typedef struct {
    int64_t nt;               /* tensors in the step */
    int64_t channels;         /* sums per tensor and node: 1 (sum g.u), or 3 (+ sum g^2, sum u^2: normalized) */
    int64_t levels;           /* entries of gamma; global is entry 0 */
    int64_t adapt;            /* 1: update alpha and gamma (steps 2-3) first; 0: the rates only */
    int64_t normalized;       /* the normalized rule (else additive) */
    int64_t softmax;          /* gamma by a gradient step on its logits (else clamped and renormalised) */
    int64_t decay;            /* w decays towards alpha_inf (tau given) */
    int64_t n_block, n_layer; /* nodes of the block and layer levels (0 when absent) */
    int64_t pos_block, pos_layer, pos_unit, pos_param; /* their entries of gamma, -1 when absent */
    int64_t n_unit_groups;    /* unit groups with sums this step */
    const double *totals;     /* (nt, 4) the kernels' sums: g.dir, off.g.dir, g.g, dir.dir */
    const double *scales;     /* (nt) the factor c of u_{t-1} = c dir */
    const int64_t *block_of, *layer_of;       /* (nt) node of each tensor */
    void *alpha_global, *alpha_block, *alpha_layer;
    void *stats_global, *stats_block, *stats_layer;    /* normalized: (nodes, 3) smoothed sums */
    const void *beta_global, *beta_block, *beta_layer; /* additive: beta of each node */
    void *const *unit_alpha;  /* (n_unit_groups) each group's alpha vector */
    void *const *unit_stats;  /* normalized: each group's (units, 3) smoothed sums */
    const int64_t *unit_sizes;                /* units of each group */
    const void *unit_sums;    /* (units of all groups, channels) */
    const void *unit_beta;    /* additive: (units of all groups) */
    const void *gamma_unit_part;              /* 0-d: sum over units of alpha_unit * sum g.u */
    void *gamma, *gamma_logits, *gamma_grad;  /* (levels); logits: softmax; gamma_grad: normalized, smoothed */
    int64_t *skipped;         /* counted up when the sums are not finite */
    double lr, hypergrad_lr, gamma_lr, smoothing_weight, alpha_min, alpha_max, alpha_inf, tau;
    void *node_sums;          /* out: (1 + n_block + n_layer, channels) global, block and layer sums */
    void *gradient;           /* out: (levels) dL/dgamma (when gamma_lr > 0) */
    void *rates;              /* out: (nt + 2) w of every tensor, then tau gamma_unit and tau gamma_param */
} camhd_hyper_args;

/* CAMHD_PART 1: the float kernels only, 2: the double ones only (two objects the build compiles at the same time,
 * then links); undefined: both */
#if !defined(CAMHD_PART) || CAMHD_PART == 1
#define T float
#define SFX(name) name##_f32
#define SQRT sqrtf
#include "camhd_fused_impl.h"
#include "camhd_hyper_impl.h"
#undef T
#undef SFX
#undef SQRT
#endif

#if !defined(CAMHD_PART) || CAMHD_PART == 2
#define T double
#define SFX(name) name##_f64
#define SQRT sqrt
#include "camhd_fused_impl.h"
#include "camhd_hyper_impl.h"
#undef T
#undef SFX
#undef SQRT
#endif
