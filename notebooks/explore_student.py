# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore distilled students
#
# What did the students learn from their teacher? This notebook loads a teacher checkpoint and a few student
# run folders, evaluates them on the held-out Fashion-MNIST test split, and shows
#
# - top-1 error, macro-F1 and calibration (ECE before and after temperature scaling, T fitted on validation);
# - per-class accuracy of every model, and how often each student agrees with the teacher;
# - a t-SNE of the penultimate features of the teacher and of every student (AI-KD's Fig. 6);
# - one student's confusion matrix, reliability diagram and the test images where it and the teacher disagree.
#
# Inputs: the parameters cell below (papermill: `-p STUDENTS runs/demo/student_nokd,runs/demo/student_blkd`), or
# the environment variables of the same names with a `KDL_` prefix:
#
# - `TEACHER` (`KDL_TEACHER`): the teacher's checkpoint (default `runs/demo/teacher/checkpoints/best.ckpt`, what
#   `make demo` writes);
# - `STUDENTS` (`KDL_STUDENTS`): comma-separated student run folders, each with `checkpoints/best.ckpt` (default
#   `runs/demo/student_nokd,runs/demo/student_blkd`);
# - `DATA` (`KDL_DATA`): a folder with the four Fashion-MNIST idx files (default `/usr/share/datasets/fashion-mnist`,
#   where Debian's `dataset-fashion-mnist` puts them);
# - `TSNE_N` (`KDL_TSNE_N`): test images in the t-SNE (default 2000);
# - `OUT` (`KDL_OUT`): where figure files go (the reliability diagram; default a temporary folder).
#
# A relative path is resolved against the project root (`$KDL_PROJECT_ROOT`, else this repository), not the
# kernel's folder; a missing checkpoint is an error that names it. A student's name is its folder's name (the
# parent's for a `seed*` folder); the last student is the one examined in detail. The committed outputs are this
# notebook run with its defaults after `make demo EPOCHS=3 TRAIN_SIZE=5000` (resnet20 teacher, resnet8 NOKD and BLKD
# students, seed 0; a short run, so the accuracies are low; the default `make demo` trains longer).
# `tests/test_notebooks.py` runs this notebook with papermill, from another working directory, against tiny
# checkpoints and fake data.

# %% tags=["parameters"]
import os

TEACHER = os.environ.get("KDL_TEACHER", "runs/demo/teacher/checkpoints/best.ckpt")
STUDENTS = os.environ.get("KDL_STUDENTS", "runs/demo/student_nokd,runs/demo/student_blkd")
DATA = os.environ.get("KDL_DATA", "/usr/share/datasets/fashion-mnist")
TSNE_N = int(os.environ.get("KDL_TSNE_N", "2000"))
OUT = os.environ.get("KDL_OUT", "")

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.manifold import TSNE

from kd_lightning.callbacks.calibration import per_class_accuracy
from kd_lightning.data import FashionMNISTDataModule
from kd_lightning.metrics.calibration import classification_summary, fit_temperature, plot_reliability_diagram
from kd_lightning.paths import expand, project_root, resolve
from kd_lightning.teachers import FrozenTeacher

CLASSES = FashionMNISTDataModule.classes
teacher_ckpt = resolve(TEACHER)
student_dirs = expand(STUDENTS)
out_dir = resolve(OUT) if OUT else Path(tempfile.mkdtemp(prefix="explore_student_"))
missing = [str(p) for p in (teacher_ckpt, *(s / "checkpoints" / "best.ckpt" for s in student_dirs)) if not p.is_file()]
if missing or not student_dirs:
    raise FileNotFoundError(
        f"checkpoint(s) not found (relative paths resolved against {project_root()}): {', '.join(missing) or 'none'}; "
        f"students: {STUDENTS!r}. Run `make demo`, or set TEACHER / STUDENTS (KDL_TEACHER / KDL_STUDENTS)"
    )


def run_name(folder: Path) -> str:
    return folder.parent.name if folder.name.startswith("seed") else folder.name


# FrozenTeacher loads any kdl checkpoint (students too) with its normalisation, frozen and in eval mode
models = {"teacher": FrozenTeacher.from_checkpoint(teacher_ckpt)}
models |= {run_name(s): FrozenTeacher.from_checkpoint(s / "checkpoints" / "best.ckpt") for s in student_dirs}
NAMES = list(models)
FOCUS = NAMES[-1]
WIDTH = max(10, *(len(n) for n in NAMES))  # the name column of the printed tables
for name, model in models.items():  # paths under the project root are shown relative to it
    source = Path(str(model.source))
    shown = source.relative_to(project_root()) if source.is_relative_to(project_root()) else source
    print(f"{name:{WIDTH}s} {model.net_name}, {model.num_classes} classes: {shown}")

# %%
# the same validation split as training (val_fraction 0.1, seed 0): used only to fit the temperature
dm = FashionMNISTDataModule(root=str(resolve(DATA)), image_size=32, eval_batch_size=500)
dm.setup("fit")
dm.setup("test")


@torch.no_grad()
def predict(model, loader, features=False):
    """Logits (and penultimate features) of ``model`` on every batch of ``loader``, with the labels."""
    logits, feats, labels = [], [], []
    for batch in loader:
        out, f = model.forward_features(batch["image"], ["penultimate"] if features else [])
        logits.append(out)
        labels.append(batch["label"])
        if features:
            feats.append(f["penultimate"].flatten(1))
    return torch.cat(logits), (torch.cat(feats) if features else None), torch.cat(labels)


test, feats, val = {}, {}, {}
for name, model in models.items():
    logits, f, labels = predict(model, dm.test_dataloader(), features=True)
    test[name], feats[name] = logits, f
    val_logits, _, val_labels = predict(model, dm.val_dataloader())
    val[name] = (val_logits, val_labels)
images = torch.cat([b["image"] for b in dm.test_dataloader()])
print(f"{len(labels)} test images, {len(val_labels)} validation images, {len(CLASSES)} classes")

# %% [markdown]
# ## Accuracy and calibration

# %%
summary = {}
for name in NAMES:
    s = classification_summary(test[name], labels)
    s["temperature"] = fit_temperature(*val[name])
    s["ece_ts"] = classification_summary(test[name] / s["temperature"], labels)["ece"]
    summary[name] = s
print(f"{'model':{WIDTH}s} {'top-1 err':>9s} {'macro-F1':>8s} {'ECE':>6s} {'T':>5s} {'ECE after TS':>12s}")
for name, s in summary.items():
    print(
        f"{name:{WIDTH}s} {s['top1_error']:8.2f}% {s['f1']:8.3f} {s['ece']:5.2f}% {s['temperature']:5.2f} "
        f"{s['ece_ts']:11.2f}%"
    )

# %%
# per-class accuracy: (class, accuracy, images) rows, the same table the TemperatureScaling callback writes
per_class = {name: per_class_accuracy(test[name], labels) for name in NAMES}
present = [c for c, _, _ in per_class["teacher"]]
fig, ax = plt.subplots(figsize=(9, 3.2))
width = 0.8 / len(NAMES)
for k, name in enumerate(NAMES):
    acc = [100 * a for _, a, _ in per_class[name]]
    ax.bar(np.arange(len(present)) + (k - (len(NAMES) - 1) / 2) * width, acc, width, label=name)
ax.set_xticks(range(len(present)), [CLASSES[c] if c < len(CLASSES) else str(c) for c in present], fontsize=8)
ax.set_ylabel("test accuracy (%)")
ax.set_ylim(0, 100)
# the legend sits above the axes: inside, it would hide the bars it names
ax.legend(fontsize=7, ncol=len(NAMES), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
ax.set_title("per-class top-1 accuracy", pad=22)
fig.tight_layout()
plt.show()

# %%
teacher_pred = test["teacher"].argmax(1)
agreement = {}
for name in NAMES[1:]:
    same = test[name].argmax(1) == teacher_pred
    agreement[name] = [float(same[labels == c].float().mean()) for c in present]
    print(f"{name}: agrees with the teacher on {100 * same.float().mean():.1f}% of the test images")

fig, ax = plt.subplots(figsize=(9, 3))
width = 0.8 / max(1, len(agreement))
for k, (name, rows) in enumerate(agreement.items()):
    ax.bar(np.arange(len(present)) + (k - (len(agreement) - 1) / 2) * width, [100 * a for a in rows], width, label=name)
ax.set_xticks(range(len(present)), [CLASSES[c] if c < len(CLASSES) else str(c) for c in present], fontsize=8)
ax.set_ylabel("agreement with teacher (%)")
ax.legend(fontsize=7, ncol=len(agreement), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## t-SNE of the penultimate features (AI-KD Fig. 6)
#
# The same test images (a seeded random subset of `KDL_TSNE_N` images), embedded separately for each model;
# colours are the true classes. Tighter, better separated clusters mean features that a linear head splits more
# easily; a distilled student's map often looks more like its teacher's.

# %%
subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[: min(TSNE_N, len(labels))]
perplexity = float(min(30, (len(subset) - 1) / 3))
embedded = {}
for name in NAMES:
    x = feats[name][subset].numpy()
    embedded[name] = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(x)
fig, axes = plt.subplots(1, len(NAMES), figsize=(3.2 * len(NAMES), 3.4), squeeze=False)
for ax, name in zip(axes[0], NAMES):
    e = embedded[name]
    ax.scatter(e[:, 0], e[:, 1], c=labels[subset].numpy(), cmap="tab10", s=3, vmin=0, vmax=9)
    ax.set_title(f"{name} ({feats[name].shape[1]}-d)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
shown = sorted(set(labels[subset].tolist()))  # one legend for every panel: the colour of each class
marks = [
    plt.Line2D(
        [], [], marker="o", ls="", ms=5, color=plt.get_cmap("tab10")(c / 9), label=CLASSES[c] if c < len(CLASSES) else c
    )
    for c in shown
]
fig.legend(handles=marks, loc="lower center", ncol=min(10, len(marks)), fontsize=7, frameon=False)
fig.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()

# %% [markdown]
# ## One student in detail

# %%
pred = test[FOCUS].argmax(1)
num_classes = len(present)
confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(confusion, cmap="Blues")
for i in range(num_classes):
    for j in range(num_classes):
        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
ax.set_xlabel(f"predicted ({FOCUS})")
ax.set_ylabel("true class")
plt.show()

# %%
png = plot_reliability_diagram(
    test[FOCUS],
    labels,
    summary[FOCUS]["temperature"],
    out_dir / f"{FOCUS}_reliability.png",
    title=f"{FOCUS}, test split",
)
plt.figure(figsize=(8, 4))
plt.imshow(plt.imread(png))
plt.axis("off")
plt.show()

# %%
# where the student and its teacher disagree: true label / teacher / student
disagree = (pred != teacher_pred).nonzero().flatten()[:8]
fig, axes = plt.subplots(1, max(1, len(disagree)), figsize=(2 * max(1, len(disagree)), 2.4), squeeze=False)
for ax, i in zip(axes[0], disagree.tolist()):
    ax.imshow(images[i].permute(1, 2, 0).squeeze(-1), cmap="gray")
    ax.set_title(f"{int(labels[i])} / {int(teacher_pred[i])} / {int(pred[i])}", fontsize=9)
    ax.axis("off")
plt.show()
print(f"{int((pred != teacher_pred).sum())} disagreements in {len(labels)} test images")
