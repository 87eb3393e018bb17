"""An independent statement of CAM-HD (docs/algorithm.md §1–§4) for the tests, in float64.

Written from the algorithm document, not from the package: the whole model is one flat vector θ of N
scalars, every level is an integer map ``node_j[p]`` from scalar to node, every α is one vector per level,
and every sum is a ``bincount``. It shares nothing with ``hf_camhd.optim`` but the tree (node membership).
Every implementation of the package (reference, multi-tensor, fused, compiled) is held to it.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def node_maps(tree, levels) -> dict[str, torch.Tensor]:
    """``node[level][p]``: the node of scalar p (flat, in tree order) at each level (§1)."""
    offsets = [0]
    for n in tree.numels:
        offsets.append(offsets[-1] + n)
    N = offsets[-1]
    maps = {}
    for lv in levels:
        m = torch.empty(N, dtype=torch.long)
        for e, entry in enumerate(tree.entries):
            sl = slice(offsets[e], offsets[e + 1])
            if lv == "global":
                m[sl] = 0
            elif lv == "block":
                m[sl] = tree.entry_block[e]
            elif lv == "layer":
                m[sl] = tree.entry_layer[e]
            elif lv == "parameter":
                m[sl] = torch.arange(offsets[e], offsets[e + 1])
            else:  # unit: index along the tensor's unit dimension, numbered within its unit group
                g = tree.unit_groups[tree.entry_unit_group[e]]
                dim = dict(g.members)[e]
                if entry.ndim == 0:
                    idx = torch.zeros((), dtype=torch.long)
                else:
                    shape = [1] * entry.ndim
                    shape[dim] = entry.shape[dim]
                    idx = torch.arange(entry.shape[dim]).reshape(shape).expand(entry.shape)
                m[sl] = g.offset + idx.reshape(-1)
        maps[lv] = m
    return maps


class ReferenceCAMHD:
    """Dense CAM-HD over tensors ``params`` (in tree order) with per-tensor scheduler multipliers, on the CPU
    whatever the device of the tensors it is given.

    ``base``: "sgd" (momentum, dampening, nesterov, L2 weight_decay), "adam" (L2), "adamw" (decoupled) or
    "sfadamw" (Schedule-Free AdamW: one param group's lr drives its averaging weights).
    """

    def __init__(self, params, tree, *, base, lr, levels, gamma=None, hypergrad_lr=0.0, gamma_lr=0.0,
                 decay_rate=0.0, alpha_inf=None, hypergrad_scaling="equal", gamma_update="clamp", alpha_min=0.0,
                 alpha_max=None, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, amsgrad=False, maximize=False, hypergrad_rule="additive",
                 hypergrad_smoothing=0.0, warmup_steps=0):
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.theta = torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=F64) for p in self.params])
        N = self.theta.numel()
        self.levels = tuple(levels)
        self.node = node_maps(tree, self.levels)
        self.count = {lv: int(self.node[lv].max()) + 1 for lv in self.levels}
        sizes = {lv: torch.bincount(self.node[lv], minlength=self.count[lv]).to(F64) for lv in self.levels}
        self.beta = {lv: (hypergrad_lr * N / sizes[lv]) if hypergrad_scaling == "equal"
                     else torch.full_like(sizes[lv], hypergrad_lr) for lv in self.levels}
        self.alpha = {lv: torch.full((self.count[lv],), lr, dtype=F64) for lv in self.levels}
        L = len(self.levels)
        g0 = [1.0 / L] * L if gamma is None else [float(x) for x in gamma]
        self.gamma = torch.tensor(g0, dtype=F64) / sum(g0)
        self.logits = torch.log(self.gamma)
        self.lr, self.delta, self.r = lr, gamma_lr, decay_rate
        self.alpha_inf = lr if alpha_inf is None else alpha_inf
        self.lo, self.hi = alpha_min, (1000.0 * lr if alpha_max is None else alpha_max)
        self.gamma_update = gamma_update
        self.base, self.mu, self.damp, self.nesterov, self.wd = base, momentum, dampening, nesterov, weight_decay
        self.b1, self.b2, self.eps, self.amsgrad, self.maximize = betas[0], betas[1], eps, amsgrad, maximize
        self.u = torch.zeros(N, dtype=F64)
        self.rule, self.rho, self.beta0 = hypergrad_rule, hypergrad_smoothing, hypergrad_lr
        self.ema = {lv: torch.zeros(self.count[lv], 3, dtype=F64) for lv in self.levels}  # Σgu, Σg², Σu² per node
        self.G_ema = torch.zeros(L, dtype=F64)
        self.buf = self.m = self.v = self.vmax = self.z = None
        self.warmup_steps = warmup_steps
        self.t = 0

    # ------------------------------------------------------------------ one step (§4)
    def step(self, grads, lr_scale=None):
        """One step with gradients ``grads`` (one per tensor) and per-tensor multipliers ``s``."""
        g = torch.cat([x.detach().reshape(-1).to(device="cpu", dtype=F64) for x in grads])
        if self.maximize:
            g = -g
        s = torch.cat([torch.full((int(math.prod(sh)),), 1.0 if lr_scale is None else lr_scale[i], dtype=F64)
                       for i, sh in enumerate(self.shapes)])
        self.t += 1
        t = self.t
        tau = math.exp(-self.r * t)
        h = g * self.u                                              # 1. h_p = g_p u_p
        node_sums = {lv: torch.bincount(self.node[lv], weights=h, minlength=self.count[lv]) for lv in self.levels}
        # note: compared on finite steps only. On a step whose Σh is not finite the implementation still moves the
        # parameter level where its own h is finite (tests/test_optim_behaviour.py checks that case)
        if torch.isfinite(h.sum()) and t > 1:
            old = {lv: a.clone() for lv, a in self.alpha.items()}
            G = torch.stack([(old[lv] * node_sums[lv]).sum() for lv in self.levels])
            if self.rule == "additive":
                for j, lv in enumerate(self.levels):                # 2. α_j ← α_j − β_j γ_j Σh (clamped)
                    self.alpha[lv] = (self.alpha[lv] - self.beta[lv] * self.gamma[j] * node_sums[lv]).clamp(self.lo, self.hi)
            else:
                G = self._normalized(g, h, G)                       # 2. α ← α (1 − β c̄) (clamped)
            if self.delta > 0:                                      # 3. γ with G_j = Σ_n α_j^old[n] Σ h
                self._update_gamma(G)
        a_star = sum(self.gamma[j] * self.alpha[lv][self.node[lv]] for j, lv in enumerate(self.levels))  # 4.
        kappa = tau * a_star + (1 - tau) * self.alpha_inf
        if self.base == "sfadamw":
            return self._schedule_free_step(g, s, kappa, tau)
        d = self._direction(g, t)                                   # 5.
        self.theta = self.theta - s * kappa * d                     # 6.
        self.u = -s * tau * d
        return self.theta

    def _schedule_free_step(self, g, s, kappa, tau):
        """Schedule-Free AdamW (θ holds y; z the base sequence) with the combined rate scaling z's step."""
        if self.z is None:
            self.z, self.v, self.sf = self.theta.clone(), torch.zeros_like(g), dict(k=0, lr_max=-1.0, wsum=0.0)
        sf = self.sf
        sf["k"] += 1
        warmup = min(1.0, sf["k"] / self.warmup_steps) if self.warmup_steps else 1.0
        sf["lr_max"] = max(self.lr * float(s[0]) * warmup, sf["lr_max"])
        weight = sf["lr_max"] ** 2.0
        sf["wsum"] += weight
        c = weight / sf["wsum"]
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        d = g / ((self.v / (1 - self.b2 ** sf["k"])).sqrt() + self.eps) + self.wd * self.theta
        step = -s * kappa * warmup * d
        self.theta = self.theta + c * (self.z - self.theta) + step * (1 - self.b1 * (1 - c))
        self.z = self.z + step
        self.u = -s * tau * warmup * (1 - self.b1 * (1 - c)) * d
        return self.theta

    def _normalized(self, g, h, G):
        """§3.2: per node the smoothed cosine of g and u; the parameter level uses the sign of h (one scalar per
        node, not smoothed). Returns ∂f/∂γ normalised by α₀ ‖g‖ ‖u‖ (both smoothed)."""
        for lv in self.levels:
            if lv == "parameter":
                c = torch.sign(h)
            else:
                sums = torch.stack([torch.bincount(self.node[lv], weights=w, minlength=self.count[lv])
                                    for w in (h, g * g, self.u * self.u)], 1)
                self.ema[lv] = self.rho * self.ema[lv] + (1 - self.rho) * sums
                den = (self.ema[lv][:, 1] * self.ema[lv][:, 2]).sqrt()
                c = torch.where(den > 0, self.ema[lv][:, 0] / torch.where(den > 0, den, 1.0), 0.0).clamp(-1, 1)
            self.alpha[lv] = (self.alpha[lv] * (1 - self.beta0 * c)).clamp(self.lo, self.hi)
        self.G_ema = self.rho * self.G_ema + (1 - self.rho) * G
        e = self.ema["global"][0]  # every tree has the global level
        scale = self.lr * (e[1] * e[2]).sqrt()
        return self.G_ema / scale if scale > 0 else torch.zeros_like(self.G_ema)

    def _update_gamma(self, G):
        if self.gamma_update == "softmax":
            grad_c = self.gamma * (G - (self.gamma * G).sum())
            self.logits = self.logits - self.delta * grad_c
            self.gamma = torch.softmax(self.logits, 0)
            return
        prop = (self.gamma - self.delta * G).clamp_min(0)
        if prop.sum() > 0:
            self.gamma = prop / prop.sum()

    def _direction(self, g, t):
        theta = self.theta
        if self.base == "sgd":
            d = g + self.wd * theta
            if self.mu:
                self.buf = d.clone() if self.buf is None else self.mu * self.buf + (1 - self.damp) * d
                d = d + self.mu * self.buf if self.nesterov else self.buf
            return d
        gg = g + self.wd * theta if self.base == "adam" else g
        if self.m is None:
            self.m, self.v, self.vmax = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
        self.m = self.b1 * self.m + (1 - self.b1) * gg
        self.v = self.b2 * self.v + (1 - self.b2) * gg * gg
        v = self.v
        if self.amsgrad:
            self.vmax = torch.maximum(self.vmax, self.v)
            v = self.vmax
        d = (self.m / (1 - self.b1 ** t)) / ((v / (1 - self.b2 ** t)).sqrt() + self.eps)
        return d + self.wd * theta if self.base == "adamw" else d

    # ------------------------------------------------------------------ reading
    def tensors(self, flat):
        out, o = [], 0
        for sh in self.shapes:
            n = int(math.prod(sh))
            out.append(flat[o:o + n].reshape(sh))
            o += n
        return out
