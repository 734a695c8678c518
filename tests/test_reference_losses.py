"""Every KD loss against its reference formula, recomputed here in plain torch.

Each reference is written from the paper and the documented behaviour of the authors' code (RepDistiller for
BLKD/FitNet/AT/PKT/SP/RKD/VID/CRD, mdistiller for DKD, the SSKD authors' student.py, the PS-KD/CS-KD/TF-KD
official losses, WGAN-GP with the AI-KD critic's BatchNorm over one joint batch), never imported from the
package. Random tensors at two batch sizes; the loss value and the gradients with respect to the student's
inputs (logits, features) must match.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.losses import AT, BLKD, CRD, DKD, PKT, RKD, SP, SSKD, VID, FitNet, Outputs, SetupInfo, StepContext

BATCHES = (6, 16)
C = 7  # classes


def compare(
    ours: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], *inputs: torch.Tensor, rel: float = 1e-4
) -> None:
    """Same loss value and the same gradients w.r.t. every input (fresh leaves for each side)."""
    a = [x.detach().clone().requires_grad_(True) for x in inputs]
    b = [x.detach().clone().requires_grad_(True) for x in inputs]
    la, lb = ours(*a), ref(*b)
    assert float(la) == pytest.approx(float(lb), rel=rel, abs=1e-7)
    ga = torch.autograd.grad(la, a)
    gb = torch.autograd.grad(lb, b)
    for x, y in zip(ga, gb):
        scale = float(y.abs().max()) + 1e-12
        assert float((x - y).abs().max()) <= rel * scale + 1e-9


def shapes(**named: tuple) -> dict[str, torch.Size]:
    return {k: torch.Size(v) for k, v in named.items()}


def kl_sum_over_batch(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(log_q, p, reduction='sum')``: sum_i sum_k p log(p / q)."""
    return (p * (p.log() - log_q)).sum()


# ------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("b", BATCHES)
def test_blkd_is_repdistillers_distillkl(b: int) -> None:
    torch.manual_seed(b)
    s, t = torch.randn(b, C) * 3, torch.randn(b, C) * 3
    T = 4.0

    def ref(s: torch.Tensor) -> torch.Tensor:  # DistillKL: kl_div(sum) * T^2 / batch
        return kl_sum_over_batch(F.log_softmax(s / T, 1), F.softmax(t / T, 1)) * T * T / s.shape[0]

    compare(lambda s: BLKD(T=T)(Outputs(s), Outputs(t), {}), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_dkd_is_mdistillers(b: int) -> None:
    torch.manual_seed(b)
    s, t = torch.randn(b, C) * 3, torch.randn(b, C) * 3
    y = torch.randint(0, C, (b,))
    alpha, beta, T = 1.0, 8.0, 4.0

    def ref(s: torch.Tensor) -> torch.Tensor:
        gt = F.one_hot(y, C).float()
        other = 1 - gt
        p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
        b_s = torch.stack([(p_s * gt).sum(1), (p_s * other).sum(1)], 1)
        b_t = torch.stack([(p_t * gt).sum(1), (p_t * other).sum(1)], 1)
        tckd = kl_sum_over_batch(b_s.log(), b_t) * T**2 / len(y)
        log_q = F.log_softmax(s / T - 1000.0 * gt, 1)
        q_t = F.softmax(t / T - 1000.0 * gt, 1)
        nckd = (q_t * (q_t.clamp_min(1e-30).log() - log_q)).sum() * T**2 / len(y)
        return alpha * tckd + beta * nckd

    compare(lambda s: DKD(alpha, beta, T)(Outputs(s), Outputs(t), {"label": y}), ref, s)


# ------------------------------------------------------------------------------------- features
def conv_bn_relu(x: torch.Tensor, conv: nn.Module, bn: nn.BatchNorm2d) -> torch.Tensor:
    """A connector's forward written out: the conv, batch statistics (training mode), ReLU."""
    if isinstance(conv, nn.ConvTranspose2d):
        h = F.conv_transpose2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    else:
        h = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return F.relu(h)


@pytest.mark.parametrize("b", BATCHES)
def test_fitnet_is_the_hint_mse_through_the_regressor(b: int) -> None:
    torch.manual_seed(b)
    loss = FitNet("stage1", "stage1")
    loss.setup(SetupInfo(shapes(stage1=(4, 8, 8)), shapes(stage1=(6, 4, 4)), C))
    s, t = torch.randn(b, 4, 8, 8), torch.randn(b, 6, 4, 4)
    conv, bn = loss.regressor[0], loss.regressor[1]

    def ref(s: torch.Tensor) -> torch.Tensor:  # RepDistiller HintLoss: MSELoss(mean) of regressor(s) and t
        return ((conv_bn_relu(s, conv, bn) - t) ** 2).mean()

    compare(lambda s: loss(Outputs(s, {"stage1": s}), Outputs(t, {"stage1": t}), {}), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_at_is_repdistillers_attention(b: int) -> None:
    torch.manual_seed(b)
    loss = AT()
    loss.setup(SetupInfo(shapes(stage0=(4, 8, 8), stage1=(5, 4, 4)), shapes(stage0=(6, 8, 8), stage1=(3, 4, 4)), C))
    s0, s1, t0, t1 = torch.randn(b, 4, 8, 8), torch.randn(b, 5, 4, 4), torch.randn(b, 6, 8, 8), torch.randn(b, 3, 4, 4)

    def at(f: torch.Tensor) -> torch.Tensor:
        a = f.pow(2).mean(1).view(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def ref(s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:  # sum over stages of mean (at_s - at_t)^2
        return (at(s0) - at(t0)).pow(2).mean() + (at(s1) - at(t1)).pow(2).mean()

    def ours(s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        return loss(Outputs(s0, {"stage0": s0, "stage1": s1}), Outputs(t0, {"stage0": t0, "stage1": t1}), {})

    compare(ours, ref, s0, s1)


@pytest.mark.parametrize("b", BATCHES)
def test_vid_is_the_gaussian_nll(b: int) -> None:
    torch.manual_seed(b)
    loss = VID(stages=["stage1"])
    loss.setup(SetupInfo(shapes(stage1=(4, 4, 4)), shapes(stage1=(6, 4, 4)), C))
    s, t = torch.randn(b, 4, 4, 4), torch.randn(b, 6, 4, 4)
    convs = [m for m in loss.regressors[0] if isinstance(m, nn.Conv2d)]
    log_scale = loss.log_scales[0]

    def ref(s: torch.Tensor) -> torch.Tensor:  # RepDistiller VIDLoss: mean of 0.5 ((mu - t)^2 / var + log var)
        h = F.relu(F.conv2d(s, convs[0].weight))
        h = F.relu(F.conv2d(h, convs[1].weight))
        mu = F.conv2d(h, convs[2].weight)
        var = (torch.log1p(torch.exp(log_scale)) + 1e-5).view(1, -1, 1, 1)
        return (0.5 * ((mu - t) ** 2 / var + var.log())).mean()

    compare(lambda s: loss(Outputs(s, {"stage1": s}), Outputs(t, {"stage1": t}), {}), ref, s)


# ------------------------------------------------------------------------------------- relations
@pytest.mark.parametrize("b", BATCHES)
def test_pkt_is_repdistillers_mean_over_all_pairs(b: int) -> None:
    torch.manual_seed(b)
    s, t = torch.randn(b, 10), torch.randn(b, 12)
    eps = 1e-7

    def cond(f: torch.Tensor) -> torch.Tensor:
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.t() + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    def ref(s: torch.Tensor) -> torch.Tensor:  # torch.mean over the B x B matrix
        p_s, p_t = cond(s), cond(t)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()

    loss = PKT()
    compare(lambda s: loss(Outputs(s, {"penultimate": s}), Outputs(t, {"penultimate": t}), {}), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_pkt_carries_the_reference_scale_at_every_batch_size(b: int) -> None:
    """The loss is the mean over the B x B pair terms at every B: the row-wise KL summed per row and averaged over
    rows is exactly B times it. (The old per-row sum was that B-times-larger value, so the weight 30000, tuned
    for RepDistiller's mean, grew with the batch size.)"""
    torch.manual_seed(b)
    s, t = torch.randn(b, 10), torch.randn(b, 12)
    loss = PKT()
    ours = loss(Outputs(s, {"penultimate": s}), Outputs(t, {"penultimate": t}), {})
    p_s, p_t = loss._conditional(s), loss._conditional(t)
    per_row_sum = (p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))).sum(1).mean()
    assert float(ours) * b == pytest.approx(float(per_row_sum), rel=1e-5)


@pytest.mark.parametrize("b", BATCHES)
def test_sp_is_repdistillers_similarity(b: int) -> None:
    torch.manual_seed(b)
    loss = SP()
    loss.setup(SetupInfo(shapes(stage2=(4, 4, 4)), shapes(stage2=(6, 2, 2)), C))
    s, t = torch.randn(b, 4, 4, 4), torch.randn(b, 6, 2, 2)

    def ref(s: torch.Tensor) -> torch.Tensor:
        def g(f: torch.Tensor) -> torch.Tensor:
            f = f.view(f.shape[0], -1)
            m = f @ f.t()
            return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)

        return (g(s) - g(t)).pow(2).sum() / (s.shape[0] ** 2)

    compare(lambda s: loss(Outputs(s, {"stage2": s}), Outputs(t, {"stage2": t}), {}), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_rkd_is_repdistillers_distance_and_angle(b: int) -> None:
    torch.manual_seed(b)
    s, t = torch.randn(b, 6), torch.randn(b, 9)

    def pdist(e: torch.Tensor) -> torch.Tensor:
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        diff = diff / diff.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    def ref(s: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_d = pdist(t)
            t_d = t_d / t_d[t_d > 0].mean()
        d = pdist(s)
        d = d / d[d > 0].mean()
        dist = F.smooth_l1_loss(d, t_d)
        angle = F.smooth_l1_loss(angles(s), angles(t))
        return 25.0 * dist + 50.0 * angle

    def ours(s: torch.Tensor) -> torch.Tensor:
        parts = RKD()(Outputs(s, {"penultimate": s}), Outputs(t, {"penultimate": t}), {})
        return parts["dist"] + parts["angle"]

    compare(ours, ref, s)


# ------------------------------------------------------------------------------------- CRD
@pytest.mark.parametrize("b", BATCHES)
def test_crd_is_repdistillers_nce_on_the_same_draws(b: int) -> None:
    torch.manual_seed(b)
    n, k, dim = 50, 10, 8
    loss = CRD(feat_dim=dim, nce_k=k, nce_t=0.07)
    loss.setup(SetupInfo(shapes(penultimate=(5,)), shapes(penultimate=(6,)), C))
    loss.setup_data(n)
    idx = torch.randperm(n)[:b]
    contrast = torch.randint(0, n, (b, k + 1))
    contrast[:, 0] = idx
    loss.draw_contrast = lambda *a: contrast.clone()  # type: ignore[method-assign]
    s, t = torch.randn(b, 5), torch.randn(b, 6)
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    ws, bs = loss.embed_s.linear.weight.detach(), loss.embed_s.linear.bias.detach()
    wt, bt = loss.embed_t.linear.weight.detach(), loss.embed_t.linear.bias.detach()

    def embed(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        v = x @ w.t() + bias
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def nce(x: torch.Tensor) -> torch.Tensor:  # RepDistiller ContrastLoss, noise P_n = 1 / n_data
        m, pn = x.shape[1] - 1, 1.0 / n
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
        log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    def ref(s: torch.Tensor) -> torch.Tensor:
        v_s, v_t = embed(s, ws, bs), embed(t, wt, bt)
        out_s = torch.exp(torch.bmm(mem_t[contrast], v_s.unsqueeze(2)).squeeze(2) / 0.07)
        out_t = torch.exp(torch.bmm(mem_s[contrast], v_t.unsqueeze(2)).squeeze(2) / 0.07)
        z_s, z_t = out_s.mean().detach() * n, out_t.mean().detach() * n  # fixed at the first batch
        return nce(out_s / z_s) + nce(out_t / z_t)

    def ours(s: torch.Tensor) -> torch.Tensor:
        loss.z_s.fill_(-1.0)
        loss.z_t.fill_(-1.0)
        loss.memory_s.copy_(mem_s)
        loss.memory_t.copy_(mem_t)
        return loss(Outputs(s, {"penultimate": s}), Outputs(t, {"penultimate": t}), {"index": idx})

    compare(ours, ref, s)


# ------------------------------------------------------------------------------------- SSKD
@pytest.mark.parametrize("b", BATCHES)
def test_sskd_is_the_authors_student_loss(b: int) -> None:
    """kd + tf + ss of xuguodong03/SSKD's student.py with its SS module Linear-ReLU-Linear (ratios 1.0 so that
    the rank filter keeps every row and no tie order matters)."""
    torch.manual_seed(b)
    d = 12
    loss = SSKD(tf_ratio=1.0, ss_ratio=1.0, teacher_epochs=0)
    loss.setup(SetupInfo(shapes(penultimate=(d,)), shapes(penultimate=(d,)), C))
    s_net, t_net = nn.Linear(d, C), nn.Linear(d, C)
    x = torch.rand(b, 3, 2, 2)  # 12 numbers per image: the penultimate feature of the linear "nets"
    y = torch.randint(0, C, (b,))
    rot = torch.stack([torch.rot90(x[i], k, (1, 2)) for i in range(b) for k in (1, 2, 3)])
    t_n, t_r = x.flatten(1), rot.flatten(1)
    w = {name: p.detach().clone() for name, p in loss.named_parameters()}

    def head(f: torch.Tensor, who: str) -> torch.Tensor:
        h = F.relu(f @ w[f"{who}.mlp.0.weight"].t() + w[f"{who}.mlp.0.bias"])
        return h @ w[f"{who}.mlp.3.weight"].t() + w[f"{who}.mlp.3.bias"]

    def cos_matrix(aug: torch.Tensor, nor: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(aug.unsqueeze(2), nor.t().unsqueeze(0), dim=1)

    def ref(s_n: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
        s_out, t_out = s_net(s_n), t_net(t_n).detach()
        s_rot, t_rot = s_net(s_r), t_net(t_r).detach()
        kd = kl_sum_over_batch(F.log_softmax(s_out / 4, 1), F.softmax(t_out / 4, 1)) / b * 16
        tf = kl_sum_over_batch(F.log_softmax(s_rot / 4, 1), F.softmax(t_rot / 4, 1)) / (3 * b) * 16
        s_sim = cos_matrix(head(s_r, "student_head"), head(s_n, "student_head"))
        t_sim = cos_matrix(head(t_r, "teacher_head"), head(t_n, "teacher_head")).detach()
        ss = kl_sum_over_batch(F.log_softmax(s_sim / 0.5, 1), F.softmax(t_sim / 0.5, 1)) / (3 * b) * 0.25
        return 0.9 * kd + 2.7 * tf + 10.0 * ss

    def ours(s_n: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
        def student(z: torch.Tensor) -> Outputs:  # the rotated pass returns our leaf s_r
            return Outputs(s_net(s_r), {"penultimate": s_r})

        def teacher(z: torch.Tensor) -> Outputs:
            return Outputs(t_net(t_r), {"penultimate": t_r})

        ctx = StepContext(student, teacher, epoch=0)
        parts = loss(
            Outputs(s_net(s_n), {"penultimate": s_n}),
            Outputs(t_net(t_n), {"penultimate": t_n}),
            {"image": x, "label": y},
            ctx,
        )
        return parts["kd"] + parts["tf"] + parts["ss"]

    compare(ours, ref, t_n.clone(), t_r.clone() * 0.9 + 0.05)


# ------------------------------------------------------------------------------------- self-KD
def self_kd_model(cls_name: str, tmp_path, **kw):
    """A self-KD module of tinynet; ``ssup=True`` writes an (untrained) S_sup checkpoint for it."""
    from kd_lightning.methods import ImageClassifier, self_kd

    if kw.pop("ssup", False):
        guide = ImageClassifier(net="tinynet", num_classes=C, in_channels=1)
        hp = {**dict(guide.hparams), "_class_path": "kd_lightning.methods.supervised.ImageClassifier"}
        torch.save({"state_dict": guide.state_dict(), "hyper_parameters": hp}, tmp_path / "s.ckpt")
        kw["pretrained"] = str(tmp_path / "s.ckpt")
    return getattr(self_kd, cls_name)(net="tinynet", num_classes=C, in_channels=1, **kw)


@pytest.mark.parametrize("b", BATCHES)
def test_pskd_has_the_official_soft_target_gradient(b: int, tmp_path) -> None:
    """PS-KD's code: ``sum(-((1 - a) onehot + a p_prev) log_softmax(s)) / B``; ours equals it minus the constant
    ``a H(p_prev)``, so the gradients are the same."""
    from kd_lightning.data.mixing import MixedBatch

    torch.manual_seed(b)
    s, prev = torch.randn(b, C) * 2, F.softmax(torch.randn(b, C), 1)
    y = torch.randint(0, C, (b,))
    model = self_kd_model("PSKD", tmp_path, progressive_ramp=False, progressive_weight=0.8)
    a = 0.8
    entropy = -(prev * prev.log()).sum(1).mean()

    def ref(s: torch.Tensor) -> torch.Tensor:
        target = (1 - a) * F.one_hot(y, C) + a * prev
        return (-(target * F.log_softmax(s, 1))).sum() / b - a * entropy

    model.progressive.after_step(torch.arange(b), prev.log())  # stored logits whose softmax (tau_P = 1) is prev
    compare(lambda s: model.combine(model.student_parts(s, MixedBatch(s, y))), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_cskd_is_the_official_class_wise_loss(b: int, tmp_path) -> None:
    from kd_lightning.data.mixing import MixedBatch

    torch.manual_seed(b)
    s, pair = torch.randn(b, C) * 2, torch.randn(b, C) * 2
    y = torch.randint(0, C, (b,))
    model = self_kd_model("CSKD", tmp_path)

    def ref(s: torch.Tensor) -> torch.Tensor:  # CE + lambda * KLDivLoss(sum)(log p(x)/T, p(x')/T) T^2 / B
        kl = kl_sum_over_batch(F.log_softmax(s / 4, 1), F.softmax(pair / 4, 1)) * 16 / b
        return F.cross_entropy(s, y) + 1.0 * kl

    compare(lambda s: model.combine(model.student_parts(s, MixedBatch(s, y), pair_logits=pair)), ref, s)


@pytest.mark.parametrize("b", BATCHES)
def test_tfkd_self_and_regularisation_with_the_official_scale(b: int, tmp_path) -> None:
    from kd_lightning.data.mixing import MixedBatch

    torch.manual_seed(b)
    s, g = torch.randn(b, C) * 2, torch.randn(b, C) * 2
    y = torch.randint(0, C, (b,))
    self_model = self_kd_model("TFKD", tmp_path, ssup=True, guide_reduction="mean", guide_multiplier=50.0)

    def ref_self(s: torch.Tensor) -> torch.Tensor:  # loss_kd_self: nn.KLDivLoss() (mean over B x C) T^2 x 50
        kl = (F.softmax(g / 6, 1) * (F.log_softmax(g / 6, 1) - F.log_softmax(s / 6, 1))).mean()
        return 0.05 * F.cross_entropy(s, y) + 0.95 * kl * 36 * 50

    compare(lambda s: self_model.combine(self_model.student_parts(s, MixedBatch(s, y), guide_logits=g)), ref_self, s)
    reg = self_kd_model(
        "TFKD",
        tmp_path,
        variant="regularization",
        designed_tempered_student=False,
        guide_reduction="mean",
        guide_multiplier=100.0,
    )

    def ref_reg(s: torch.Tensor) -> torch.Tensor:  # loss_kd_regularization, correct_prob 0.99, T 20, x 100
        p_d = torch.full((b, C), 0.01 / (C - 1))
        p_d[torch.arange(b), y] = 0.99
        q = F.softmax(p_d / 20, 1)
        kl = (q * (q.log() - F.log_softmax(s, 1))).mean() * 100
        return 0.9 * F.cross_entropy(s, y) + 0.1 * kl

    compare(lambda s: reg.combine(reg.student_parts(s, MixedBatch(s, y))), ref_reg, s)


@pytest.mark.parametrize("b", BATCHES)
def test_aikd_critic_and_adversarial_term_use_one_joint_batch(b: int, tmp_path) -> None:
    """WGAN-GP with AI-KD's critic FC-BN1d-LeakyReLU-FC-LeakyReLU-FC, the BN over S_sup's and the student's logits
    (and the penalty's mix) as ONE batch; the student's L_A = -E[D(S_t)] sees the same statistics."""
    from kd_lightning.data.mixing import MixedBatch

    torch.manual_seed(b)
    model = self_kd_model("AIKD", tmp_path, ssup=True)
    real, s = torch.randn(b, C) * 2, torch.randn(b, C) * 2 + 1.0
    y = torch.randint(0, C, (b,))
    lin1, bn, lin2, lin3 = (model.critic.layers[i] for i in (0, 1, 3, 5))

    def critic(x: torch.Tensor) -> torch.Tensor:
        h = x @ lin1.weight.t() + lin1.bias
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
        h = F.leaky_relu(F.leaky_relu(h, 0.2) @ lin2.weight.t() + lin2.bias, 0.2)
        return (h @ lin3.weight.t() + lin3.bias).squeeze(1)

    def ref_adv(s: torch.Tensor) -> torch.Tensor:
        return -critic(torch.cat([real, s]))[b:].mean()

    def ours_adv(s: torch.Tensor) -> torch.Tensor:
        return model.student_parts(s, MixedBatch(s, y), guide_logits=real)["adv"]

    compare(ours_adv, ref_adv, s)

    def ref_critic(fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
        scores = critic(torch.cat([real, fake, x_hat]))
        (grad,) = torch.autograd.grad(scores[2 * b :].sum(), x_hat, create_graph=True)
        gp = ((grad.norm(dim=1) - 1) ** 2).mean()
        return scores[b : 2 * b].mean() - scores[:b].mean() + 10 * gp

    torch.manual_seed(123)
    ours = model.critic_parts(real, s)["critic"]
    torch.manual_seed(123)
    ref = ref_critic(s, torch.rand(b, 1))
    assert float(ours) == pytest.approx(float(ref), rel=1e-4)
    params = [lin1.weight, bn.weight, lin3.weight]
    for x, y in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
