/* The kernels for one element type: included by camhd_fused.c with T, SFX(name) and SQRT defined. */

/* The previous direction of element k, by where it comes from (DRV, a constant in every loop):
 *   0  stored in dir[k];
 *   1  rebuilt as Adam's quotient m[k] / (sqrt(v[k]) + sp) from the moments before this step's update (sp: the
 *      shift of the previous step; v is max_exp_avg_sq with amsgrad): nothing is stored;
 *   2  none (no previous step): 0;
 *   3  SGD with heavy-ball momentum: the buffer buf[k] before this step's update. */
#define CAMHD_OLD_DIR(k) (DRV == 0 ? dir[k] : DRV == 1 ? mq[k] / (SQRT(vq[k]) + sp) : DRV == 3 ? buf[k] : (T)0)

/* the parameter-level update of the alpha offset o = alpha - a0 of element i, clamped to [lo, hi]: additive (UPD 1):
 * o + c*h with h = g*dir_old (hq, in T); normalized (UPD 2): alpha (1 - c*sign(g*dir_old)), i.e.
 * o - c*sign(g*dir_old)*(a0 + o), with sign(g*dir_old) = sign(g)*sign(di) (exact: no product to underflow; di: dir_old
 * or, for Adam's rebuilt quotient, m, whose sign it has). Element-wise: where hq is not finite the offset stays. */
INLINE void SFX(alpha_off)(T *restrict off, T gi, T di, T hq, int64_t i, const int UPD, T c, T lo, T hi, T a0) {
    T o0 = off[i], o;
    if (UPD == 1) {
        o = o0 + c * hq;
    } else {
        T sg = (T)(((gi > (T)0) - (gi < (T)0)) * ((di > (T)0) - (di < (T)0)));
        o = o0 - c * sg * (a0 + o0);
    }
    o = o < lo ? lo : o;
    o = o > hi ? hi : o;
    off[i] = hq - hq == (T)0 ? o : o0; /* x - x is 0 exactly when x is finite */
}

/* ---------------------------------------------------------------------------------------------------------
 * Every step takes two passes over memory:
 *   pass A (per rule): the sums, read from g and the previous direction just before it is overwritten; with a
 *          parameter level (OFF) also sum off*g*dir_old and the offsets' element-wise update (whose
 *          coefficient is known before the step: gamma_param of step t-1); then the base rule's state update
 *          and the new direction, all in one loop;
 *   pass B (every rule): theta <- theta + K * dir, once the hyper-update has given K (K = ka + kb*off with a
 *          parameter level).
 * With OFF the offsets' rule follows NORMS: the normalized rule (the one that needs the norms), else additive.
 * ------------------------------------------------------------------------------------------------------ */

/* the sums of element k (lane j): g*dir_old, off*g*dir_old (OFF, the offset before its update), and g*g,
 * dir_old*dir_old when NORMS, each product rounded to T; then (OFF) the offset's update (see alpha_off; for Adam's
 * rebuilt quotient the normalized rule takes the sign of m) */
#define CAMHD_A_SUMS(k, j)                                                                                \
    T dq_ = CAMHD_OLD_DIR(k);                                                                            \
    T gq_ = g[k], h_ = gq_ * dq_;                                                                        \
    a[j] += h_;                                                                                          \
    if (OFF) b[j] += off[k] * h_;                                                                        \
    if (NORMS) { c[j] += gq_ * gq_; d[j] += dq_ * dq_; }                                                 \
    if (OFF) SFX(alpha_off)(off, g[k], NORMS && DRV == 1 ? mq[k] : dq_, h_, k, NORMS ? 2 : 1, oc, olo,   \
                            ohi, oa0);

/* pass A's loop over [lo, hi) in blocks of CAMHD_BLOCK * CAMHD_LANES elements: within a block BODY(k, j) adds into
 * CAMHD_LANES interleaved partial sums a, b, c, d in T (lane j; the block's tail on lane 0), then the block's
 * partials go into float64 lane sums; at the end the lanes are added in lane order into s. The order is fixed by
 * lo and hi alone. (Partials in T: half the vector work of summing in float64 throughout, which kept pass A with a
 * parameter level below the other passes' GB/s on AVX2; in float32 a block's partial of 32 terms per lane is off by
 * at most ~31 * 2^-24, about 2e-6, of the sum of its terms' magnitudes.) */
#define CAMHD_BLOCK 32
#define CAMHD_A_LANES(BODY)                                                                              \
    double sa_[CAMHD_LANES] = {0}, sb_[CAMHD_LANES] = {0}, sc_[CAMHD_LANES] = {0}, sd_[CAMHD_LANES] = {0}; \
    int64_t i = lo, end = lo + (hi - lo) / CAMHD_LANES * CAMHD_LANES;                                    \
    while (i < hi) {                                                                                     \
        T a[CAMHD_LANES] = {0}, b[CAMHD_LANES] = {0}, c[CAMHD_LANES] = {0}, d[CAMHD_LANES] = {0};        \
        if (i < end) {                                                                                   \
            int64_t bend = end - i > CAMHD_LANES * CAMHD_BLOCK ? i + CAMHD_LANES * CAMHD_BLOCK : end;    \
            for (; i < bend; i += CAMHD_LANES)                                                           \
                for (int j = 0; j < CAMHD_LANES; j++) BODY(i + j, j)                                     \
        } else {                                                                                         \
            for (; i < hi; i++) BODY(i, 0)                                                               \
        }                                                                                                \
        for (int j = 0; j < CAMHD_LANES; j++) {                                                          \
            sa_[j] += (double)a[j]; sb_[j] += (double)b[j]; sc_[j] += (double)c[j]; sd_[j] += (double)d[j];  \
        }                                                                                                \
    }                                                                                                    \
    s[0] = s[1] = s[2] = s[3] = 0.0;                                                                     \
    for (int j = 0; j < CAMHD_LANES; j++) { s[0] += sa_[j]; s[1] += sb_[j]; s[2] += sc_[j]; s[3] += sd_[j]; }

#define CAMHD_ADAM_A_BODY(k, j)                                                                           \
    {                                                                                                    \
        CAMHD_A_SUMS(k, j)                                                                               \
        T gi = g[k], th = L2 ? p[k] : (T)0;                                                              \
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
        if (DRV == 0) dir[k] = q;                                                                        \
    }

/* the offsets' arguments of pass A: off, the coefficient oc, the bounds olo, ohi and a0 = alpha_0 */
#define CAMHD_OFF_PARAMS T *restrict off, T oc, T olo, T ohi, T oa0

/* pass A for Adam / AdamW over [lo, hi): s = [sum g*dir_old, sum off*g*dir_old (OFF), sum g*g, sum dir_old^2 (NORMS)] */
INLINE void SFX(adam_a_loop)(const T *restrict p, const T *restrict g, T *restrict dir, T *restrict m,
                             T *restrict v, T *restrict vmax, CAMHD_OFF_PARAMS, int64_t lo, int64_t hi,
                             const int NORMS, const int AMS, const int L2, const int DRV, const int OFF, T wd,
                             T w1, T b2, T w2, T shift, T sp, double *s) {
    const T *mq = m, *vq = AMS ? vmax : v, *buf = 0;
    (void)buf;
    CAMHD_A_LANES(CAMHD_ADAM_A_BODY)
}

INLINE void SFX(adam_a_range)(const T *p, const T *g, T *dir, T *m, T *v, T *vmax, CAMHD_OFF_PARAMS, int64_t lo,
                              int64_t hi, int code, T wd, T w1, T b2, T w2, T shift, T sp, double *s) {
    switch (code) { ADAM_A_CASES }
}

#define CAMHD_SGD_A_BODY(k, j)                                                                            \
    {                                                                                                    \
        CAMHD_A_SUMS(k, j)                                                                               \
        T gi = g[k];                                                                                     \
        T gg = L2 ? gi + wd * p[k] : gi;                                                                 \
        T dk = gg;                                                                                       \
        if (MOM) {                                                                                       \
            T bk = FIRST ? gg : buf[k] * mu + dm * gg;                                                   \
            buf[k] = bk;                                                                                 \
            dk = MOM == 2 ? gg + mu * bk : bk;                                                           \
        }                                                                                                \
        if (DRV == 0) dir[k] = dk;                                                                       \
    }

/* pass A for SGD (plain, heavy ball, Nesterov) over [lo, hi), sums as adam_a_loop */
INLINE void SFX(sgd_a_loop)(const T *restrict p, const T *restrict g, T *restrict dir, T *restrict buf,
                            CAMHD_OFF_PARAMS, int64_t lo, int64_t hi, const int NORMS, const int MOM, const int FIRST,
                            const int L2, const int DRV, const int OFF, T wd, T mu, T dm, double *s) {
    const T *mq = 0, *vq = 0;
    T sp = 0;
    (void)mq; (void)vq; (void)sp;
    CAMHD_A_LANES(CAMHD_SGD_A_BODY)
}

INLINE void SFX(sgd_a_range)(const T *p, const T *g, T *dir, T *buf, CAMHD_OFF_PARAMS, int64_t lo, int64_t hi,
                             int code, T wd, T mu, T dm, double *s) {
    switch (code) { SGD_A_CASES }
}

/* ---------------------------------------------------------------------------------------------------------
 * Every entry point takes a list of nt tensors (those of one param group and dtype, sizes[t] elements each)
 * and cuts them into chunks of about CAMHD_CHUNK elements (whole unit rows of row_lens[t] elements where
 * row_lens and row_lens[t] > 0) that the threads share: a model of many small tensors costs one call and one
 * parallel region, not one per tensor. Per-tensor numbers come as arrays indexed by t.
 * ------------------------------------------------------------------------------------------------------ */

/* the sums of pass A, chunk by chunk: each chunk's sums go to its own slot
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

/* pass B, which moves theta, chunk by chunk; on row r of a tensor with krow[t]
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

/* the offsets' per-tensor arguments of the entry points: off[t] (off or off[t] NULL: no parameter level), the
 * coefficient oc[t] (additive: o + oc*h; normalized: alpha (1 - oc*sign(h)); 0: the offsets stay), the bounds olo[t],
 * ohi[t] of o and a0 = alpha_0 */
#define CAMHD_OFF_ARGS T *const *off, const double *oc, const double *olo, const double *ohi, double a0
#define CAMHD_OFF_AT(t) off && off[t] ? off[t] : 0, (T)(oc ? oc[t] : 0.0), (T)(olo ? olo[t] : 0.0), \
    (T)(ohi ? ohi[t] : 0.0), (T)a0
#define CAMHD_HAS_OFF(t) (off && off[t] ? 1 : 0)

/* Adam / AdamW pass A: out[4t + k] = sum g*dir_old, sum off*g*dir_old (k = 0, 1; 0 without offsets), sum g*g and
 * sum dir_old^2 (k = 2, 3, when norms) of tensor t, then (with offsets) the offsets' update, the moments and
 * dir <- q = m / (sqrt(v) + shift[t]); L2 decay wd enters g (p is read only for it); rows[t] (row_lens[t] > 0): the
 * same sums per unit along dim 0 (row-major, 4 per unit); *u_scale[t] <- u_value[t]. vmax: NULL, or an array
 * (amsgrad). dir (the array, or dir[t]) NULL: nothing is stored, dir_old is rebuilt as
 * m / (sqrt(v) + prev_shift[t]) before the update. Returns 0, or -1 when out of memory. */
CAMHD_CLONES int SFX(camhd_adam_a_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                        T *const *g, T *const *dir, T *const *m, T *const *v, T *const *vmax,
                                        CAMHD_OFF_ARGS, double *const *rows, int norms, double *out, double wd,
                                        double w1, double b2, double w2, const double *shift, const double *prev_shift,
                                        T *const *u_scale, const double *u_value) {
    int code = (norms != 0) | (vmax != 0) << 2 | (wd != 0.0) << 3;
    CAMHD_RUN_SUMS_MANY(SFX(adam_a_range)(p[t], g[t], dir ? dir[t] : 0, m[t], v[t], vmax ? vmax[t] : 0,
                                          CAMHD_OFF_AT(t), lo, hi,
                                          code | (dir && dir[t] ? 0 : 1) << 4 | CAMHD_HAS_OFF(t) << 5, wd, w1, b2,
                                          w2, (T)shift[t], (T)(prev_shift ? prev_shift[t] : 1.0), s))
}

/* SGD pass A (momentum: 0 plain, 1 heavy ball, 2 Nesterov; first[t]: buf <- g, torch's first step), sums and
 * offsets as camhd_adam_a_many. dir (the array, or dir[t]) NULL, heavy ball only: nothing is stored, dir_old is the
 * buffer before the update (0 on the first step). */
CAMHD_CLONES int SFX(camhd_sgd_a_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                       T *const *g, T *const *dir, T *const *buf, const int32_t *first,
                                       CAMHD_OFF_ARGS, double *const *rows, int norms, double *out, double wd,
                                       int momentum, double mu, double damp, T *const *u_scale,
                                       const double *u_value) {
    int MOM = momentum < 0 ? 0 : (momentum > 2 ? 2 : momentum);
    int code = (norms != 0) | (wd != 0.0) << 1 | MOM << 3;
    T dm = (T)(1.0 - damp);
    CAMHD_RUN_SUMS_MANY(SFX(sgd_a_range)(p[t], g[t], dir ? dir[t] : 0, buf ? buf[t] : 0, CAMHD_OFF_AT(t), lo, hi,
                                         code | (MOM && first && first[t]) << 2 |
                                             (dir && dir[t] ? 0 : (first && first[t]) || MOM != 1 ? 1 : 2) << 5 |
                                             CAMHD_HAS_OFF(t) << 7,
                                         wd, mu, dm, s))
}

/* pass B: theta <- theta * (1 + kd) + k * dir with k = ka[t]*f + kb[t]*off, kd = da[t]*f + db[t]*off (f: the unit's
 * factor, see CAMHD_RUN_MOVE_MANY; off: the parameter level's offset, where off[t] is given, else 0); with
 * decoupled decay (dd[t] != 0) the stored direction becomes dir + dd[t] * theta_old (AdamW: the rate scales
 * q + (lambda / c) theta, applied multiplicatively, rounded as torch's AdamW). dir (the array, or dir[t]) NULL: the
 * direction is Adam's q = m[t] / (sqrt(v[t]) + shift[t]), not stored (dd[t] must be 0). MODE: 0 that quotient,
 * 1 decoupled, 2 a stored direction. */
INLINE void SFX(apply_loop)(T *restrict pp, T *restrict qq, const T *restrict mm, const T *restrict vv,
                            const T *restrict off, T sh, int64_t lo, int64_t hi, T k, T kd, T kb, T db, T ddc,
                            const int MODE, const int OFF) {
    for (int64_t j = lo; j < hi; j++) {
        T o = OFF ? off[j] : (T)0;
        T kk = OFF ? k + kb * o : k;
        if (MODE == 0) {
            pp[j] = pp[j] + kk * (mm[j] / (SQRT(vv[j]) + sh));
        } else if (MODE == 1) {
            T th = pp[j], q = qq[j], kdd = OFF ? kd + db * o : kd;
            pp[j] = th * (kdd + (T)1) + kk * q;
            qq[j] = q + ddc * th;
        } else {
            pp[j] = pp[j] + kk * qq[j];
        }
    }
}

INLINE void SFX(apply_range)(T *pp, T *qq, const T *mm, const T *vv, const T *off, T sh, int64_t lo, int64_t hi, T k,
                             T kd, T kb, T db, int dec, T ddc) {
    int mode = !qq ? 0 : dec ? 1 : 2;
    switch (mode | (off != 0) << 2) {
    case 0: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 0, 0); break;
    case 1: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 1, 0); break;
    case 2: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 2, 0); break;
    case 4: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 0, 1); break;
    case 5: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 1, 1); break;
    default: SFX(apply_loop)(pp, qq, mm, vv, off, sh, lo, hi, k, kd, kb, db, ddc, 2, 1); break;
    }
}

/* pass B over the tensors; off (the array, or off[t]) NULL: no parameter level (kb, db unused, may be NULL) */
CAMHD_CLONES int SFX(camhd_apply_many)(int64_t nt, const int64_t *sizes, const int64_t *row_lens, T *const *p,
                                       T *const *dir, T *const *m, T *const *v, T *const *off, const double *shift,
                                       const double *const *krow, const double *ka, const double *da,
                                       const double *kb, const double *db, const double *dd) {
    T *const *u_scale = 0;
    const double *u_value = 0;
    (void)u_value;
    CAMHD_RUN_MOVE_MANY(SFX(apply_range)(p[t], dir ? dir[t] : 0, m ? m[t] : 0, v ? v[t] : 0, off ? off[t] : 0,
                                         (T)(shift ? shift[t] : 0.0), lo, hi, (T)(ka[t] * f), (T)(da[t] * f),
                                         (T)(kb ? kb[t] : 0.0), (T)(db ? db[t] : 0.0), dd[t] != 0.0, (T)dd[t]))
}

#undef CAMHD_RUN_SUMS_MANY
#undef CAMHD_RUN_MOVE_MANY
#undef CAMHD_OFF_PARAMS
#undef CAMHD_OFF_ARGS
#undef CAMHD_OFF_AT
#undef CAMHD_HAS_OFF
