/* The kernels for one element type: included by camhd_fused.c with T, SFX(name) and SQRT defined. */

/* sum of g*dir (s0) and of off*g*dir (s1) over [lo, hi), in a fixed order that still vectorises */
INLINE void SFX(hsum_range)(const T *restrict g, const T *restrict dir, const T *restrict off,
                            int64_t lo, int64_t hi, double *s0, double *s1) {
    double a[CAMHD_LANES] = {0}, b[CAMHD_LANES] = {0};
    int64_t i = lo, end = lo + (hi - lo) / CAMHD_LANES * CAMHD_LANES;
    if (off) {
        for (; i < end; i += CAMHD_LANES)
            for (int j = 0; j < CAMHD_LANES; j++) {
                double h = (double)g[i + j] * (double)dir[i + j];
                a[j] += h;
                b[j] += (double)off[i + j] * h;
            }
        for (; i < hi; i++) {
            double h = (double)g[i] * (double)dir[i];
            a[0] += h;
            b[0] += (double)off[i] * h;
        }
    } else {
        for (; i < end; i += CAMHD_LANES)
            for (int j = 0; j < CAMHD_LANES; j++) a[j] += (double)g[i + j] * (double)dir[i + j];
        for (; i < hi; i++) a[0] += (double)g[i] * (double)dir[i];
    }
    double sa = 0.0, sb = 0.0;
    for (int j = 0; j < CAMHD_LANES; j++) { sa += a[j]; sb += b[j]; }
    *s0 = sa;
    *s1 = sb;
}

/* pass 1 of one tensor: out[0] = sum g*dir, out[1] = sum off*g*dir (0 when off is NULL) */
CAMHD_CLONES void SFX(camhd_hsum)(const T *g, const T *dir, const T *off, int64_t n, double *out) {
    double part[2 * CAMHD_MAX_THREADS];
    int nt = camhd_threads(n), used = 1;
    (void)nt;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), k = omp_get_num_threads();
        int64_t lo, hi;
        if (t == 0) used = k;
        camhd_slice(n, t, k, &lo, &hi);
        SFX(hsum_range)(g, dir, off, lo, hi, &part[2 * t], &part[2 * t + 1]);
    }
    out[0] = 0.0;
    out[1] = 0.0;
    for (int t = 0; t < used; t++) {
        out[0] += part[2 * t];
        out[1] += part[2 * t + 1];
    }
}

/* pass 1 with the unit level (units along dim 0, n / row_len rows): rows[r] = sum of g*dir over row r,
 * rows[nrows + r] = sum of off*g*dir; out[0], out[1] = their totals, added in row order */
CAMHD_CLONES void SFX(camhd_hsum_rows)(const T *g, const T *dir, const T *off, int64_t n, int64_t row_len,
                                       double *rows, double *out) {
    int64_t nrows = row_len > 0 ? n / row_len : 0;
    int nt = camhd_threads(n);
    (void)nt;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < nrows; r++)
        SFX(hsum_range)(g, dir, off, r * row_len, (r + 1) * row_len, &rows[r], &rows[nrows + r]);
    out[0] = 0.0;
    out[1] = 0.0;
    for (int64_t r = 0; r < nrows; r++) {
        out[0] += rows[r];
        out[1] += rows[nrows + r];
    }
}

/* the parameter-level alpha offset of element i: updated (clamped) when UPD, else as stored */
INLINE T SFX(alpha_off)(T *restrict off, T gi, T di, int64_t i, const int OFF, const int UPD, T c, T lo, T hi) {
    if (!OFF) return (T)0;
    T o = off[i];
    if (UPD) {
        o = o + c * (gi * di);
        o = o < lo ? lo : o;
        o = o > hi ? hi : o;
        off[i] = o;
    }
    return o;
}

INLINE void SFX(adam_loop)(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,
                           T *restrict m, T *restrict v, T *restrict vmax, int64_t lo, int64_t hi,
                           const int OFF, const int UPD, const int DEC, const int AMS, const int L2,
                           T c, T olo, T ohi, T ka, T kb, T da, T db, T dd, T wd, T w1, T b2, T w2, T shift) {
    for (int64_t i = lo; i < hi; i++) {
        T gi = g[i], th = p[i];
        T o = SFX(alpha_off)(off, gi, dir[i], i, OFF, UPD, c, olo, ohi);
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
            dir[i] = q + dd * th;
            p[i] = th * (kd + (T)1) + k * q;
        } else {
            dir[i] = q;
            p[i] = th + k * q;
        }
    }
}

INLINE void SFX(adam_range)(T *p, const T *g, T *dir, T *off, T *m, T *v, T *vmax, int64_t lo, int64_t hi,
                            int code, T c, T olo, T ohi, T ka, T kb, T da, T db, T dd,
                            T wd, T w1, T b2, T w2, T shift) {
    switch (code) { ADAM_CASES }
}

/* Adam / AdamW on one tensor. off (nullable): parameter-level alpha offsets, off <- clamp(off + c*g*dir_old)
 * when do_alpha. q = m / (sqrt(v) + shift) after the moment updates (L2 decay wd enters g);
 * theta <- theta*(1 + da + db*off) [decoupled] + (ka + kb*off)*q; dir <- q + dd*theta_old [decoupled] or q.
 * krow (nullable, the unit level): per-row factors, row r of row_len elements uses ka*krow[r], da*krow[r]. */
CAMHD_CLONES void SFX(camhd_adam)(T *p, const T *g, T *dir, T *off, T *m, T *v, T *vmax, int64_t n,
                                  const double *krow, int64_t row_len, int do_alpha, double c, double olo,
                                  double ohi, double ka, double kb, int decoupled, double da, double db,
                                  double dd, double wd, double w1, double b2, double w2, double shift) {
    int nt = camhd_threads(n);
    int OFF = off != 0, UPD = off != 0 && do_alpha, DEC = decoupled != 0, AMS = vmax != 0, L2 = wd != 0.0;
    int code = OFF | UPD << 1 | DEC << 2 | AMS << 3 | L2 << 4;
    (void)nt;
    #pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        camhd_slice(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (!krow) {
            SFX(adam_range)(p, g, dir, off, m, v, vmax, lo, hi, code, c, olo, ohi, ka, kb, da, db, dd,
                            wd, w1, b2, w2, shift);
        } else {
            for (int64_t i = lo; i < hi;) {
                int64_t r = i / row_len, e = (r + 1) * row_len < hi ? (r + 1) * row_len : hi;
                SFX(adam_range)(p, g, dir, off, m, v, vmax, i, e, code, c, olo, ohi, ka * krow[r], kb,
                                da * krow[r], db, dd, wd, w1, b2, w2, shift);
                i = e;
            }
        }
    }
}

INLINE void SFX(sgd_loop)(T *restrict p, const T *restrict g, T *restrict dir, T *restrict off,
                          T *restrict buf, int64_t lo, int64_t hi,
                          const int OFF, const int UPD, const int MOM, const int FIRST, const int L2,
                          T c, T olo, T ohi, T ka, T kb, T wd, T mu, T dm) {
    for (int64_t i = lo; i < hi; i++) {
        T gi = g[i], th = p[i];
        T o = SFX(alpha_off)(off, gi, dir[i], i, OFF, UPD, c, olo, ohi);
        T gg = L2 ? gi + wd * th : gi;
        T d = gg;
        if (MOM) {
            T b = FIRST ? gg : buf[i] * mu + dm * gg;
            buf[i] = b;
            d = MOM == 2 ? gg + mu * b : b;
        }
        T k = OFF ? ka + kb * o : ka;
        dir[i] = d;
        p[i] = th + k * d;
    }
}

INLINE void SFX(sgd_range)(T *p, const T *g, T *dir, T *off, T *buf, int64_t lo, int64_t hi, int code,
                           T c, T olo, T ohi, T ka, T kb, T wd, T mu, T dm) {
    switch (code) { SGD_CASES }
}

/* SGD on one tensor. momentum: 0 plain (buf unused), 1 heavy ball, 2 Nesterov; first: buf <- g (torch's
 * first step). theta <- theta + (ka + kb*off)*d; dir <- d. krow, row_len, off, do_alpha: as camhd_adam. */
CAMHD_CLONES void SFX(camhd_sgd)(T *p, const T *g, T *dir, T *off, T *buf, int64_t n, const double *krow,
                                 int64_t row_len, int do_alpha, double c, double olo, double ohi, double ka,
                                 double kb, double wd, int momentum, int first, double mu, double damp) {
    int nt = camhd_threads(n);
    int OFF = off != 0, UPD = off != 0 && do_alpha, L2 = wd != 0.0;
    int MOM = momentum < 0 ? 0 : (momentum > 2 ? 2 : momentum), FIRST = first != 0;
    int code = OFF | UPD << 1 | L2 << 2 | FIRST << 3 | MOM << 4;
    double dm = 1.0 - damp;
    (void)nt;
    #pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        camhd_slice(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (!krow) {
            SFX(sgd_range)(p, g, dir, off, buf, lo, hi, code, c, olo, ohi, ka, kb, wd, mu, dm);
        } else {
            for (int64_t i = lo; i < hi;) {
                int64_t r = i / row_len, e = (r + 1) * row_len < hi ? (r + 1) * row_len : hi;
                SFX(sgd_range)(p, g, dir, off, buf, i, e, code, c, olo, ohi, ka * krow[r], kb, wd, mu, dm);
                i = e;
            }
        }
    }
}
