/*
 * Fused CPU kernels of the CAM-HD step (hf_camhd.optim._fused). Plain C99 + OpenMP, no Python or
 * torch headers: the Python side passes data pointers of contiguous CPU tensors through ctypes.
 *
 *   camhd_hsum_<T>   pass 1: out[0] = sum g*dir, out[1] = sum off*g*dir        (reads g, dir, off)
 *   camhd_adam_<T>   pass 2: parameter-level alpha update, Adam/AdamW moments, theta update, next dir
 *   camhd_sgd_<T>    pass 2: the same with SGD / momentum / Nesterov
 *
 * Sums accumulate in double. Each thread sums a fixed contiguous slice and the partial sums are added
 * in thread order afterwards, so results are bitwise reproducible for a given thread count (an OpenMP
 * `reduction` clause combines in completion order, which is not). The element loops are written once
 * (always-inline bodies) and instantiated per flag combination, so every loop is branch-free and
 * vectorises; `target_clones` adds an AVX2 version picked at load time where the CPU has it.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* built without OpenMP: one thread, same results as a one-thread OpenMP build */
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define CAMHD_GRAIN 32768
#define CAMHD_MAX_THREADS 256
#define CAMHD_LANES 16
#define INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CAMHD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CAMHD_CLONES
#endif

static int camhd_threads(int64_t n) {
    int64_t t = n / CAMHD_GRAIN;
    int mx = omp_get_max_threads();
    if (t < 1) return 1;
    if (t > mx) t = mx;
    if (t > CAMHD_MAX_THREADS) t = CAMHD_MAX_THREADS;
    return (int)t;
}

/* the slice [lo, hi) of thread t among nt (multiples of 16 elements) */
INLINE void camhd_slice(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t per = ((n + nt - 1) / nt + 15) & ~(int64_t)15;
    *lo = per * t < n ? per * t : n;
    *hi = per * (t + 1) < n ? per * (t + 1) : n;
}

#define CAMHD_DEFINE(T, SFX)                                                                          \
/* CAMHD_LANES independent accumulators (a fixed summation order that still vectorises), then a tail */ \
INLINE void hsum_slice_##SFX(const T *restrict g, const T *restrict dir, const T *restrict off,        \
                             int64_t lo, int64_t hi, double *s0, double *s1) {                        \
    double a[CAMHD_LANES] = {0}, b[CAMHD_LANES] = {0};                                                \
    int64_t i = lo, end = lo + (hi - lo) / CAMHD_LANES * CAMHD_LANES;                                 \
    if (off) {                                                                                        \
        for (; i < end; i += CAMHD_LANES)                                                             \
            for (int j = 0; j < CAMHD_LANES; j++) {                                                   \
                double h = (double)g[i + j] * (double)dir[i + j];                                     \
                a[j] += h;                                                                            \
                b[j] += (double)off[i + j] * h;                                                       \
            }                                                                                         \
        for (; i < hi; i++) {                                                                         \
            double h = (double)g[i] * (double)dir[i];                                                 \
            a[0] += h;                                                                                \
            b[0] += (double)off[i] * h;                                                               \
        }                                                                                             \
    } else {                                                                                          \
        for (; i < end; i += CAMHD_LANES)                                                             \
            for (int j = 0; j < CAMHD_LANES; j++) a[j] += (double)g[i + j] * (double)dir[i + j];        \
        for (; i < hi; i++) a[0] += (double)g[i] * (double)dir[i];                                    \
    }                                                                                                 \
    double sa = 0.0, sb = 0.0;                                                                        \
    for (int j = 0; j < CAMHD_LANES; j++) { sa += a[j]; sb += b[j]; }                                 \
    *s0 = sa; *s1 = sb;                                                                               \
}                                                                                                     \
                                                                                                      \
CAMHD_CLONES void camhd_hsum_##SFX(const T *g, const T *dir, const T *off, int64_t n, double *out) {  \
    double part[2 * CAMHD_MAX_THREADS];                                                               \
    int nt = camhd_threads(n), used = 1; (void)nt;                                                    \
    _Pragma("omp parallel num_threads(nt)")                                                           \
    {                                                                                                 \
        int t = omp_get_thread_num(), k = omp_get_num_threads();                                      \
        int64_t lo, hi;                                                                               \
        if (t == 0) used = k;                                                                         \
        camhd_slice(n, t, k, &lo, &hi);                                                               \
        hsum_slice_##SFX(g, dir, off, lo, hi, &part[2 * t], &part[2 * t + 1]);                        \
    }                                                                                                 \
    out[0] = 0.0; out[1] = 0.0;                                                                       \
    for (int t = 0; t < used; t++) { out[0] += part[2 * t]; out[1] += part[2 * t + 1]; }               \
}                                                                                                     \
                                                                                                      \
/* the parameter-level alpha offset of element i: updated (clamped) when UPD, else as stored */       \
INLINE T alpha_off_##SFX(T *restrict off, T gi, T di, int64_t i, const int OFF, const int UPD,         \
                         T c, T lo, T hi) {                                                           \
    if (!OFF) return (T)0;                                                                            \
    T o = off[i];                                                                                     \
    if (UPD) {                                                                                        \
        o = o + c * (gi * di);                                                                        \
        o = o < lo ? lo : o;                                                                          \
        o = o > hi ? hi : o;                                                                          \
        off[i] = o;                                                                                   \
    }                                                                                                 \
    return o;                                                                                         \
}                                                                                                     \
                                                                                                      \
INLINE void adam_loop_##SFX(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,     \
                            T *restrict m, T *restrict v, T *restrict vmax, int64_t lo, int64_t hi,   \
                            const int OFF, const int UPD, const int DEC, const int AMS, const int L2, \
                            T c, T olo, T ohi, T ka, T kb, T da, T db, T dd,                          \
                            T wd, T w1, T b2, T w2, T shift) {                                        \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        T gi = g[i], th = p[i];                                                                       \
        T o = alpha_off_##SFX(off, gi, dir[i], i, OFF, UPD, c, olo, ohi);                             \
        T gg = L2 ? gi + wd * th : gi;                                                                \
        T mi = m[i] + w1 * (gg - m[i]);                                                               \
        T vi = b2 * v[i] + w2 * gg * gg;                                                              \
        m[i] = mi; v[i] = vi;                                                                         \
        if (AMS) { T mx = vmax[i]; vi = vi > mx ? vi : mx; vmax[i] = vi; }                            \
        T q = mi / (sqrt##SFX(vi) + shift);                                                           \
        T k = OFF ? ka + kb * o : ka;                                                                 \
        if (DEC) {                                                                                    \
            T kd = OFF ? da + db * o : da;                                                            \
            dir[i] = q + dd * th;                                                                     \
            p[i] = th * (kd + (T)1) + k * q;                                                          \
        } else {                                                                                      \
            dir[i] = q;                                                                               \
            p[i] = th + k * q;                                                                        \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* Adam / AdamW. off (nullable): parameter-level alpha offsets, off <- clamp(off + c*g*dir_old) when   \
 * do_alpha. theta <- theta*(1 + da + db*off) [decoupled] + (ka + kb*off)*q; dir <- q + dd*theta_old   \
 * [decoupled] or q, with q = m / (sqrt(v) + shift) after the moment updates (L2 decay wd into g). */  \
CAMHD_CLONES void camhd_adam_##SFX(T *p, const T *g, T *dir, T *off, T *m, T *v, T *vmax, int64_t n,  \
                      int do_alpha, double c, double olo, double ohi,                                 \
                      double ka, double kb, int decoupled, double da, double db, double dd,           \
                      double wd, double w1, double b2, double w2, double shift) {                     \
    int nt = camhd_threads(n); (void)nt;                                                              \
    int OFF = off != 0, UPD = off != 0 && do_alpha, DEC = decoupled != 0, AMS = vmax != 0;            \
    int L2 = wd != 0.0;                                                                               \
    int code = OFF | UPD << 1 | DEC << 2 | AMS << 3 | L2 << 4;                                        \
    _Pragma("omp parallel num_threads(nt)")                                                           \
    {                                                                                                 \
        int64_t lo, hi;                                                                               \
        camhd_slice(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);                        \
        switch (code) {                                                                               \
        CAMHD_ADAM_CASES(SFX)                                                                         \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
INLINE void sgd_loop_##SFX(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,      \
                           T *restrict buf, int64_t lo, int64_t hi,                                   \
                           const int OFF, const int UPD, const int MOM, const int FIRST, const int L2,\
                           T c, T olo, T ohi, T ka, T kb, T wd, T mu, T dm) {                         \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        T gi = g[i], th = p[i];                                                                       \
        T o = alpha_off_##SFX(off, gi, dir[i], i, OFF, UPD, c, olo, ohi);                             \
        T gg = L2 ? gi + wd * th : gi;                                                                \
        T d = gg;                                                                                     \
        if (MOM) {                                                                                    \
            T b = FIRST ? gg : buf[i] * mu + dm * gg;                                                 \
            buf[i] = b;                                                                               \
            d = MOM == 2 ? gg + mu * b : b;                                                           \
        }                                                                                             \
        T k = OFF ? ka + kb * o : ka;                                                                 \
        dir[i] = d;                                                                                   \
        p[i] = th + k * d;                                                                            \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* SGD. momentum: 0 plain (buf unused), 1 heavy ball, 2 Nesterov; first: buf <- g (torch's first step) \
 * theta <- theta + (ka + kb*off)*d; dir <- d. */                                                     \
CAMHD_CLONES void camhd_sgd_##SFX(T *p, const T *g, T *dir, T *off, T *buf, int64_t n,                \
                     int do_alpha, double c, double olo, double ohi, double ka, double kb,            \
                     double wd, int momentum, int first, double mu, double damp) {                    \
    int nt = camhd_threads(n); (void)nt;                                                              \
    int OFF = off != 0, UPD = off != 0 && do_alpha, L2 = wd != 0.0;                                   \
    int MOM = momentum < 0 ? 0 : (momentum > 2 ? 2 : momentum), FIRST = first != 0;                   \
    double dm = 1.0 - damp;                                                                           \
    int code = OFF | UPD << 1 | L2 << 2 | FIRST << 3 | MOM << 4;                                      \
    _Pragma("omp parallel num_threads(nt)")                                                           \
    {                                                                                                 \
        int64_t lo, hi;                                                                               \
        camhd_slice(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);                        \
        switch (code) {                                                                               \
        CAMHD_SGD_CASES(SFX)                                                                          \
        }                                                                                             \
    }                                                                                                 \
}

#define sqrtf32 sqrtf
#define sqrtf64 sqrt

/* every flag combination as a case with constant flags (OFF=0 implies UPD=0) */
#define CAMHD_ADAM_CASE(SFX, OFF, UPD, DEC, AMS, L2)                                                  \
    case (OFF | UPD << 1 | DEC << 2 | AMS << 3 | L2 << 4):                                            \
        adam_loop_##SFX(p, g, dir, off, m, v, vmax, lo, hi, OFF, UPD, DEC, AMS, L2, c, olo, ohi, ka, kb, \
                        da, db, dd, wd, w1, b2, w2, shift); break;
#define CAMHD_ADAM_CASES_OFF(SFX, DEC, AMS, L2)                                                       \
    CAMHD_ADAM_CASE(SFX, 0, 0, DEC, AMS, L2) CAMHD_ADAM_CASE(SFX, 1, 0, DEC, AMS, L2)                 \
    CAMHD_ADAM_CASE(SFX, 1, 1, DEC, AMS, L2)
#define CAMHD_ADAM_CASES(SFX)                                                                         \
    CAMHD_ADAM_CASES_OFF(SFX, 0, 0, 0) CAMHD_ADAM_CASES_OFF(SFX, 1, 0, 0)                             \
    CAMHD_ADAM_CASES_OFF(SFX, 0, 1, 0) CAMHD_ADAM_CASES_OFF(SFX, 1, 1, 0)                             \
    CAMHD_ADAM_CASES_OFF(SFX, 0, 0, 1) CAMHD_ADAM_CASES_OFF(SFX, 1, 0, 1)                             \
    CAMHD_ADAM_CASES_OFF(SFX, 0, 1, 1) CAMHD_ADAM_CASES_OFF(SFX, 1, 1, 1)

#define CAMHD_SGD_CASE(SFX, OFF, UPD, L2, FIRST, MOM)                                                 \
    case (OFF | UPD << 1 | L2 << 2 | FIRST << 3 | MOM << 4):                                          \
        sgd_loop_##SFX(p, g, dir, off, buf, lo, hi, OFF, UPD, MOM, FIRST, L2, c, olo, ohi, ka, kb,     \
                       wd, mu, dm); break;
#define CAMHD_SGD_CASES_OFF(SFX, L2, FIRST, MOM)                                                      \
    CAMHD_SGD_CASE(SFX, 0, 0, L2, FIRST, MOM) CAMHD_SGD_CASE(SFX, 1, 0, L2, FIRST, MOM)               \
    CAMHD_SGD_CASE(SFX, 1, 1, L2, FIRST, MOM)
#define CAMHD_SGD_CASES_MOM(SFX, L2, MOM)                                                             \
    CAMHD_SGD_CASES_OFF(SFX, L2, 0, MOM) CAMHD_SGD_CASES_OFF(SFX, L2, 1, MOM)
#define CAMHD_SGD_CASES(SFX)                                                                          \
    CAMHD_SGD_CASES_MOM(SFX, 0, 0) CAMHD_SGD_CASES_MOM(SFX, 1, 0) CAMHD_SGD_CASES_MOM(SFX, 0, 1)      \
    CAMHD_SGD_CASES_MOM(SFX, 1, 1) CAMHD_SGD_CASES_MOM(SFX, 0, 2) CAMHD_SGD_CASES_MOM(SFX, 1, 2)

CAMHD_DEFINE(float, f32)
CAMHD_DEFINE(double, f64)
