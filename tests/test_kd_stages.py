"""Issue 15's methods: FT, AB, ReviewKD, SemCKD, SimKD (golden values), their pairs, stages and recipes.

Golden values are recomputed here with plain Python loops from the papers' formulas; connectors are
either set to known weights or run as modules and their outputs fed to the loop. The recipes run on
fake files (fast_dev_run), and the multi-stage methods (FT, AB, TAKD) run as chains of short fits.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kd_lightning.errors import ConfigError
from kd_lightning.losses import AB, FT, Outputs, ReviewKD, SemCKD, SetupInfo, SimKD, StepContext
from kd_lightning.losses.review import hcl
from kd_lightning.methods import DistillModule, ImageClassifier
from kd_lightning.nets import create_net
from kd_lightning.teachers import FrozenTeacher
from tests.fake_datasets import write_cifar
from tests.helpers import RECIPES, make_fake_mnist, write_teacher

FM = RECIPES / "fashion_mnist"
C100 = RECIPES / "cifar100"
#: the recipes of this file, with the teacher net their fake run uses (same stage layout as the student)
STAGE_RECIPES = {
    **{FM / f"{n}.yaml": "resnet8" for n in ("ft_paraphraser", "ab_init", "takd_assistant", "reviewkd", "semckd")},
    **{FM / f"{n}.yaml": "resnet8" for n in ("simkd", "takd", "ft", "ab")},
    **{p: "resnet8x4" for p in C100.glob("*.yaml") if p.name.split("_")[0] in ("ft", "ab", "takd", "reviewkd")},
    **{p: "resnet8x4" for p in C100.glob("*.yaml") if p.name.split("_")[0] in ("semckd", "simkd")},
}


def shapes(**named: tuple) -> dict[str, torch.Size]:
    return {k: torch.Size(v) for k, v in named.items()}


def out(**features: torch.Tensor) -> Outputs:
    n = next(iter(features.values())).shape[0]
    return Outputs(torch.zeros(n, 3), features)


def flat(t: torch.Tensor) -> list[list[float]]:
    return [row.flatten().tolist() for row in t]


# ---------------------------------------------------------------------------------------------- golden values
def test_ft_golden_value_paper_and_repdistiller_forms() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    for form in ("paper", "repdistiller"):
        loss = FT(form=form, student_feature="s", teacher_feature="t")
        loss.setup(SetupInfo(shapes(s=(3, 2, 2)), shapes(t=(4, 2, 2)), 3))
        loss.eval()
        with torch.no_grad():
            f_s, f_t = loss.translator(s).tolist(), loss.paraphraser(t)[0].tolist()
            parts = loss(out(s=s), out(t=t), {})

        def vector(f: list, form: str = form) -> list[float]:  # one sample's C x H x W factor
            if form == "paper":
                return [v for ch in f for row in ch for v in row]
            c = len(f)  # RepDistiller: channel mean of squares at each position
            return [sum(f[k][i][j] ** 2 for k in range(c)) / c for i in range(len(f[0])) for j in range(len(f[0][0]))]

        ref = 0.0
        for a, b in zip(f_s, f_t):
            a, b = vector(a), vector(b)
            na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            d = [abs(x / na - y / nb) for x, y in zip(a, b)]
            ref += sum(d) if form == "paper" else sum(d) / len(d)
        assert parts["ft"].item() == pytest.approx(ref / 2, rel=1e-5)
        assert loss.paraphraser.factor_channels == 2  # rate 0.5 of 4 channels


def test_ab_golden_value_with_identity_connectors() -> None:
    loss = AB(stages=["a", "b"], margin=0.5, stage_weights=[0.5, 1.0], connector="always")
    loss.setup(SetupInfo(shapes(a=(2, 2, 2), b=(2, 1, 1)), shapes(a=(2, 2, 2), b=(2, 1, 1)), 3))
    with torch.no_grad():
        for conn in loss.connectors:
            conn[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    loss.eval()
    g = torch.Generator().manual_seed(1)
    s = {"a": torch.randn(3, 2, 2, 2, generator=g), "b": torch.randn(3, 2, 1, 1, generator=g)}
    t = {"a": torch.randn(3, 2, 2, 2, generator=g), "b": torch.randn(3, 2, 1, 1, generator=g)}
    eps, m = loss.connectors[0][1].eps, 0.5
    ref = 0.0
    for name, w in (("a", 0.5), ("b", 1.0)):
        per_sample = []
        for sv, tv in zip(flat(s[name]), flat(t[name])):
            total = 0.0
            for x, y in zip(sv, tv):
                x = x / math.sqrt(1 + eps)  # BN on its initial running statistics
                total += max(m - x, 0.0) ** 2 if y > 0 else max(m + x, 0.0) ** 2
            per_sample.append(total)
        ref += w * sum(per_sample) / 3
    assert loss(out(**s), out(**t), {}).item() == pytest.approx(ref, rel=1e-5)


def test_ab_connectors_are_repdistillers_identity_for_equal_shapes_and_ft_paraphraser_has_no_bn(
    tmp_path: Path,
) -> None:
    info = SetupInfo(shapes(a=(2, 4, 4), b=(3, 2, 2)), shapes(a=(2, 4, 4), b=(5, 2, 2)), 3)
    default, always = AB(stages=["a", "b"]), AB(stages=["a", "b"], connector="always")
    default.setup(info)
    always.setup(info)
    assert isinstance(default.connectors[0], torch.nn.Identity)  # RepDistiller: nn.Sequential() for equal shapes
    assert isinstance(default.connectors[1][0], torch.nn.Conv2d) and isinstance(
        always.connectors[0][1], torch.nn.BatchNorm2d
    )
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    only_a = AB(stages=["a"])
    only_a.setup(SetupInfo(shapes(a=(2, 4, 4)), shapes(a=(2, 4, 4)), 3))
    on = (t > 0).float()
    ref = (on * torch.relu(1 - s) ** 2 + (1 - on) * torch.relu(1 + s) ** 2).flatten(1).sum(1).mean()
    assert only_a(out(a=s), out(a=t), {}).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="connector='conv'"):
        AB(connector="conv")  # type: ignore[arg-type]

    from kd_lightning.losses.factor import Paraphraser

    def bns(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())

    assert bns(Paraphraser(4)) == 0 and bns(Paraphraser(4, bn=True)) == 6  # RepDistiller's use_bn=False by default
    ft = FT(student_feature="s", teacher_feature="t")
    ft.setup(SetupInfo(shapes(s=(3, 2, 2)), shapes(t=(4, 2, 2)), 3))
    assert bns(ft.paraphraser) == 0 and bns(ft.translator) == 3  # RepDistiller's translator keeps its BN
    old = Paraphraser(4, 0.5, bn=True)  # a checkpoint of the earlier layout loads as it was trained
    state = {f"paraphraser.{k}": v for k, v in old.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"rate": 0.5}, "paraphraser_feature": "t"}, tmp_path / "p")
    loaded = FT(paraphraser=str(tmp_path / "p"), student_feature="s", teacher_feature="t")
    loaded.setup(SetupInfo(shapes(s=(3, 2, 2)), shapes(t=(4, 2, 2)), 3))
    assert bns(loaded.paraphraser) == 6


def avg_pool(fmap: list, size: int) -> list:
    """Adaptive average pooling of a C x H x W nested list to ``size`` x ``size`` (H divisible by size)."""
    h = len(fmap[0])
    k = h // size
    return [
        [
            [sum(ch[i * k + a][j * k + b] for a in range(k) for b in range(k)) / (k * k) for j in range(size)]
            for i in range(size)
        ]
        for ch in fmap
    ]


def mse(a: list, b: list) -> float:
    fa, fb = torch.tensor(a).flatten().tolist(), torch.tensor(b).flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(fa, fb)) / len(fa)


def test_hcl_golden_value() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    sl, tl = s.tolist(), t.tolist()
    # full map weight 1, then 2x2 at 1/2 and 1x1 at 1/4 (4 >= H is skipped); normalised by 1.75
    ref = mse(sl, tl)
    ref += 0.5 * mse([avg_pool(x, 2) for x in sl], [avg_pool(x, 2) for x in tl])
    ref += 0.25 * mse([avg_pool(x, 1) for x in sl], [avg_pool(x, 1) for x in tl])
    assert hcl(s, t).item() == pytest.approx(ref / 1.75, rel=1e-5)


def test_reviewkd_golden_value_sums_hcl_of_the_fused_stages_deep_to_shallow() -> None:
    loss = ReviewKD(mid_channels=3)
    info = SetupInfo(shapes(stage0=(2, 4, 4), stage1=(4, 2, 2)), shapes(stage0=(5, 4, 4), stage1=(6, 2, 2)), 3)
    loss.setup(info)
    assert loss.abfs[1].att is None and loss.abfs[0].att is not None  # the deepest stage has nothing to fuse
    loss.eval()
    g = torch.Generator().manual_seed(3)
    s = {"stage0": torch.randn(2, 2, 4, 4, generator=g), "stage1": torch.randn(2, 4, 2, 2, generator=g)}
    t = {"stage0": torch.randn(2, 5, 4, 4, generator=g), "stage1": torch.randn(2, 6, 2, 2, generator=g)}
    with torch.no_grad():
        out1, fused1 = loss.abfs[1](s["stage1"])
        x = loss.abfs[0].conv1(s["stage0"])
        y = fused1.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest upsampling 2x2 -> 4x4
        att = loss.abfs[0].att(torch.cat([x, y], 1))
        out0 = loss.abfs[0].conv2(x * att[:, :1] + y * att[:, 1:])
        ref = hcl(out1, t["stage1"]) + hcl(out0, t["stage0"])
        assert loss(out(**s), out(**t), {}).item() == pytest.approx(ref.item(), rel=1e-5)
        ramped = ReviewKD(mid_channels=3, warmup_epochs=20)
        ramped.setup(info)
        ramped.load_state_dict(loss.state_dict())
        ramped.eval()
        ctx = StepContext(lambda x: x, lambda x: x, epoch=5)  # official ramp: min(1, epoch / 20)
        assert ramped(out(**s), out(**t), {}, ctx).item() == pytest.approx(0.25 * ref.item(), rel=1e-5)
    default = ReviewKD()
    default.setup(info)
    assert default.abfs[0].conv1[0].out_channels == 4  # min(512, channels of the student's deepest stage)


def test_semckd_golden_value() -> None:
    torch.manual_seed(0)
    loss = SemCKD(batch_size=4, factor=2)
    info = SetupInfo(shapes(stage0=(2, 4, 4), stage1=(3, 2, 2)), shapes(stage0=(2, 2, 2), stage1=(4, 1, 1)), 3)
    loss.setup(info)
    loss.eval()
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 3, 2, 2, generator=g)]  # 3 samples < batch_size 4
    t = [torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 4, 1, 1, generator=g)]
    with torch.no_grad():
        value = loss(out(stage0=s[0], stage1=s[1]), out(stage0=t[0], stage1=t[1]), {}).item()

        def rows(f: torch.Tensor) -> torch.Tensor:  # in-batch Gram rows, zero-padded to batch_size columns
            v = flat(f)
            gram = [[sum(a * b for a, b in zip(u, w)) for w in v] + [0.0] for u in v]
            return torch.tensor(gram)

        q = [loss.queries[i](rows(s[i])).tolist() for i in range(2)]
        k = [loss.keys[j](rows(t[j])).tolist() for j in range(2)]
        d = [[None, None], [None, None]]
        for i in range(2):
            for j in range(2):
                si, tj = s[i], t[j]
                if si.shape[-1] > tj.shape[-1]:
                    src, tgt = torch.nn.functional.adaptive_avg_pool2d(si, tj.shape[-2:]), tj
                else:
                    src, tgt = si, torch.nn.functional.adaptive_avg_pool2d(tj, si.shape[-2:])
                p, tt = flat(loss.projectors[i][j](src)), flat(tgt)
                d[i][j] = [sum((a - b) ** 2 for a, b in zip(pn, tn)) / len(pn) for pn, tn in zip(p, tt)]
    ref = 0.0
    for n in range(3):
        for i in range(2):
            energy = [sum(a * b for a, b in zip(q[i][n], k[j][n])) for j in range(2)]
            z = sum(math.exp(e) for e in energy)
            ref += sum(math.exp(energy[j]) / z * d[i][j][n] for j in range(2))
    assert value == pytest.approx(ref / 6, rel=1e-5)
    with pytest.raises(ConfigError, match="batch of 5 samples is larger than batch_size=4"):
        loss.attention([torch.zeros(5, 2, 4, 4)] * 2, [torch.zeros(5, 2, 2, 2)] * 2)


def test_simkd_golden_value_and_the_reused_classifier() -> None:
    teacher = create_net("resnet8", num_classes=5, in_channels=1)
    loss = SimKD()
    loss.setup(SetupInfo(shapes(prepool=(4, 4, 4)), shapes(prepool=(64, 2, 2)), 5, teacher_net=teacher))
    head = loss.head
    assert torch.equal(head.classifier.weight, teacher.fc.weight) and not head.classifier.weight.requires_grad
    assert head.size == (2, 2) and head.projector[0].out_channels == 32  # pooled to the teacher's size; factor 2
    head.eval()
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 64, 2, 2, generator=g)
    with torch.no_grad():
        proj = head.projector(torch.nn.functional.avg_pool2d(s, 2))
        ref = mse(proj.tolist(), t.tolist())
        assert loss(out(prepool=s), out(prepool=t), {}).item() == pytest.approx(ref, rel=1e-5)
        pooled = [[sum(ch.flatten().tolist()) / 4 for ch in sample] for sample in proj]
        w, b = teacher.fc.weight.tolist(), teacher.fc.bias.tolist()
        logits = [[sum(x * y for x, y in zip(row, p)) + bc for row, bc in zip(w, b)] for p in pooled]
        assert torch.allclose(head(s), torch.tensor(logits), atol=1e-5)


# ---------------------------------------------------------------------------------------------- pairs
def probe(net: str) -> dict[str, torch.Size]:
    hp = SimpleNamespace(in_channels=3, image_size=32)
    return DistillModule._probe(create_net(net, num_classes=100), torch.nn.Identity(), hp)


PAIRS = [("resnet110", "resnet20"), ("wrn_40_2", "wrn_40_1"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]


def test_cifar100_pairs_build_and_reviewkd_refuses_a_cross_architecture_pair() -> None:
    for teacher, student in [*PAIRS, ("resnet32x4", "shufflenetv2")]:
        t_net = create_net(teacher, num_classes=100)
        info = SetupInfo(probe(student), probe(teacher), 100, teacher_net=t_net)
        for cls in (FT, SemCKD, SimKD):
            cls().setup(info)
        same_layout = (teacher, student) != ("resnet32x4", "shufflenetv2")
        if same_layout:
            ReviewKD().setup(info)
            AB().setup(info)
            continue
        with pytest.raises(ConfigError, match=r"student's stages are \[\(116, 16, 16\).*teacher's \[\(64, 32, 32\)"):
            ReviewKD().setup(info)
        with pytest.raises(ConfigError, match=r"AB pairs .* student's stages are \[\(116, 16, 16\).*teacher's \[\(64"):
            AB().setup(info)


def test_a_pair_is_refused_when_the_student_is_built(tmp_path: Path) -> None:
    teacher = write_teacher(tmp_path / "t.ckpt", 10, 1)
    with pytest.raises(ConfigError, match=r"ReviewKD needs teacher and student stages.*student's stages are"):
        DistillModule(
            teacher=str(teacher), kd_losses=[ReviewKD()], net="resnet8", num_classes=10, in_channels=1, image_size=32
        )
    with pytest.raises(ConfigError, match="SimKD, SimKD each replace the student's head"):
        DistillModule(teacher=str(teacher), kd_losses=[SimKD(), SimKD()], net="resnet8", num_classes=10, in_channels=1)


def test_ft_frozen_paraphraser_gets_no_gradient(tmp_path: Path) -> None:
    from kd_lightning.losses.factor import Paraphraser

    para = Paraphraser(4, 0.5)
    state = {f"paraphraser.{k}": v for k, v in para.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"rate": 0.5}, "paraphraser_feature": "t"}, tmp_path / "p.ckpt"
    )
    loss = FT(paraphraser=str(tmp_path / "p.ckpt"), student_feature="s", teacher_feature="t")
    loss.setup(SetupInfo(shapes(s=(3, 2, 2)), shapes(t=(4, 2, 2)), 3))
    loss.train()
    assert not loss.paraphraser.training  # stays in eval mode: its BatchNorm statistics never move
    s = torch.randn(2, 3, 2, 2, requires_grad=True)
    value = loss(out(s=s), out(t=torch.randn(2, 4, 2, 2)), {})
    assert value.dim() == 0
    value.backward()
    assert s.grad is not None and all(p.grad is not None for p in loss.translator.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in loss.paraphraser.parameters())
    with pytest.raises(ConfigError, match="trained on the teacher feature 't' but FT reads 'stage2'"):
        FT(paraphraser=str(tmp_path / "p.ckpt"), student_feature="s").setup(
            SetupInfo(shapes(s=(3, 2, 2)), shapes(stage2=(4, 2, 2)), 3)
        )


def data_args(recipe: Path, tmp_path: Path) -> tuple[list[str], int, int]:
    if recipe.parent.name == "cifar100":
        root = write_cifar(tmp_path / "c100", hundred=True)
        return ["--data.init_args.root", str(root), "--data.init_args.batch_size", "8"], 100, 3
    return ["--data.init_args.root", str(make_fake_mnist(tmp_path / "fm"))], 10, 1


def short_fit(kdl, recipe: Path, root: Path, data: list[str], *extra: str) -> Path:
    args = ["fit", "--config", str(recipe), "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"]
    limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    assert kdl(*args, *limits, *data, *extra) == 0
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar100"])
def test_ft_and_ab_run_as_two_stages(dataset: str, kdl, tmp_path: Path) -> None:
    d = RECIPES / dataset
    names = {
        "fashion_mnist": ("ft_paraphraser", "ft", "ab_init", "ab"),
        "cifar100": (
            "ft_paraphraser_resnet32x4",
            "ft_resnet32x4_resnet8x4",
            "ab_init_resnet32x4_resnet8x4",
            "ab_resnet32x4_resnet8x4",
        ),
    }[dataset]
    data, classes, channels = data_args(d / "x.yaml" if dataset == "cifar100" else d / "ft.yaml", tmp_path)
    teacher = write_teacher(tmp_path / "teacher.ckpt", classes, channels, net=STAGE_RECIPES[d / f"{names[1]}.yaml"])
    t_arg = ["--model.init_args.teacher", str(teacher)]
    para = short_fit(kdl, d / f"{names[0]}.yaml", tmp_path / "para", data, *t_arg)
    assert torch.load(para, weights_only=True)["paraphraser_feature"] == "stage2"
    loss = yaml.safe_load((d / f"{names[1]}.yaml").read_text())["model"]["init_args"]["kd_losses"][0]
    loss["init_args"]["paraphraser"] = str(para)
    short_fit(kdl, d / f"{names[1]}.yaml", tmp_path / "ft", data, *t_arg, "--model.init_args.kd_losses", str([loss]))
    init = short_fit(kdl, d / f"{names[2]}.yaml", tmp_path / "ab_init", data, *t_arg)
    ab = short_fit(kdl, d / f"{names[3]}.yaml", tmp_path / "ab", data, "--model.init_args.net_weights", str(init))
    first = torch.load(init, weights_only=True)["state_dict"]
    assert ImageClassifier.load_from_checkpoint(ab).net.conv1.weight.shape == first["net.conv1.weight"].shape


def test_takd_chain_and_simkd_student_loads_without_its_teacher(kdl, tmp_path: Path) -> None:
    data, classes, channels = data_args(FM / "takd.yaml", tmp_path)
    teacher = write_teacher(tmp_path / "teacher.ckpt", classes, channels, None, (0.2860,), (0.3530,), net="resnet8")
    assistant = short_fit(
        kdl, FM / "takd_assistant.yaml", tmp_path / "ta", data, "--model.init_args.teacher", str(teacher)
    )
    assert torch.load(assistant, weights_only=True)["hyper_parameters"]["net"] == "resnet20"
    short_fit(kdl, FM / "takd.yaml", tmp_path / "takd", data, "--model.init_args.teacher", str(assistant))

    ckpt = short_fit(kdl, FM / "simkd.yaml", tmp_path / "simkd", data, "--model.init_args.teacher", str(teacher))
    saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert saved["student_head"]["kind"] == "ReusedTeacherHead"
    distilled = DistillModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    x = torch.rand(4, 1, 32, 32)
    expected = distilled(x)
    teacher.unlink()  # from here on the teacher's checkpoint is gone
    frozen = FrozenTeacher.from_checkpoint(ckpt)
    assert torch.allclose(frozen(x), expected, atol=1e-5)
    plain = ImageClassifier(net="resnet8", num_classes=10, in_channels=1)  # what `kdl test` with student.yaml builds
    plain.on_load_checkpoint(saved)  # as the Trainer does: the head comes from the checkpoint, then the weights
    plain.load_state_dict(saved["state_dict"])
    plain.eval()
    assert torch.allclose(plain(x), expected, atol=1e-5)
    assert not torch.allclose(plain.net(plain.normalize(x)), expected, atol=1e-3)  # the net's own fc is not used
    assert kdl("test", "--config", str(FM / "student.yaml"), "--ckpt_path", str(ckpt), *data) == 0
