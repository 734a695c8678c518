"""KD losses: golden values from the papers' formulas, computed here with plain Python loops."""

from __future__ import annotations

import ast
import gc
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import (
    AT,
    BLKD,
    CRD,
    DKD,
    PKT,
    RKD,
    SP,
    SSKD,
    VID,
    FitNet,
    KDLoss,
    Outputs,
    SetupInfo,
    get_loss,
    list_losses,
)
from kd_lightning.losses.contrastive import nce_loss
from kd_lightning.losses.sskd import keep_by_rank, rotations

S_LOGITS = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
T_LOGITS = [[1.0, 1.5, -0.5], [-1.0, 0.5, 2.0]]
LABELS = [0, 2]


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def out(logits: list | torch.Tensor, **features: torch.Tensor) -> Outputs:
    return Outputs(torch.as_tensor(logits, dtype=torch.float32), features)


def batch(labels: list[int] = LABELS, index: list[int] | None = None) -> dict:
    return {"label": torch.tensor(labels), "index": torch.tensor(index or list(range(len(labels))))}


def shapes(**named: tuple) -> dict[str, torch.Size]:
    return {k: torch.Size(v) for k, v in named.items()}


GOLDEN_TEST_MODULES = ("test_kd_losses.py", "test_kd_stages.py")


def subclasses_in_the_sources(root: str) -> set[str]:
    """Names of the subclasses of ``root`` defined in kd_lightning/losses, read from the source files (not
    imported): classes whose bases name ``root`` or another such class, private (``_``) ones left out."""
    bases: dict[str, set[str]] = {}
    for path in sorted((Path(__file__).parents[1] / "kd_lightning" / "losses").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
    found = {root}
    while True:
        more = {name for name, b in bases.items() if b & found} - found
        if not more:
            return {n for n in found if n != root and not n.startswith("_")}
        found |= more


def loss_classes_in_the_sources() -> set[str]:
    """The teacher-student losses: KDLoss subclasses that are not self-distillation terms (``SelfKDTerm``)."""
    return subclasses_in_the_sources("KDLoss") - subclasses_in_the_sources("SelfKDTerm") - {"SelfKDTerm"}


def test_every_self_kd_term_is_looked_up_and_has_a_golden_test() -> None:
    """The same rule for the self-distillation terms: ``list_self_kd_terms()`` finds every ``SelfKDTerm`` subclass
    of kd_lightning/losses, and each has a ``test_<lower-case name>_golden...`` in tests/test_self_kd.py."""
    from kd_lightning.losses import list_self_kd_terms

    defined = subclasses_in_the_sources("SelfKDTerm")
    assert {"GuideKL", "ProgressiveKL", "ClassWiseKL"} <= defined
    assert set(list_self_kd_terms()) == defined
    tree = ast.parse((Path(__file__).parent / "test_self_kd.py").read_text())
    tests = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    missing = sorted(n for n in defined if not any(t.startswith(f"test_{n.lower()}_golden") for t in tests))
    assert not missing, f"self-KD terms without a golden test (test_<name>_golden... in test_self_kd.py): {missing}"


def test_every_loss_is_looked_up_and_has_a_golden_test() -> None:
    """A loss in kd_lightning/losses that the lookup misses (e.g. its module is not imported) or that has no
    ``test_<lower-case name>_golden...`` function in the golden-test modules fails here."""
    defined = loss_classes_in_the_sources()
    assert len(defined) >= 15 and {"BLKD", "CRD", "SimKD"} <= defined  # the scan itself works
    assert set(list_losses()) == defined
    assert all(issubclass(get_loss(n), KDLoss) and get_loss(n).__name__ == n for n in defined)
    tests = {
        node.name
        for module in GOLDEN_TEST_MODULES
        for node in ast.walk(ast.parse((Path(__file__).parent / module).read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    missing = sorted(n for n in defined if not any(t.startswith(f"test_{n.lower()}_golden") for t in tests))
    assert not missing, f"KD losses without a golden test (test_<name>_golden... in {GOLDEN_TEST_MODULES}): {missing}"
    with pytest.raises(ConfigError, match="unknown KD loss 'NKD'; expected one of: AB, AT, BLKD"):
        get_loss("NKD")


def test_a_subclass_is_looked_up_without_registration() -> None:
    new = type("NewKD", (KDLoss,), {"__module__": "kd_lightning.losses.new"})
    try:
        assert "NewKD" in list_losses() and get_loss("NewKD") is new
    finally:
        del new
        gc.collect()
    assert "NewKD" not in list_losses()


def test_blkd_golden_value_and_zero_at_equality() -> None:
    T = 4.0
    ref = sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S_LOGITS, T_LOGITS)) / 2 * T * T
    loss = BLKD(T=T)(out(S_LOGITS), out(T_LOGITS), batch())
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert BLKD(T=T)(out(T_LOGITS), out(T_LOGITS), batch()).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_golden_value() -> None:
    T, alpha, beta = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for s, t, y in zip(S_LOGITS, T_LOGITS, LABELS):
        ps, pt = softmax(s, T), softmax(t, T)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        s_rest = [v for i, v in enumerate(s) if i != y]
        t_rest = [v for i, v in enumerate(t) if i != y]
        nckd += kl(softmax(t_rest, T), softmax(s_rest, T))
    ref = (alpha * tckd + beta * nckd) / 2 * T * T
    loss = DKD(alpha=alpha, beta=beta, T=T, warmup_epochs=0)(out(S_LOGITS), out(T_LOGITS), batch())
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    assert DKD(T=T, warmup_epochs=0)(out(T_LOGITS), out(T_LOGITS), batch()).item() == pytest.approx(0.0, abs=1e-5)


def identity_regressor(loss: FitNet, channels: int) -> None:
    conv, bn = loss.regressor[0], loss.regressor[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(channels):
            conv.weight[c, c, 0, 0] = 1.0
    bn.eval()


def test_fitnet_golden_value_with_a_known_regressor() -> None:
    loss = FitNet(student_feature="f", teacher_feature="f")
    loss.setup(SetupInfo(shapes(f=(2, 2, 2)), shapes(f=(2, 2, 2)), 3))
    assert isinstance(loss.regressor[0], nn.Conv2d) and loss.regressor[0].kernel_size == (1, 1)
    identity_regressor(loss, 2)
    s = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[0.0, 1.0], [-1.0, 2.0]]]])
    t = torch.tensor([[[[0.5, 0.0], [1.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    eps = loss.regressor[1].eps
    ref = (
        sum((max(sv, 0.0) / math.sqrt(1 + eps) - tv) ** 2 for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()))
        / 8
    )
    value = loss(out([[0.0]], f=s), out([[0.0]], f=t), batch([0]))
    assert value.item() == pytest.approx(ref, rel=1e-5)


def test_fitnet_connector_adapts_sizes_or_fails_at_setup() -> None:
    down = FitNet("f", "f")
    down.setup(SetupInfo(shapes(f=(8, 16, 16)), shapes(f=(32, 8, 8)), 10))
    assert down.regressor[0](torch.zeros(1, 8, 16, 16)).shape == (1, 32, 8, 8)
    up = FitNet("f", "f")
    up.setup(SetupInfo(shapes(f=(8, 4, 4)), shapes(f=(16, 8, 8)), 10))
    assert up.regressor[0](torch.zeros(1, 8, 4, 4)).shape == (1, 16, 8, 8)
    with pytest.raises(ConfigError, match="student feature 'f' is 2x2 and teacher feature 'f' is 8x8"):
        FitNet("f", "f").setup(SetupInfo(shapes(f=(8, 2, 2)), shapes(f=(16, 8, 8)), 10))
    with pytest.raises(ConfigError, match="the teacher has no feature 'stage5'"):
        FitNet("f", "stage5").setup(SetupInfo(shapes(f=(8, 2, 2)), shapes(f=(16, 8, 8)), 10))


def attention(fmap: list) -> list[float]:
    """Channel mean of squares at each position, L2-normalised (AT's definition, p = 2)."""
    c, h, w = len(fmap), len(fmap[0]), len(fmap[0][0])
    a = [sum(fmap[k][i][j] ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(v * v for v in a))
    return [v / norm for v in a]


def test_at_golden_value_summed_over_stages() -> None:
    g = torch.Generator().manual_seed(0)
    s0, t0 = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    s1, t1 = torch.randn(2, 4, 1, 2, generator=g), torch.randn(2, 2, 1, 2, generator=g)
    ref = 0.0
    for s, t in ((s0, t0), (s1, t1)):
        diffs = [(a - b) ** 2 for n in range(2) for a, b in zip(attention(s[n].tolist()), attention(t[n].tolist()))]
        ref += sum(diffs) / len(diffs)
    loss = AT()
    loss.setup(SetupInfo(shapes(stage0=(3, 2, 2), stage1=(4, 1, 2)), shapes(stage0=(5, 2, 2), stage1=(2, 1, 2)), 3))
    value = loss(
        Outputs(torch.zeros(2, 3), {"stage0": s0, "stage1": s1}),
        Outputs(torch.zeros(2, 3), {"stage0": t0, "stage1": t1}),
        batch([0, 1]),
    )
    assert value.item() == pytest.approx(ref, rel=1e-5)
    same = loss(
        Outputs(torch.zeros(2, 3), {"stage0": s0, "stage1": s1}),
        Outputs(torch.zeros(2, 3), {"stage0": s0 * 3, "stage1": -s1}),
        batch([0, 1]),
    )
    assert same.item() == pytest.approx(0.0, abs=1e-7)  # attention ignores scale and sign


def test_at_needs_the_same_number_of_stages() -> None:
    with pytest.raises(ConfigError, match="student declares 2 stages and the teacher 3"):
        AT().setup(
            SetupInfo(
                shapes(stage0=(3, 2, 2), stage1=(3, 2, 2)),
                shapes(stage0=(3, 2, 2), stage1=(3, 2, 2), stage2=(3, 2, 2)),
                3,
            )
        )


def test_pkt_golden_value() -> None:
    s = [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, 2.0, 1.0]]
    t = [[2.0, 1.0], [-1.0, 0.5], [1.0, 1.0]]

    def conditional(f: list[list[float]]) -> list[list[float]]:
        unit = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in f]
        sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = conditional(s), conditional(t)
    eps = 1e-7
    # RepDistiller's scale: the mean over all 3 x 3 entries
    ref = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    loss = PKT()(
        out(torch.zeros(3, 2), penultimate=torch.tensor(s)),
        out(torch.zeros(3, 2), penultimate=torch.tensor(t)),
        batch([0, 1, 0]),
    )
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    same = PKT()(
        out(torch.zeros(3, 2), penultimate=torch.tensor(s)),
        out(torch.zeros(3, 2), penultimate=torch.tensor(s)),
        batch([0, 1, 0]),
    )
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_sp_golden_value() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 4, 1, 1, generator=g)

    def sim(f: torch.Tensor) -> list[list[float]]:
        rows = [r.flatten().tolist() for r in f]
        gram = [[sum(a * b for a, b in zip(u, v)) for v in rows] for u in rows]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in gram]

    gs, gt = sim(s), sim(t)
    ref = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    loss = SP()
    loss.setup(SetupInfo(shapes(stage0=(1, 1, 1), stage1=(2, 2, 2)), shapes(stage0=(4, 1, 1)), 3))
    assert loss.student_features == ("stage1",) and loss.teacher_features == ("stage0",)  # last stages
    value = loss(out(torch.zeros(3, 2), stage1=s), out(torch.zeros(3, 2), stage0=t), batch([0, 1, 0]))
    assert value.item() == pytest.approx(ref, rel=1e-5)


def test_vid_golden_value_at_initial_variance() -> None:
    loss = VID(stages=["f"], init_var=5.0)
    loss.setup(SetupInfo(shapes(f=(2, 1, 2)), shapes(f=(2, 1, 2)), 3))
    with torch.no_grad():  # identity 1x1 convs: with non-negative inputs the regressor is the identity
        for conv in loss.regressors[0][::2]:
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    s = torch.tensor([[[[1.0, 2.0]], [[0.5, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.5]], [[1.0, -1.0]]]])
    var = 5.0  # softplus(alpha) + eps starts at init_var
    terms = [0.5 * (math.log(var) + (a - b) ** 2 / var) for a, b in zip(s.flatten().tolist(), t.flatten().tolist())]
    value = loss(out([[0.0]], f=s), out([[0.0]], f=t), batch([0]))
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_rkd_golden_value() -> None:
    s = [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.5, -1.0]]
    t = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [2.0, 1.0, 1.0]]
    n = 4

    def dists(e: list[list[float]]) -> list[list[float]]:
        d = [[math.dist(a, b) for b in e] for a in e]
        mean = sum(v for row in d for v in row if v > 0) / sum(1 for row in d for v in row if v > 0)
        return [[v / mean for v in row] for row in d]

    def cosines(e: list[list[float]]) -> list[float]:
        out_ = []
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(e[i], e[j])]
                    v = [a - b for a, b in zip(e[k], e[j])]
                    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
                    out_.append(0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv))
        return out_

    def huber(a: float, b: float) -> float:
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    ds, dt = dists(s), dists(t)
    ref_d = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    cs, ct = cosines(s), cosines(t)
    ref_a = sum(huber(a, b) for a, b in zip(cs, ct)) / len(cs)
    parts = RKD()(
        out(torch.zeros(4, 2), penultimate=torch.tensor(s)),
        out(torch.zeros(4, 2), penultimate=torch.tensor(t)),
        batch([0, 1, 0, 1]),
    )
    assert parts["dist"].item() == pytest.approx(25 * ref_d, rel=1e-4)
    assert parts["angle"].item() == pytest.approx(50 * ref_a, rel=1e-4)
    same = RKD()(
        out(torch.zeros(4, 2), penultimate=torch.tensor(s)),
        out(torch.zeros(4, 2), penultimate=torch.tensor(s) * 3),
        batch([0, 1, 0, 1]),
    )
    assert sum(same.values()).item() == pytest.approx(0.0, abs=1e-5)  # relations are scale-free


def test_crd_golden_value_of_the_nce_loss() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.05, 0.3, 0.01]])
    n_data, k = 10, 2
    pn = 1 / n_data
    ref = 0.0
    for row in scores.tolist():
        ref -= math.log(row[0] / (row[0] + k * pn + 1e-7))
        ref -= sum(math.log(k * pn / (v + k * pn + 1e-7)) for v in row[1:])
    assert nce_loss(scores, n_data).item() == pytest.approx(ref / 2, rel=1e-5)


def test_crd_banks_follow_the_momentum_update_and_size_from_the_data() -> None:
    torch.manual_seed(0)
    loss = CRD(feat_dim=4, nce_k=3)
    loss.setup(SetupInfo(shapes(penultimate=(6,)), shapes(penultimate=(5,)), 3))
    with pytest.raises(ConfigError, match="memory banks are empty"):
        loss(
            out(torch.zeros(2, 3), penultimate=torch.randn(2, 6)),
            out(torch.zeros(2, 3), penultimate=torch.randn(2, 5)),
            batch([0, 1], [3, 7]),
        )
    loss.setup_data(10)
    assert loss.memory_s.shape == (10, 4) and loss.memory_t.shape == (10, 4)
    before = loss.memory_s.clone()
    fs = torch.randn(2, 6)
    value = loss(
        out(torch.zeros(2, 3), penultimate=fs),
        out(torch.zeros(2, 3), penultimate=torch.randn(2, 5)),
        batch([0, 1], [3, 7]),
    )
    assert torch.isfinite(value) and value > 0
    v = loss.embed_s(fs).detach()
    expected = torch.nn.functional.normalize(before[[3, 7]] * 0.5 + v * 0.5, dim=1)
    assert torch.allclose(loss.memory_s[[3, 7]], expected, atol=1e-6)
    untouched = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(loss.memory_s[untouched], before[untouched])
    assert loss.z_s > 0 and loss.z_t > 0  # partition estimates fixed at the first batch


def test_sskd_rotations_and_rank_filter() -> None:
    x = torch.arange(8.0).view(2, 1, 2, 2)
    rot = rotations(x)
    assert rot.shape == (6, 1, 2, 2)
    assert torch.equal(rot[0], torch.rot90(x[0], 1, (1, 2))) and torch.equal(rot[5], torch.rot90(x[1], 3, (1, 2)))
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 1.0, 0.5], [0.0, 0.1, 5.0]])
    target = torch.tensor([0, 2, 2, 2])  # rows 1 and 2 rank the target 2nd and 3rd
    assert keep_by_rank(scores, target, 0.0).tolist() == [0, 3]
    assert keep_by_rank(scores, target, 0.5).tolist() == [0, 1, 3]  # the better-ranked wrong row is kept
    assert keep_by_rank(scores, target, 1.0).tolist() == [0, 1, 2, 3]


def test_sskd_teacher_module_trains_first() -> None:
    from kd_lightning.losses import StepContext

    torch.manual_seed(0)
    loss = SSKD(teacher_epochs=1)
    loss.setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(4,)), 3))
    student_net, teacher_net = nn.Linear(4, 3), nn.Linear(4, 3)

    def run(net: nn.Module, x: torch.Tensor) -> Outputs:
        f = x.flatten(1)
        return Outputs(net(f), {"penultimate": f})

    x = torch.rand(4, 1, 2, 2)
    b = {"image": x, "label": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    for epoch, ss_on in ((0, False), (1, True)):
        ctx = StepContext(lambda z: run(student_net, z), lambda z: run(teacher_net, z), epoch=epoch)
        parts = loss(run(student_net, x), run(teacher_net, x), b, ctx)
        assert set(parts) == {"kd", "tf", "ss", "ss_teacher"}
        assert (parts["ss"].item() != 0) == ss_on
        assert parts["ss_teacher"].item() > 0


@pytest.mark.parametrize("cls", [BLKD, DKD, PKT, RKD, SP])
def test_bad_hyper_parameters_are_named(cls: type) -> None:
    with pytest.raises(ConfigError, match="weight=-1"):
        cls(weight=-1)


def test_temperatures_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="T=0"):
        BLKD(T=0)
    with pytest.raises(ConfigError, match="nce_k=0"):
        CRD(nce_k=0)


def test_sskd_golden_value() -> None:
    from kd_lightning.losses import StepContext

    torch.manual_seed(0)
    loss = SSKD(ss_ratio=1.0, tf_ratio=1.0, teacher_epochs=0)
    loss.setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(4,)), 3))
    loss.eval()  # BatchNorm of the SS modules on running statistics: the reference below sees the same maps
    student_net, teacher_net = nn.Linear(4, 3), nn.Linear(4, 3)

    def run(net: nn.Module, x: torch.Tensor) -> Outputs:
        f = x.flatten(1)
        return Outputs(net(f), {"penultimate": f})

    x, y = torch.rand(3, 1, 2, 2), [0, 2, 1]
    ctx = StepContext(lambda z: run(student_net, z), lambda z: run(teacher_net, z), epoch=0)
    with torch.no_grad():
        parts = loss(run(student_net, x), run(teacher_net, x), {"image": x, "label": torch.tensor(y)}, ctx)
        rot = torch.stack([torch.rot90(x[i], k, (1, 2)) for i in range(3) for k in (1, 2, 3)])
        s_n, t_n = student_net(x.flatten(1)).tolist(), teacher_net(x.flatten(1)).tolist()
        s_r, t_r = student_net(rot.flatten(1)).tolist(), teacher_net(rot.flatten(1)).tolist()
        e = {
            "sn": loss.student_head(x.flatten(1)),
            "sr": loss.student_head(rot.flatten(1)),
            "tn": loss.teacher_head(x.flatten(1)),
            "tr": loss.teacher_head(rot.flatten(1)),
        }
    e = {k: v.tolist() for k, v in e.items()}

    def cos(a: list[float], b: list[float]) -> float:
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    kd = sum(kl(softmax(t, 4), softmax(s, 4)) for s, t in zip(s_n, t_n)) / 3 * 16
    tf = sum(kl(softmax(t, 4), softmax(s, 4)) for s, t in zip(s_r, t_r)) / 9 * 16
    s_sim = [[cos(r, n) for n in e["sn"]] for r in e["sr"]]
    t_sim = [[cos(r, n) for n in e["tn"]] for r in e["tr"]]
    ss = sum(kl(softmax(t, 0.5), softmax(s, 0.5)) for s, t in zip(s_sim, t_sim)) / 9 * 0.25
    teacher_ce = sum(-math.log(softmax(row)[i // 3]) for i, row in enumerate(t_sim)) / 9
    assert parts["kd"].item() == pytest.approx(0.9 * kd, rel=1e-4)
    assert parts["tf"].item() == pytest.approx(2.7 * tf, rel=1e-4)
    assert parts["ss"].item() == pytest.approx(10.0 * ss, rel=1e-4)
    assert parts["ss_teacher"].item() == pytest.approx(teacher_ce, rel=1e-4)


def test_sskd_heads_are_the_authors_and_bn_is_an_option() -> None:
    loss = SSKD()
    loss.setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(6,)), 3))
    assert [type(m).__name__ for m in loss.student_head.mlp] == ["Linear", "Identity", "ReLU", "Linear"]
    assert loss.teacher_head.mlp[0].in_features == 6
    with_bn = SSKD(head_batch_norm=True)
    with_bn.setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(4,)), 3))
    assert [type(m).__name__ for m in with_bn.teacher_head.mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_sskd_reference_schedule_loads_a_frozen_teacher_head(tmp_path) -> None:
    from kd_lightning.errors import CheckpointError
    from kd_lightning.losses import StepContext
    from kd_lightning.methods import SSKDTeacherHead
    from tests.helpers import write_teacher

    teacher = write_teacher(tmp_path / "t.ckpt", 3, 1, 8, (0.5,), (0.5,))
    stage = SSKDTeacherHead(teacher=str(teacher), num_classes=3, in_channels=1, image_size=8)
    # stage 1's loss: CE over cosine similarities of rotated vs normal embeddings, source image as the class
    x = torch.rand(4, 1, 8, 8)
    loss_value = stage.model_step({"image": x, "label": torch.zeros(4, dtype=torch.long)}, "train")
    with torch.no_grad():
        f = stage.teacher.forward_features(torch.cat([x, rotations(x)]), ["penultimate"])[1]["penultimate"]
        e = stage.head(f)
        sim = torch.nn.functional.cosine_similarity(e[4:, None], e[None, :4], dim=2)
    expected = torch.nn.functional.cross_entropy(sim, torch.arange(4).repeat_interleave(3))
    assert float(loss_value) == pytest.approx(float(expected), rel=1e-5)
    assert {n for n, _ in stage.named_parameters() if _.requires_grad} == {
        "head.mlp.0.weight",
        "head.mlp.0.bias",
        "head.mlp.3.weight",
        "head.mlp.3.bias",
    }
    path = tmp_path / "head.ckpt"
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}, path)

    dim = stage.head.mlp[0].in_features
    loss = SSKD(teacher_head=str(path), teacher_epochs=5)
    loss.setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(dim,)), 3))
    assert torch.equal(loss.teacher_head.mlp[0].weight, stage.head.mlp[0].weight)
    assert not any(p.requires_grad for p in loss.teacher_head.parameters())
    student_net, teacher_net = nn.Linear(4, 3), nn.Linear(dim, 3)

    def run(net: nn.Module, z: torch.Tensor, d: int) -> Outputs:
        f = z.flatten(1)[:, :d]
        return Outputs(net(f), {"penultimate": f})

    x = torch.rand(4, 1, 8, 8)
    ctx = StepContext(lambda z: run(student_net, z, 4), lambda z: run(teacher_net, z, dim), epoch=0)
    parts = loss(
        run(student_net, x, 4), run(teacher_net, x, dim), {"image": x, "label": torch.tensor([0, 1, 2, 0])}, ctx
    )
    assert set(parts) == {"kd", "tf", "ss"}  # no teacher-head training, ss on from epoch 0 despite teacher_epochs
    assert parts["ss"].item() > 0
    with pytest.raises(CheckpointError, match="SS module"):
        SSKD(teacher_head=str(path)).setup(SetupInfo(shapes(penultimate=(4,)), shapes(penultimate=(dim + 1,)), 3))


def test_crd_exact_negatives_are_other_classes_without_replacement() -> None:
    torch.manual_seed(0)
    n = 40
    labels = torch.arange(n) % 4
    labels[[5, 6]] = -1  # not training samples (e.g. the validation split): never drawn
    loss = CRD(nce_k=12, negatives="exact")
    assert loss.uses_labels
    loss.setup_labels(labels)
    idx = torch.tensor([0, 1, 2, 3, 9])
    contrast = loss.draw_contrast(idx, labels[idx], n, 12)
    assert contrast.shape == (5, 13) and contrast[:, 0].tolist() == idx.tolist()
    for row, i in zip(contrast, idx):
        neg = row[1:]
        assert len(set(neg.tolist())) == 12  # without replacement
        assert (labels[neg] != labels[i]).all() and (labels[neg] >= 0).all()
    # more negatives than a class has: drawn with replacement, still other classes only
    many = loss.draw_contrast(idx, labels[idx], n, 50)
    assert (labels[many[:, 1:]] != labels[idx].view(-1, 1)).all() and (labels[many[:, 1:]] >= 0).all()
    with pytest.raises(ConfigError, match="setup_labels"):
        CRD(negatives="exact").draw_contrast(idx, labels[idx], n, 4)
    with pytest.raises(ConfigError, match="negatives='all'"):
        CRD(negatives="all")  # type: ignore[arg-type]


def test_training_labels_by_index_follow_the_split() -> None:
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.methods.distill import train_labels_by_index

    dm = DigitsDataModule(val_fraction=0.2, train_size=300, batch_size=16)
    dm.setup("fit")
    from kd_lightning.data.base import dataset_labels

    n = len(dm.train_dataset.dataset)
    by_index = train_labels_by_index(dm, n)
    base_labels = dataset_labels(dm.train_dataset.dataset)
    train = torch.as_tensor(dm.train_dataset.indices)
    assert torch.equal(by_index[train], base_labels[train])
    assert int((by_index >= 0).sum()) == len(train) > 250  # about train_size (stratified)
    val = torch.as_tensor(dm.val_dataset.indices)
    assert (by_index[val] == -1).all()
