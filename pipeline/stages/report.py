"""Stage `report`: metrics.json, report.md and plots in the results directory.

`metrics.json` keeps a fixed schema (later additions add keys, never rename): dataset sizes, the
marked fraction, test accuracy, the FPR resolution 1/M, seconds per stage, and the blocks
`set_based`, `instance_based` (marked model) and `control_unmarked` (set-based audit of a model
trained with the same member users left unmarked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.metrics import STRICT_FPR_TARGETS, roc_points  # noqa: E402
from ..store import atomic_path, copy_file, load_npz, read_json, write_json  # noqa: E402
from .contract import REPORT_FILES, Context  # noqa: E402

ROC_BLOCKS = ("set_based", "instance_based", "control_unmarked")
LOOSE_SHOWN = ("0.001", "0.01")  # FPR <= t columns shown beside the strict ones


def build_metrics(ctx: Context, plan: dict[str, Any]) -> dict[str, Any]:
    users = plan["users"]
    n_members = sum(u["role"] == "member" for u in users)
    n_nonmembers = len(users) - n_members
    k, n_train = plan["samples_per_user"], plan["n_train"]
    train = {arm: read_json(path) for arm, path in ctx.inputs_by_arm("training").items()}
    audit = {arm: read_json(path) for arm, path in ctx.inputs_by_arm("audit").items()}
    manifests = {
        "plan": ctx.manifest("planned"),
        "mark": ctx.manifest("marks"),
        "write": ctx.manifest("written"),
        **{
            f"{stage}-{arm}": read_json(path)
            for stage, name in (("train", "trained"), ("audit", "audited"))
            for arm, path in ctx.inputs_by_arm(name).items()
        },
    }
    marked, control = audit.get("marked"), audit.get("control")
    mark_manifest = manifests["mark"]
    return {
        "dataset": plan["dataset"],
        "n_train": n_train,
        "n_member_users": n_members,
        "n_nonmember_users": n_nonmembers,
        "samples_per_user": k,
        "marked_fraction": k / n_train,
        "marked_fraction_all_members": n_members * k / n_train,
        "test_accuracy": train["marked"]["test_accuracy"] if "marked" in train else None,
        "fpr_resolution": 1.0 / n_nonmembers,
        "seconds": {name: manifest["seconds"] for name, manifest in manifests.items()},
        "set_based": marked["set_based"] if marked else None,
        "instance_based": marked["instance_based"] if marked else None,
        "control_unmarked": control["set_based"] if control else None,
        "set_based_logit": marked["set_based_logit"] if marked else None,
        "control_unmarked_logit": control["set_based_logit"] if control else None,
        "training": {
            arm: {key: t[key] for key in ("epochs", "train_loss", "train_accuracy", "test_loss", "test_accuracy")}
            for arm, t in train.items()
        },
        "mean_user_loss": {
            arm: {"member": a["member_mean_loss"], "nonmember": a["nonmember_mean_loss"]} for arm, a in audit.items()
        },
        "statistics": marked["statistics"] if marked else None,
        "control_statistics": control["statistics"] if control else None,
        "mark_quality": mark_manifest["quality"],
        "mark_survival": read_json(ctx.input("survival")),
        "stored_survival": read_json(ctx.input("stored_survival")),
        "null_capacity": null_capacity(plan),
        **(easy_class_effect(plan, marked, train["marked"]) if marked else {}),
    }


def null_capacity(plan: dict[str, Any]) -> dict[str, Any]:
    """How many non-member users the held-out images allow at this K (users spread evenly over the
    classes, so the smallest class bounds them)."""
    held, k = plan["heldout_per_class"], plan["samples_per_user"]
    return {
        "heldout_images": sum(held),
        "max_nonmember_users_even": min(held) // k * len(held),
        "max_nonmember_users": sum(h // k for h in held),
    }


def easy_class_effect(plan: dict[str, Any], audit: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """The audit's per-class breakdown with class names and each class's test accuracy."""
    names, accuracy = plan["classes"], train.get("class_test_accuracy")
    per_class = {
        names[int(c)]: {"class": int(c), **row, "test_accuracy": accuracy[int(c)] if accuracy else None}
        for c, row in audit["per_class"].items()
    }
    per_member = [
        {
            **row,
            "class": names[row["class"]],
            "nonmembers_below": {names[int(c)]: n for c, n in row["nonmembers_below"].items()},
        }
        for row in audit["per_member"]
    ]
    return {"per_class": per_class, "per_member": per_member}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _bh_sentence(st: dict[str, Any], null_size: str) -> str:
    bh, n = st["benjamini_hochberg"], ""
    for q, d in bh.items():
        n += (
            f"{'; ' if n else ''}at FDR {q} it flags {d['members_flagged']} member and {d['nonmembers_flagged']} "
            f"never-trained-on users (flagging every member is possible only from {d['smallest_null_size']} "
            f"non-member users {null_size} on)"
        )
    return n


def statistics_paragraph(label: str, st: dict[str, Any], n_null: int) -> str:
    """Member p-values against both nulls, intervals, and the Benjamini–Hochberg decisions."""
    p, cc = np.array(st["member_p_values"]), st["class_conditional"]
    cp, floors = np.array(cc["member_p_values"]), cc["smallest_possible_p_values"]
    tpr, fpr, hyp = st["tpr_at_fpr_0"], st["fpr_at_tpr_1"], st["fdr_hypotheses"]
    return (
        f"Statistics, {label}: member users' rank p-values among all {n_null} non-member users min {p.min():.4f} / "
        f"median {np.median(p):.4f} / max {p.max():.4f} (smallest possible {st['smallest_possible_p_value']:.4f}); "
        f"among the non-member users of their own class (class-conditional null) min {cp.min():.4f} / median "
        f"{np.median(cp):.4f} / max {cp.max():.4f} (smallest possible {min(floors):.4f}–{max(floors):.4f}). "
        f"TPR at FPR = 0 {tpr['value']:.3f} [{tpr['interval'][0]:.3f}, {tpr['interval'][1]:.3f}], FPR at TPR = 1 "
        f"{fpr['value']:.3f} [{fpr['interval'][0]:.3f}, {fpr['interval'][1]:.3f}] ({100 * st['confidence']:.0f}% "
        f"Clopper–Pearson). Benjamini–Hochberg over the {hyp['members']} member users and {hyp['nonmembers']} "
        "never-trained-on users (leave-one-out p-values), pooled null: "
        + _bh_sentence(st, "in all")
        + ". Class-conditional null: "
        + _bh_sentence(cc, "per class")
        + "."
    )


def easy_class_tables(m: dict[str, Any]) -> list[str]:
    """Per class: where the non-member users below the members come from, with the class's test
    accuracy, mean losses and the calibration of both nulls; then per member user."""
    st = m["statistics"]
    pooled, within = st["null_calibration"], st["class_conditional"]["null_calibration"]
    lines = [
        "",
        "Where the false positives come from (marked model; `classes.png`). Calibration: the share of a class's "
        "non-member users whose leave-one-out p-value is ≤ 0.05, which should lie inside the binomial 95% "
        "limits given after it if the null is calibrated for that class. Against the class-conditional null it "
        "is 5% by construction (leave-one-out ranks within a class are uniform); against the pooled null it "
        "shows which classes a pooled audit accuses without cause.",
        "",
        "| class | test acc | member users | non-member users | non-members below the worst member "
        "| members' mean loss | non-members' mean loss | p ≤ 0.05, pooled null | p ≤ 0.05, class-conditional null |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in m["per_class"].items():
        i = row["class"]
        acc, member_loss, nonmember_loss = (
            _fmt(row[k], spec)
            for k, spec in (("test_accuracy", ".3f"), ("member_mean_loss", ".3g"), ("nonmember_mean_loss", ".3g"))
        )  # None: none there
        cal = [
            f"{c[str(i)]['rate']:.3f} ({c[str(i)]['limits'][0]:.3f}–{c[str(i)]['limits'][1]:.3f})"
            if str(i) in c
            else "—"
            for c in (pooled, within)
        ]
        lines.append(
            f"| {name} | {acc} | {row['n_member_users']} | {row['n_nonmember_users']} | "
            f"{row['nonmembers_below_worst_member']} | {member_loss} | {nonmember_loss} | "
            f"{cal[0]} | {cal[1]} |"
        )
    lines += [
        "",
        "| member user | class | mean loss | p, pooled | p, class-conditional | non-members below it, by class |",
        "|---|---|---|---|---|---|",
    ]
    for row in m["per_member"]:
        below = ", ".join(f"{c} {n}" for c, n in sorted(row["nonmembers_below"].items(), key=lambda x: -x[1]) if n)
        lines.append(
            f"| {row['user_id']} | {row['class']} | {row['mean_loss']:.3g} | {row['p_value']:.4f} | "
            f"{row['class_p_value']:.4f} | {below or 'none'} |"
        )
    return lines


def report_markdown(m: dict[str, Any], title: str) -> str:
    rows = [
        ("set-based, marked model (paper's score: mean loss)", m["set_based"]),
        ("instance-based, marked model (per-sample loss)", m["instance_based"]),
        ("set-based, control model (members unmarked)", m["control_unmarked"]),
        ("set-based, marked model, logit-margin score", m["set_based_logit"]),
        ("set-based, control model, logit-margin score", m["control_unmarked_logit"]),
    ]
    cap = m["null_capacity"]
    lines = [
        f"# {title}",
        "",
        f"Dataset **{m['dataset']}**: {m['n_train']} training images, {m['n_member_users']} member users and "
        f"{m['n_nonmember_users']} non-member users with K = {m['samples_per_user']} images each "
        f"({100 * m['marked_fraction']:.3f}% of the training set per user). "
        f"FPR resolution 1/M = {m['fpr_resolution']:.4f}: "
        "every FPR target below it reads as FPR = 0. "
        f"M is bounded by the held-out part of the train split ({cap['heldout_images']} images): at this K it "
        f"allows {cap['max_nonmember_users_even']} non-member users spread evenly over the classes (the smallest "
        f"class sets it), {cap['max_nonmember_users']} in all. Marked images against their originals (mean over "
        "users; per user in the mark stage's manifest): member users PSNR "
        f"{m['mark_quality']['member']['psnr_mean']:.1f} dB, SSIM {m['mark_quality']['member']['ssim_mean']:.3f}; "
        f"non-member users PSNR {m['mark_quality']['nonmember']['psnr_mean']:.1f} dB, "
        f"SSIM {m['mark_quality']['nonmember']['ssim_mean']:.3f}.",
        "",
        "TPR at low FPR in two conventions: **FPR < t** (strict: the official code's, so the paper's numbers) and "
        "FPR ≤ t (one more false positive allowed when t = k/M).",
        "",
        "| audit | AUC | FPR @ 100% TPR | TPR @ FPR = 0 | "
        + " | ".join(f"TPR @ FPR < {t}" for t in STRICT_FPR_TARGETS)
        + " | "
        + " | ".join(f"TPR @ FPR ≤ {t}" for t in LOOSE_SHOWN)
        + " |",
        "|---|---|---|---|" + "---|" * (len(STRICT_FPR_TARGETS) + len(LOOSE_SHOWN)),
    ]
    for name, block in rows:
        if block is not None:
            tprs = " | ".join(
                [_fmt(block["tpr_at_fpr_below"][t]) for t in STRICT_FPR_TARGETS]
                + [_fmt(block["tpr_at_fpr"][t]) for t in LOOSE_SHOWN]
            )
            lines.append(
                f"| {name} | {_fmt(block['auc'])} | {_fmt(block['fpr_at_tpr_1'])} | "
                f"{_fmt(block['tpr_at_fpr']['0'])} | {tprs} |"
            )
    lines += [
        "",
        "| model | epochs | train loss | train acc | test loss | test acc | mean user loss: members | non-members |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, t in m["training"].items():
        u = m["mean_user_loss"][arm]
        lines.append(
            f"| {arm} | {t['epochs']} | {t['train_loss']:.4f} | {t['train_accuracy']:.4f} | {t['test_loss']:.4f} | "
            f"{t['test_accuracy']:.4f} | {u['member']:.3g} | {u['nonmember']:.3g} |"
        )
    for label, st in (("marked model", m["statistics"]), ("control model", m["control_statistics"])):
        if st is not None:
            lines += ["", statistics_paragraph(label, st, m["n_nonmember_users"])]
    if "per_class" in m:
        lines += easy_class_tables(m)
    stored = m["stored_survival"]
    share = stored["member_jpeg_share"]
    lines += [
        "",
        "Mark survival: correlation between the stored residual and the intended mark, whole and by "
        f"part. The last row is what this run stored: {100 * share:.0f}% of the member users' training "
        f"images as JPEG (quality {stored['jpeg_quality']}), the rest raw, each as the clean image it "
        f"replaces ({stored['n_images']} images measured); the others re-encode the marked images.",
        "",
        "| storage | whole mark | noise part | pattern part |",
        "|---|---|---|---|",
    ]
    rows = [*m["mark_survival"]["storage"].items(), ("as stored by this run", stored["storage"]["stored"])]
    for storage, corr in rows:
        parts = (
            "—" if corr.get(k) is None else f"{corr[k]:.3f}" for k in ("full", "noise", "pattern")
        )  # None: no mark
        lines.append(f"| {storage} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in m["seconds"].items()) + ".",
        "",
        "Plots: `roc.png` (log-scale FPR), `loss_hist.png` (per-user mean loss), `p_values.png` (rank "
        "p-values), `classes.png` (the easy-class effect), `marked_examples.png`.",
        "",
    ]
    return "\n".join(lines)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], fpr_floor: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for label, (fpr, tpr) in curves.items():
        ax.step(np.maximum(fpr, fpr_floor), tpr, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(fpr_floor, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"false positive rate (log; values below 1/M = {fpr_floor:.1e} drawn at 1/M)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_loss_hist(per_arm: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(per_arm), figsize=(5 * len(per_arm), 3.6), squeeze=False)
    for ax, (arm, s) in zip(axes[0], per_arm.items()):
        loss = np.maximum(s["mean_loss"], 1e-12)
        bins = np.logspace(np.log10(loss.min()), np.log10(loss.max()) + 1e-9, 40)
        ax.hist(loss[~s["is_member"]], bins=bins, alpha=0.6, label="non-member users")
        ax.hist(loss[s["is_member"]], bins=bins, alpha=0.8, label="member users")
        ax.set_xscale("log")
        ax.set_title(f"{arm} model: per-user mean loss", fontsize=9)
        ax.set_xlabel("mean cross-entropy over the user's K marked images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_p_values(per_arm: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Member users' rank p-values, sorted, per model, against the smallest possible value 1/(M+1)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for arm, s in per_arm.items():
        member = s["is_member"]
        p = np.sort(s["p_value"][member])
        ax.plot(np.arange(1, len(p) + 1), p, "o-", label=f"{arm} model")
    floor = 1.0 / ((~member).sum() + 1)
    ax.axhline(floor, color="grey", linestyle=":", label=f"smallest possible, 1/(M+1) = {floor:.4f}")
    ax.axhline(0.05, color="grey", linestyle="--", label="0.05")
    ax.set_yscale("log")
    ax.set_xlabel("member users, sorted")
    ax.set_ylabel("rank p-value among non-member users")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_classes(s: dict[str, np.ndarray], m: dict[str, Any], path: Path) -> None:
    """The easy-class effect: per class, every non-member user's mean loss against the members' and
    the worst member's, and how many non-member users score below that worst member."""
    names, member, classes = list(m["per_class"]), s["is_member"], s["class"]
    loss = np.maximum(s["mean_loss"], 1e-12)
    worst = loss[member].max()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    below = [row["nonmembers_below_worst_member"] for row in m["per_class"].values()]
    bars = left.bar(range(len(names)), below, color="tab:orange")
    for bar, row in zip(bars, m["per_class"].values()):
        if row["test_accuracy"] is not None:
            left.annotate(
                f"{row['test_accuracy']:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    left.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("non-member users below the worst member")
    left.set_title("false positives by class (numbers: class test accuracy)", fontsize=9)
    rng = np.random.default_rng(0)
    for x, c in enumerate(row["class"] for row in m["per_class"].values()):
        null = (classes == c) & ~member
        right.scatter(
            x + rng.uniform(-0.3, 0.3, null.sum()),
            loss[null],
            s=3,
            alpha=0.35,
            color="tab:blue",
            label="non-member users" if x == 0 else None,
        )
        mine = (classes == c) & member
        right.scatter(
            np.full(mine.sum(), x),
            loss[mine],
            s=40,
            marker="*",
            color="tab:red",
            zorder=3,
            label="member users" if x == 0 else None,
        )
    right.axhline(worst, color="tab:red", linestyle=":", label="worst member")
    right.set_yscale("log")
    right.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    right.set_ylabel("per-user mean loss (marked model)")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def run_report(ctx: Context) -> None:
    stage, results_dir = ctx.stage, Path(ctx.config.results_dir)
    plan = read_json(ctx.input("users"))
    metrics = build_metrics(ctx, plan)
    losses_by_arm = {arm: load_npz(path) for arm, path in ctx.inputs_by_arm("losses").items()}
    per_arm = {arm: load_npz(path) for arm, path in ctx.inputs_by_arm("per_user").items()}  # scores, p-values
    curves = {}
    for arm, s in per_arm.items():
        curves[f"set-based, {arm} model"] = roc_points(s["is_member"], -s["mean_loss"])
    if "marked" in losses_by_arm:
        losses = losses_by_arm["marked"]
        members = [u["user_id"] for u in plan["users"] if u["role"] == "member"]
        curves["instance-based, marked model"] = roc_points(np.isin(losses["user"], members), -losses["loss"])
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(curves, metrics["fpr_resolution"], stage.path("roc.png"))
    plot_loss_hist(per_arm, stage.path("loss_hist.png"))
    plot_p_values(per_arm, stage.path("p_values.png"))
    outputs = [name for name in REPORT_FILES if name != "classes.png" or "per_class" in metrics]
    if "per_class" in metrics:
        plot_classes(per_arm["marked"], metrics, stage.path("classes.png"))
    copy_file(ctx.input("examples"), stage.path("marked_examples.png"))
    write_json(stage.path("metrics.json"), metrics)
    with atomic_path(stage.path("report.md")) as tmp:
        tmp.write_text(report_markdown(metrics, f"Audit report: {ctx.config.name}"))
    for name in outputs:
        copy_file(stage.path(name), results_dir / name)
    stage.finish(outputs, results_dir=str(results_dir))
