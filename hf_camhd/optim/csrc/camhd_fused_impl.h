/* The kernels for one element type: included by camhd_fused.c with T, SFX(name) and SQRT defined. */

/* The previous direction of element k, by where it comes from (DRV, a constant in every loop):
 *   0  stored in dir[k];
 *   1  rebuilt as Adam's quotient m[k] / (sqrt(v[k]) + sp) from the moments before this step's update (sp: the
 *      shift of the previous step; v is max_exp_avg_sq with amsgrad): nothing is stored;
 *   2  none (no previous step): 0;
 *   3  SGD with heavy-ball momentum: the buffer buf[k] before this step's update. */
#define CAMHD_OLD_DIR(k) (DRV == 0 ? dir[k] : DRV == 1 ? mq[k] / (SQRT(vq[k]) + sp) : DRV == 3 ? buf[k] : (T)0)

/* pass-1 sums over [lo, hi) in a fixed order that still vectorises (constant flags: one loop per combination):
 * s[0] = sum g*dir, s[1] = sum off*g*dir (OFF), s[2] = sum g*g and s[3] = sum dir*dir (NORMS); dir by DRV
 * (0, 1 or 2; an SGD buffer comes in as dir) */
INLINE void SFX(hsum_loop)(const T *restrict g, const T *restrict dir, const T *restrict off, const T *restrict mq,
                           const T *restrict vq, T sp, int64_t lo, int64_t hi, const int OFF, const int NORMS,
                           const int DRV, double *s) {
    const T *buf = 0;
    double a[CAMHD_LANES] = {0}, b[CAMHD_LANES] = {0}, c[CAMHD_LANES] = {0}, d[CAMHD_LANES] = {0};
    int64_t i = lo, end = lo + (hi - lo) / CAMHD_LANES * CAMHD_LANES;
    (void)buf;
    for (; i < end; i += CAMHD_LANES)
        for (int j = 0; j < CAMHD_LANES; j++) {
            double gv = (double)g[i + j], dv = (double)CAMHD_OLD_DIR(i + j), h = gv * dv;
            a[j] += h;
            if (OFF) b[j] += (double)off[i + j] * h;
            if (NORMS) { c[j] += gv * gv; d[j] += dv * dv; }
        }
    for (; i < hi; i++) {
        double gv = (double)g[i], dv = (double)CAMHD_OLD_DIR(i), h = gv * dv;
        a[0] += h;
        if (OFF) b[0] += (double)off[i] * h;
        if (NORMS) { c[0] += gv * gv; d[0] += dv * dv; }
    }
    s[0] = s[1] = s[2] = s[3] = 0.0;
    for (int j = 0; j < CAMHD_LANES; j++) { s[0] += a[j]; s[1] += b[j]; s[2] += c[j]; s[3] += d[j]; }
}

INLINE void SFX(hsum_range)(const T *g, const T *dir, const T *off, const T *mq, const T *vq, T sp, int64_t lo,
                            int64_t hi, int norms, double *s) {
    int drv = dir ? 0 : (mq ? 1 : 2);
    switch ((off != 0) | (norms != 0) << 1 | drv << 2) {
    HSUM_CASES
    }
}

/* the parameter-level alpha offset o = alpha - a0 of element i: as stored (UPD 0), or updated and clamped —
 * additive (UPD 1): o + c*g*dir; normalized (UPD 2): alpha (1 - c*sign(g*dir)), i.e. o - c*sign(g*dir)*(a0 + o),
 * with sign(g*dir) = sign(g)*sign(dir) (exact: no product to underflow) */
INLINE T SFX(alpha_off)(T *restrict off, T gi, T di, int64_t i, const int OFF, const int UPD, T c, T lo, T hi,
                        T a0) {
    if (!OFF) return (T)0;
    T o = off[i];
    if (UPD) {
        if (UPD == 1) {
            o = o + c * (gi * di);
        } else {
            T sg = (T)(((gi > (T)0) - (gi < (T)0)) * ((di > (T)0) - (di < (T)0)));
            o = o - c * sg * (a0 + o);
        }
        o = o < lo ? lo : o;
        o = o > hi ? hi : o;
        off[i] = o;
    }
    return o;
}

/* what alpha_off needs of the previous direction: its value, or for the normalized rule (UPD 2) only its sign —
 * for Adam's rebuilt quotient (DRV 1) that of m (the denominator is positive), with no square root or division */
#define CAMHD_OLD_DIR_FOR_ALPHA(k) (UPD == 2 && DRV == 1 ? mq[k] : CAMHD_OLD_DIR(k))

INLINE void SFX(adam_loop)(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,
                           T *restrict m, T *restrict v, T *restrict vmax, int64_t lo, int64_t hi,
                           const int OFF, const int UPD, const int DEC, const int AMS, const int L2, const int DRV,
                           T c, T olo, T ohi, T oa0, T ka, T kb, T da, T db, T dd, T wd, T w1, T b2, T w2, T shift,
                           T sp) {
    const T *mq = m, *vq = AMS ? vmax : v, *buf = 0;
    (void)buf;
    for (int64_t i = lo; i < hi; i++) {
        T gi = g[i], th = p[i];
        T o = SFX(alpha_off)(off, gi, CAMHD_OLD_DIR_FOR_ALPHA(i), i, OFF, UPD, c, olo, ohi, oa0);
        T gg = L2 ? gi + wd * th : gi;
        T mi = m[i] + w1 * (gg - m[i]);
        T vi = b2 * v[i] + w2 * gg * gg;
        m[i] = mi;
        v[i] = vi;
        if (AMS) {
            T mx = vmax[i];
            vi = vi > mx ? vi : mx;
            vmax[i] = vi;
        }
        T q = mi / (SQRT(vi) + shift);
        T k = OFF ? ka + kb * o : ka;
        if (DEC) {
            T kd = OFF ? da + db * o : da;
            if (DRV == 0) dir[i] = q + dd * th;
            p[i] = th * (kd + (T)1) + k * q;
        } else {
            if (DRV == 0) dir[i] = q;
            p[i] = th + k * q;
        }
    }
}

INLINE void SFX(adam_range)(T *p, const T *g, T *dir, T *off, T *m, T *v, T *vmax, int64_t lo, int64_t hi,
                            int code, T c, T olo, T ohi, T oa0, T ka, T kb, T da, T db, T dd,
                            T wd, T w1, T b2, T w2, T shift, T sp) {
    switch (code) { ADAM_CASES }
}

INLINE void SFX(sgd_loop)(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,
                          T *restrict buf, int64_t lo, int64_t hi,
                          const int OFF, const int UPD, const int MOM, const int FIRST, const int L2, const int DRV,
                          T c, T olo, T ohi, T oa0, T ka, T kb, T wd, T mu, T dm) {
    const T *mq = 0, *vq = 0;
    T sp = 0;
    (void)mq; (void)vq; (void)sp;
    for (int64_t i = lo; i < hi; i++) {
        T gi = g[i], th = p[i];
        T o = SFX(alpha_off)(off, gi, CAMHD_OLD_DIR_FOR_ALPHA(i), i, OFF, UPD, c, olo, ohi, oa0);
        T gg = L2 ? gi + wd * th : gi;
        T d = gg;
        if (MOM) {
            T b = FIRST ? gg : buf[i] * mu + dm * gg;
            buf[i] = b;
            d = MOM == 2 ? gg + mu * b : b;
        }
        T k = OFF ? ka + kb * o : ka;
        if (DRV == 0) dir[i] = d;
        p[i] = th + k * d;
    }
}

INLINE void SFX(sgd_range)(T *p, const T *g, T *dir, T *off, T *buf, int64_t lo, int64_t hi, int code,
                           T c, T olo, T ohi, T oa0, T ka, T kb, T wd, T mu, T dm) {
    switch (code) { SGD_CASES }
}

/* ---------------------------------------------------------------------------------------------------------
 * Trees without a parameter level take two other passes, which move less memory than pass 1 + pass 2:
 *   pass A (per rule): the sums of pass 1, read from g and the previous direction just before it is
 *          overwritten, and the base rule's state update and the new direction in the same loop;
 *   pass B (every rule): theta <- theta + K * dir, once the hyper-update has given K.
 * ------------------------------------------------------------------------------------------------------ */

/* the pass-1 sums of element k (lane j): g*dir_old, and g*g, dir_old*dir_old when NORMS */
#define CAMHD_A_SUMS(k, j)                                                                                \
    double gv_ = (double)g[k], dv_ = (double)CAMHD_OLD_DIR(k);                                           \
    a[j] += gv_ * dv_;                                                                                   \
    if (NORMS) { c[j] += gv_ * gv_; d[j] += dv_ * dv_; }

/* pass A's loop over [lo, hi): BODY(k, j) on CAMHD_LANES interleaved partial sums a, c, d (lane j), then the
   tail on lane 0, then the lanes added in lane order into s (the order is fixed by lo and hi alone) */
#define CAMHD_A_LANES(BODY)                                                                              \
    double a[CAMHD_LANES] = {0}, c[CAMHD_LANES] = {0}, d[CAMHD_LANES] = {0};                             \
    int64_t i = lo, end = lo + (hi - lo) / CAMHD_LANES * CAMHD_LANES;                                    \
    for (; i < end; i += CAMHD_LANES)                                                                    \
        for (int j = 0; j < CAMHD_LANES; j++) BODY(i + j, j)                                             \
    for (; i < hi; i++) BODY(i, 0)                                                                       \
    s[0] = s[1] = s[2] = s[3] = 0.0;                                                                     \
    for (int j = 0; j < CAMHD_LANES; j++) { s[0] += a[j]; s[2] += c[j]; s[3] += d[j]; }

#define CAMHD_ADAM_A_BODY(k, j)                                                                           \
    {                                                                                                    \
        CAMHD_A_SUMS(k, j)                                                                               \
        T gi = g[k], th = (DEC || L2) ? p[k] : (T)0;                                                     \
        T gg = L2 ? gi + wd * th : gi;                                                                   \
        T mi = m[k] + w1 * (gg - m[k]);                                                                  \
        T vi = b2 * v[k] + w2 * gg * gg;                                                                 \
        m[k] = mi;                                                                                       \
        v[k] = vi;                                                                                       \
        if (AMS) {                                                                                       \
            T mx = vmax[k];                                                                              \
            vi = vi > mx ? vi : mx;                                                                      \
            vmax[k] = vi;                                                                                \
        }                                                                                                \
        T q = mi / (SQRT(vi) + shift);                                                                   \
        if (DRV == 0) dir[k] = DEC ? q + dd * th : q;                                                    \
    }

/* pass A for Adam / AdamW over [lo, hi): s[0] = sum g*dir_old, s[2] = sum g*g, s[3] = sum dir_old^2 (NORMS) */
INLINE void SFX(adam_a_loop)(const T *restrict p, const T *restrict g, T *restrict dir, T *restrict m,
                             T *restrict v, T *restrict vmax, int64_t lo, int64_t hi, const int NORMS,
                             const int DEC, const int AMS, const int L2, const int DRV, T dd, T wd, T w1, T b2,
                             T w2, T shift, T sp, double *s) {
    const T *mq = m, *vq = AMS ? vmax : v, *buf = 0;
    (void)buf;
    CAMHD_A_LANES(CAMHD_ADAM_A_BODY)
}

INLINE void SFX(adam_a_range)(const T *p, const T *g, T *dir, T *m, T *v, T *vmax, int64_t lo, int64_t hi,
                              int code, T dd, T wd, T w1, T b2, T w2, T shift, T sp, double *s) {
    switch (code) { ADAM_A_CASES }
}

#define CAMHD_SGD_A_BODY(k, j)                                                                            \
    {                                                                                                    \
        CAMHD_A_SUMS(k, j)                                                                               \
        T gi = g[k];                                                                                     \
        T gg = L2 ? gi + wd * p[k] : gi;                                                                 \
        T dk = gg;                                                                                       \
        if (MOM) {                                                                                       \
            T b = FIRST ? gg : buf[k] * mu + dm * gg;                                                    \
            buf[k] = b;                                                                                  \
            dk = MOM == 2 ? gg + mu * b : b;                                                             \
        }                                                                                                \
        if (DRV == 0) dir[k] = dk;                                                                       \
    }

/* pass A for SGD (plain, heavy ball, Nesterov) over [lo, hi), sums as adam_a_loop */
INLINE void SFX(sgd_a_loop)(const T *restrict p, const T *restrict g, T *restrict dir, T *restrict buf,
                            int64_t lo, int64_t hi, const int NORMS, const int MOM, const int FIRST, const int L2,
                            const int DRV, T wd, T mu, T dm, double *s) {
    const T *mq = 0, *vq = 0;
    T sp = 0;
    (void)mq; (void)vq; (void)sp;
    CAMHD_A_LANES(CAMHD_SGD_A_BODY)
}

INLINE void SFX(sgd_a_range)(const T *p, const T *g, T *dir, T *buf, int64_t lo, int64_t hi, int code, T wd, T mu,
                             T dm, double *s) {
    switch (code) { SGD_A_CASES }
}

/* ---------------------------------------------------------------------------------------------------------
 * Every entry point takes a list of nt tensors (those of one param group and dtype, sizes[t] elements each)
 * and cuts them into chunks of about CAMHD_CHUNK elements (whole unit rows of row_lens[t] elements where
 * row_lens and row_lens[t] > 0) that the threads share: a model of many small tensors costs one call and one
 * parallel region, not one per tensor. Per-tensor numbers come as arrays indexed by t.
 * ------------------------------------------------------------------------------------------------------ */

/* the sums of the passes that take them (pass 1, pass A), chunk by chunk: each chunk's sums go to its own slot
 * (per-row sums straight into rows[t], row-major (nrows, 4)) and are added per tensor in chunk order afterwards: the
 * results depend on the shapes alone, not on the number of threads or their timing. Then *u_scale[t] <-
 * u_value[t] (u_scale NULL: nothing). CALL sees t, lo, hi and s (double[4]). */
#define CAMHD_RUN_SUMS_MANY(CALL)                                                                        \
    int64_t nc = 0;                                                                                      \
    camhd_chunk *ch = camhd_chunks(nt, sizes, row_lens, &nc);                                            \
    double *part = (double *)calloc((size_t)(4 * nc + 4), sizeof(double));                               \
    if (!ch || !part) { free(ch); free(part); return -1; }                                               \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                                     \
    for (int64_t ci = 0; ci < nc; ci++) {                                                                \
        int t = ch[ci].t;                                                                                \
        int64_t rl = row_lens ? row_lens[t] : 0;                                                         \
        double *acc = &part[4 * ci];                                                                     \
        if (rl <= 0) {                                                                                   \
            int64_t lo = ch[ci].lo, hi = ch[ci].hi;                                                      \
            double *s = acc;                                                                             \
            CALL;                                                                                        \
        } else {                                                                                         \
            for (int64_t r = ch[ci].lo / rl; r < ch[ci].hi / rl; r++) {                                  \
                double s[4] = {0.0, 0.0, 0.0, 0.0};                                                      \
                int64_t lo = r * rl, hi = (r + 1) * rl;                                                  \
                CALL;                                                                                    \
                for (int k = 0; k < 4; k++) {                                                            \
                    rows[t][r * 4 + k] = s[k];                                                           \
                    acc[k] += s[k];                                                                      \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int64_t t = 0; t < nt; t++)                                                                     \
        for (int k = 0; k < 4; k++) out[4 * t + k] = 0.0;                                                \
    for (int64_t ci = 0; ci < nc; ci++)                                                                  \
        for (int k = 0; k < 4; k++) out[4 * ch[ci].t + k] += part[4 * ci + k];                           \
    for (int64_t t = 0; t < nt; t++)                                                                     \
        if (u_scale && u_scale[t]) *u_scale[t] = (T)u_value[t];                                          \
    free(ch);                                                                                            \
    free(part);                                                                                          \
    return 0;

/* the element-wise passes that move theta (pass 2, pass B), chunk by chunk; on row r of a tensor with krow[t]
 * (the unit level, row_lens[t] > 0) CALL's factor f is krow[t][r], else 1. Then *u_scale[t] <- u_value[t]. CALL
 * sees t, lo, hi and f. */
#define CAMHD_RUN_MOVE_MANY(CALL)                                                                        \
    int64_t nc = 0;                                                                                      \
    camhd_chunk *ch = camhd_chunks(nt, sizes, row_lens, &nc);                                            \
    if (!ch) return -1;                                                                                  \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                                     \
    for (int64_t ci = 0; ci < nc; ci++) {                                                                \
        int t = ch[ci].t;                                                                                \
        int64_t rl = row_lens ? row_lens[t] : 0;                                                         \
        const double *kr = krow && rl > 0 ? krow[t] : 0;                                                 \
        for (int64_t lo = ch[ci].lo; lo < ch[ci].hi;) {                                                  \
            int64_t hi = kr ? lo + rl : ch[ci].hi;                                                       \
            double f = kr ? kr[lo / rl] : 1.0;                                                           \
            CALL;                                                                                        \
            lo = hi;                                                                                     \
        }                                                                                                \
    }                                                                                                    \
    for (int64_t t = 0; t < nt; t++)                                                                     \
        if (u_scale && u_scale[t]) *u_scale[t] = (T)u_value[t];                                          \
    free(ch);                                                                                            \
    return 0;

/* pass 1 (trees with a parameter level): out[4t + k] = sum g*dir_old, sum off*g*dir_old (off NULL or off[t] NULL:
 * 0), and when norms sum g*g, sum dir_old^2 (else 0), of tensor t; rows[t] (row_lens[t] > 0): the same per unit along
 * dim 0 (row-major, 4 per unit). dir_old: dir[t], else (dir or dir[t] NULL) Adam's m[t] / (sqrt(v[t]) + sp[t]) where
 * m is given, else 0. Returns 0, or -1 when out of memory. */
CAMHD_CLONES int SFX(camhd_hsum_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *g,
                                      T *const *dir, T *const *off, T *const *m, T *const *v, const double *sp,
                                      double *const *rows, int norms, double *out) {
    T *const *u_scale = 0;
    const double *u_value = 0;
    (void)u_value;
    CAMHD_RUN_SUMS_MANY(SFX(hsum_range)(g[t], dir ? dir[t] : 0, off ? off[t] : 0, m ? m[t] : 0, v ? v[t] : 0,
                                        (T)(sp ? sp[t] : 0.0), lo, hi, norms, s))
}

/* pass 2 for Adam / AdamW: per tensor t, the parameter-level offsets off[t] (nullable) updated from g and dir_old
 * when do_alpha[t] (1: additive, 2: normalized; see alpha_off, with c[t], the bounds olo[t], ohi[t] and a0 =
 * alpha_0), the moments (L2 decay wd enters g), q = m / (sqrt(v) + shift[t]), then
 * theta <- theta*(1 + kd + db[t]*off) [decoupled] + (k + kb[t]*off)*q with k = ka[t]*f, kd = da[t]*f (f: the
 * unit's factor, see CAMHD_RUN_MOVE_MANY), and dir <- q + dd[t]*theta_old [decoupled] or q. vmax: NULL, or an
 * array (amsgrad). dir (the array, or dir[t]) NULL: nothing is stored, dir_old is rebuilt as
 * m / (sqrt(v) + prev_shift[t]) before the update (see CAMHD_OLD_DIR). *u_scale[t] <- u_value[t] (the stored
 * direction's factor: u = u_value * dir). Returns 0, or -1 when out of memory. */
CAMHD_CLONES int SFX(camhd_adam_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                      T *const *g, T *const *dir, T *const *off, T *const *m, T *const *v,
                                      T *const *vmax, const double *const *krow, const int32_t *do_alpha,
                                      const double *c, const double *olo, const double *ohi, double a0,
                                      const double *ka, const double *kb, int decoupled, const double *da,
                                      const double *db, const double *dd, double wd, double w1, double b2,
                                      double w2, const double *shift, const double *prev_shift, T *const *u_scale,
                                      const double *u_value) {
    int code = (decoupled != 0) << 3 | (vmax != 0) << 4 | (wd != 0.0) << 5;
    CAMHD_RUN_MOVE_MANY(SFX(adam_range)(p[t], g[t], dir ? dir[t] : 0, off ? off[t] : 0, m[t], v[t],
                                        vmax ? vmax[t] : 0, lo, hi,
                                        code | camhd_off_code(off ? off[t] : 0, do_alpha[t]) |
                                            (dir && dir[t] ? 0 : 1) << 6,
                                        (T)c[t], (T)olo[t], (T)ohi[t], (T)a0, (T)(ka[t] * f), (T)kb[t],
                                        (T)(da[t] * f), (T)db[t], (T)dd[t], (T)wd, (T)w1, (T)b2, (T)w2,
                                        (T)shift[t], (T)prev_shift[t]))
}

/* pass 2 for SGD (momentum: 0 plain, buf unused; 1 heavy ball; 2 Nesterov; first[t]: buf <- g, torch's first
 * step): off, do_alpha, c, bounds, krow, ka, kb as camhd_adam_many; theta <- theta + (k + kb[t]*off)*d and
 * dir <- d. dir (the array, or dir[t]) NULL, heavy ball only: nothing is stored, dir_old is the buffer before the
 * update (0 on the first step). */
CAMHD_CLONES int SFX(camhd_sgd_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                     T *const *g, T *const *dir, T *const *off, T *const *buf,
                                     const int32_t *first, const double *const *krow, const int32_t *do_alpha,
                                     const double *c, const double *olo, const double *ohi, double a0,
                                     const double *ka, const double *kb, double wd, int momentum, double mu,
                                     double damp, T *const *u_scale, const double *u_value) {
    int MOM = momentum < 0 ? 0 : (momentum > 2 ? 2 : momentum);
    int code = (wd != 0.0) << 3 | MOM << 5;
    T dm = (T)(1.0 - damp);
    CAMHD_RUN_MOVE_MANY(SFX(sgd_range)(p[t], g[t], dir ? dir[t] : 0, off ? off[t] : 0, buf ? buf[t] : 0, lo, hi,
                                       code | camhd_off_code(off ? off[t] : 0, do_alpha[t]) |
                                           (first && first[t]) << 4 |
                                           (dir && dir[t] ? 0 : (first && first[t]) || MOM != 1 ? 1 : 2) << 7,
                                       (T)c[t], (T)olo[t], (T)ohi[t], (T)a0, (T)(ka[t] * f), (T)kb[t], (T)wd,
                                       (T)mu, dm))
}

/* Adam / AdamW pass A (trees without a parameter level): out[4t + k] = sum g*dir_old (k = 0), sum g*g and
 * sum dir_old^2 (k = 2, 3, when norms) of tensor t, then its moments and dir <- q = m / (sqrt(v) + shift[t]); L2
 * decay wd enters g (p is read only for it); rows[t] (row_lens[t] > 0): the same sums per unit along dim 0
 * (row-major, 4 per unit); *u_scale[t] <- u_value[t]. vmax: NULL, or an array (amsgrad). dir (the array, or dir[t])
 * NULL: nothing is stored, dir_old is rebuilt as m / (sqrt(v) + prev_shift[t]) before the update. Returns 0, or -1
 * when out of memory. */
CAMHD_CLONES int SFX(camhd_adam_a_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                        T *const *g, T *const *dir, T *const *m, T *const *v, T *const *vmax,
                                        double *const *rows, int norms, double *out, double wd, double w1, double b2,
                                        double w2, const double *shift, const double *prev_shift,
                                        T *const *u_scale, const double *u_value) {
    int code = (norms != 0) | (vmax != 0) << 2 | (wd != 0.0) << 3;
    CAMHD_RUN_SUMS_MANY(SFX(adam_a_range)(p[t], g[t], dir ? dir[t] : 0, m[t], v[t], vmax ? vmax[t] : 0, lo, hi,
                                          code | (dir && dir[t] ? 0 : 1) << 4, 0, wd, w1, b2, w2, (T)shift[t],
                                          (T)(prev_shift ? prev_shift[t] : 1.0), s))
}

/* SGD pass A (momentum: 0 plain, 1 heavy ball, 2 Nesterov; first[t]: buf <- g, torch's first step), sums as
 * camhd_adam_a_many. dir (the array, or dir[t]) NULL, heavy ball only: nothing is stored, dir_old is the buffer
 * before the update (0 on the first step). */
CAMHD_CLONES int SFX(camhd_sgd_a_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                       T *const *g, T *const *dir, T *const *buf, const int32_t *first,
                                       double *const *rows, int norms, double *out, double wd, int momentum,
                                       double mu, double damp, T *const *u_scale, const double *u_value) {
    int MOM = momentum < 0 ? 0 : (momentum > 2 ? 2 : momentum);
    int code = (norms != 0) | (wd != 0.0) << 1 | MOM << 3;
    T dm = (T)(1.0 - damp);
    CAMHD_RUN_SUMS_MANY(SFX(sgd_a_range)(p[t], g[t], dir ? dir[t] : 0, buf ? buf[t] : 0, lo, hi,
                                         code | (first && first[t]) << 2 |
                                             (dir && dir[t] ? 0 : (first && first[t]) || MOM != 1 ? 1 : 2) << 5,
                                         wd, mu, dm, s))
}

/* pass B (trees without a parameter level): theta <- theta * (1 + kd) + k * dir with k = ka[t]*f, kd = da[t]*f
 * (f: the unit's factor, see CAMHD_RUN_MOVE_MANY); with decoupled decay (dd[t] != 0) the stored direction becomes
 * dir + dd[t] * theta_old (AdamW: the rate scales q + (lambda / c) theta, applied multiplicatively, rounded as
 * torch's AdamW). dir (the array, or dir[t]) NULL: the direction is Adam's q = m[t] / (sqrt(v[t]) + shift[t]), not
 * stored (dd[t] must be 0). */
INLINE void SFX(apply_range)(T *restrict pp, T *restrict qq, const T *restrict mm, const T *restrict vv, T sh,
                             int64_t lo, int64_t hi, T k, T kd, int dec, T ddc) {
    if (!qq) {
        for (int64_t j = lo; j < hi; j++) pp[j] = pp[j] + k * (mm[j] / (SQRT(vv[j]) + sh));
    } else if (dec) {
        for (int64_t j = lo; j < hi; j++) {
            T th = pp[j], q = qq[j];
            pp[j] = th * (kd + (T)1) + k * q;
            qq[j] = q + ddc * th;
        }
    } else {
        for (int64_t j = lo; j < hi; j++) pp[j] = pp[j] + k * qq[j];
    }
}

CAMHD_CLONES int SFX(camhd_apply_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                       T *const *dir, T *const *m, T *const *v, const double *shift,
                                       const double *const *krow, const double *ka, const double *da,
                                       const double *dd) {
    T *const *u_scale = 0;
    const double *u_value = 0;
    (void)u_value;
    CAMHD_RUN_MOVE_MANY(SFX(apply_range)(p[t], dir ? dir[t] : 0, m ? m[t] : 0, v ? v[t] : 0,
                                         (T)(shift ? shift[t] : 0.0), lo, hi, (T)(ka[t] * f), (T)(da[t] * f),
                                         dd[t] != 0.0, (T)dd[t]))
}

#undef CAMHD_RUN_SUMS_MANY
#undef CAMHD_OLD_DIR_FOR_ALPHA
#undef CAMHD_RUN_MOVE_MANY
