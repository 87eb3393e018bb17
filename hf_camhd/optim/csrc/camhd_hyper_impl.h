/* The hyper-update of a fused CPU step for one hyper-state dtype: included by camhd_fused.c with T, SFX(name) and
 * SQRT defined. Steps 2-4 of docs/algorithm.md on the few numbers pass A leaves (a handful per tensor and
 * node), in the order and with the roundings of the torch implementation (hf_camhd.optim._functional.hyper_update
 * and combined_rates): one call instead of some eighty tiny tensor operations. */

/* torch's lerp for a scalar weight: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w) */
static T SFX(hyper_lerp)(T a, T b, T w) {
    return (w < (T)0.5 && w > (T)-0.5) ? a + w * (b - a) : b - (b - a) * ((T)1 - w);
}

static T SFX(hyper_clamp)(T x, T lo, T hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* x, or 0 where it is not finite (torch.nan_to_num(x, 0, 0, 0)) */
static T SFX(hyper_finite_or_0)(T x) { return isfinite(x) ? x : (T)0; }

/* step 2 for the n nodes of one level (sums: (n, C)): additive alpha <- alpha - beta (gamma_j sum g.u), normalized
 * stats <- lerp(stats, sums, w) and alpha <- alpha (1 - beta' cos) with cos the smoothed cosine; clamped */
static void SFX(hyper_new_alpha)(T *alpha, const T *sums, T *stats, const T *beta, int64_t n, T gamma_j,
                                 const camhd_hyper_args *a) {
    const int64_t C = a->channels;
    const T lo = (T)a->alpha_min, hi = (T)a->alpha_max, w = (T)a->smoothing_weight, b = (T)a->hypergrad_lr;
    for (int64_t k = 0; k < n; k++) {
        T x;
        if (!a->normalized) {
            x = alpha[k] - beta[k] * (gamma_j * sums[k * C]);
        } else {
            T *st = stats + 3 * k;
            for (int c = 0; c < 3; c++) st[c] = SFX(hyper_lerp)(st[c], sums[k * C + c], w);
            T den = SQRT(st[1] * st[2]);
            T cosine = den > (T)0 ? SFX(hyper_clamp)(st[0] / den, (T)-1, (T)1) : (T)0;
            x = alpha[k] * ((T)1 - b * cosine);
        }
        alpha[k] = SFX(hyper_clamp)(x, lo, hi);
    }
}

/* G_j of a coarse level: sum over its nodes of alpha[n] * (sum g.u)[n] */
static T SFX(hyper_level_gradient)(const T *alpha, const T *sums, int64_t n, int64_t C) {
    double acc = 0.0;
    for (int64_t k = 0; k < n; k++) acc += (double)(alpha[k] * sums[k * C]);
    return (T)acc;
}

/* step 3: gamma <- gamma - delta G clamped at 0 and renormalised (kept when the sum is not positive and finite), or
 * a gradient step on the softmax logits (kept when finite); the normalized rule first smooths G and divides it
 * by alpha_0 |g| |u| (smoothed, over the model) */
static void SFX(hyper_new_gamma)(T *G, const camhd_hyper_args *a) {
    const int64_t L = a->levels;
    T *gamma = (T *)a->gamma;
    if (a->normalized) {
        T *smoothed = (T *)a->gamma_grad;
        const T *gs = (const T *)a->stats_global;
        T scale = (T)a->lr * SQRT(gs[1] * gs[2]);
        for (int64_t j = 0; j < L; j++) {
            smoothed[j] = SFX(hyper_lerp)(smoothed[j], G[j], (T)a->smoothing_weight);
            G[j] = scale > (T)0 ? smoothed[j] / scale : (T)0;
        }
    }
    const T delta = (T)a->gamma_lr;
    if (a->softmax) {
        T *logits = (T *)a->gamma_logits, next[CAMHD_MAX_LEVELS];
        double dot = 0.0;
        for (int64_t j = 0; j < L; j++) dot += (double)(gamma[j] * G[j]);
        T top = -INFINITY;
        for (int64_t j = 0; j < L; j++) {
            next[j] = logits[j] - delta * (gamma[j] * (G[j] - (T)dot));
            top = next[j] > top ? next[j] : top;
        }
        int finite = 1;
        for (int64_t j = 0; j < L; j++) {
            next[j] = next[j] - top;
            finite &= isfinite(next[j]) != 0;
        }
        if (finite)
            for (int64_t j = 0; j < L; j++) logits[j] = next[j];
        top = -INFINITY;
        for (int64_t j = 0; j < L; j++) top = logits[j] > top ? logits[j] : top;
        double total = 0.0;
        for (int64_t j = 0; j < L; j++) total += (double)(next[j] = (T)exp((double)(logits[j] - top)));
        for (int64_t j = 0; j < L; j++) gamma[j] = next[j] / (T)total;
        return;
    }
    T proposal[CAMHD_MAX_LEVELS];
    double total = 0.0;
    for (int64_t j = 0; j < L; j++) {
        proposal[j] = gamma[j] - delta * G[j];
        proposal[j] = proposal[j] < (T)0 ? (T)0 : proposal[j];
        total += (double)proposal[j];
    }
    T sum = (T)total;
    if (sum > (T)0 && isfinite(sum))
        for (int64_t j = 0; j < L; j++) gamma[j] = proposal[j] / sum;
}

/* steps 1 (what is left of it: the node sums), 2 and 3 when a->adapt; step 4 always. See camhd_hyper_args.
 * Returns 1 when alpha and gamma were updated, 0 when nothing adapted (not asked, or the sums were not finite:
 * then *skipped is counted up), -1 for more levels than CAMHD_MAX_LEVELS. */
int SFX(camhd_hyper_step)(const camhd_hyper_args *a) {
    const int64_t nt = a->nt, C = a->channels, L = a->levels, nb = a->n_block, nl = a->n_layer;
    if (L > CAMHD_MAX_LEVELS) return -1;
    T *gamma = (T *)a->gamma, *node = (T *)a->node_sums, *G = (T *)a->gradient;
    T *blocks = node + C, *layers = blocks + nb * C;
    int applied = 0;
    if (a->adapt) {
        /* the node sums: per tensor the kernels' float64 sums times the factor c of u = c dir (c^2 for sum u^2),
         * rounded to T as the torch path does, then added node by node */
        double total[3] = {0.0, 0.0, 0.0}, param_part = 0.0;
        for (int64_t k = 0; k < (nb + nl) * C; k++) blocks[k] = (T)0;
        for (int64_t i = 0; i < nt; i++) {
            const double *raw = a->totals + 4 * i, c = a->scales[i];
            const double factor[3] = {c, 1.0, c * c};
            for (int64_t ch = 0; ch < C; ch++) {
                T s = (T)(raw[ch == 0 ? 0 : ch + 1] * factor[ch]);
                total[ch] += (double)s;
                if (nb) blocks[a->block_of[i] * C + ch] += s;
                if (nl) layers[a->layer_of[i] * C + ch] += s;
            }
            if (a->pos_param >= 0) param_part += (double)(T)(raw[1] * c);
        }
        int finite = 1;
        for (int64_t ch = 0; ch < C; ch++) {
            node[ch] = (T)total[ch];
            finite &= isfinite(node[ch]) != 0;
        }
        if (!finite) {
            *a->skipped += 1;
        } else {
            applied = 1;
            T *ag = (T *)a->alpha_global, *ab = (T *)a->alpha_block, *al = (T *)a->alpha_layer;
            const T *unit_sums = (const T *)a->unit_sums, *unit_beta = (const T *)a->unit_beta;
            if (a->gamma_lr > 0.0) { /* dL/dgamma_j with the alpha of step t-1 */
                G[0] = SFX(hyper_level_gradient)(ag, node, 1, C);
                if (a->pos_block >= 0) G[a->pos_block] = SFX(hyper_level_gradient)(ab, blocks, nb, C);
                if (a->pos_layer >= 0) G[a->pos_layer] = SFX(hyper_level_gradient)(al, layers, nl, C);
                if (a->pos_unit >= 0) G[a->pos_unit] = *(const T *)a->gamma_unit_part;
                if (a->pos_param >= 0) G[a->pos_param] = (T)param_part + (T)a->lr * node[0];
                for (int64_t j = 0; j < L; j++) G[j] = SFX(hyper_finite_or_0)(G[j]);
            }
            SFX(hyper_new_alpha)(ag, node, (T *)a->stats_global, (const T *)a->beta_global, 1, gamma[0], a);
            if (a->pos_block >= 0)
                SFX(hyper_new_alpha)(ab, blocks, (T *)a->stats_block, (const T *)a->beta_block, nb,
                                     gamma[a->pos_block], a);
            if (a->pos_layer >= 0)
                SFX(hyper_new_alpha)(al, layers, (T *)a->stats_layer, (const T *)a->beta_layer, nl,
                                     gamma[a->pos_layer], a);
            for (int64_t k = 0, at = 0; k < a->n_unit_groups; at += a->unit_sizes[k], k++)
                SFX(hyper_new_alpha)((T *)a->unit_alpha[k], unit_sums + at * C,
                                     a->unit_stats ? (T *)a->unit_stats[k] : 0, unit_beta ? unit_beta + at : 0,
                                     a->unit_sizes[k], gamma[a->pos_unit], a);
            if (a->gamma_lr > 0.0) SFX(hyper_new_gamma)(G, a);
        }
    }
    /* step 4: w_i = alpha_0 + sum over coarse levels j of gamma_j (alpha_j[node of i] - alpha_0), decayed towards
     * alpha_inf; and tau gamma_unit, tau gamma_param */
    const T a0 = (T)a->lr, tau = (T)a->tau, dev = gamma[0] * (((T *)a->alpha_global)[0] - a0);
    const T inf_part = (T)((1.0 - a->tau) * a->alpha_inf);
    T *w = (T *)a->rates;
    for (int64_t i = 0; i < nt; i++) {
        T x = dev;
        if (a->pos_block >= 0) x = x + gamma[a->pos_block] * (((T *)a->alpha_block)[a->block_of[i]] - a0);
        if (a->pos_layer >= 0) x = x + gamma[a->pos_layer] * (((T *)a->alpha_layer)[a->layer_of[i]] - a0);
        x = x + a0;
        w[i] = a->decay ? tau * x + inf_part : x;
    }
    w[nt] = a->pos_unit >= 0 ? tau * gamma[a->pos_unit] : (T)0;
    w[nt + 1] = a->pos_param >= 0 ? tau * gamma[a->pos_param] : (T)0;
    return applied;
}
