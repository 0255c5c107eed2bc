"""Tables of the centralized KD methods' v1 and v2 runs for `bench/centralized.md` (issue 24).

Reads the result files `fedkd sweep` wrote (`bench/results/<experiment>[-v2]/<label>/seed<k>.json`;
the train-phase diagnostics of betakd from the run directories' metrics.jsonl where present) and
prints Markdown: per method the v1 rows beside the v2 rows, every must-beat paired by seed with
the benchmark protocol's rule (d_s per seed, mean +- sample std of d_s, the signs; |mean| < std
is a tie), and the spec's diagnostic beside each verdict. Seeds that have not run yet are simply
absent (the tables say how many there are).

Usage: .venv/bin/python bench/centralized_v2.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable, Iterable

from fedkd.sweep import Paired

RESULTS = Path(__file__).resolve().parent / "results"
Runs = dict[int, dict[str, float]]  # seed -> metrics (headline "accuracy" + method-reported)


def load(experiment: str, label: str) -> Runs:
    """seed -> metrics of one sweep label (underscored metric names, as in the result files)."""
    out: Runs = {}
    for path in sorted((RESULTS / experiment / label).glob("seed*.json")):
        d = json.loads(path.read_text())
        if d.get("status") != "complete":
            continue
        m = {k.replace("-", "_"): v for k, v in (d.get("extra_metrics") or {}).items()}
        m["accuracy"], m["wall_seconds"] = d["accuracy"], d.get("wall_seconds") or math.nan
        out[int(d["seed"])] = m
    return out


def train_metrics(experiment: str, label: str, seed: int) -> dict[str, float]:
    """The last train record of a run directory (diagnostics not in the result file)."""
    path = RESULTS / experiment / label / f"seed{seed}" / "metrics.jsonl"
    if not path.exists():
        return {}
    last: dict[str, float] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") == "train":
            last = r
    return {k.replace("-", "_"): v for k, v in last.items() if isinstance(v, (int, float))}


def values(runs: Runs, key: str | Callable[[dict[str, float]], float]) -> dict[int, float]:
    get = key if callable(key) else (lambda m: m.get(key, math.nan))
    return {s: float(get(m)) for s, m in runs.items()}


def mean_std(xs: dict[int, float], digits: int = 4) -> str:
    v = [x for x in xs.values() if not math.isnan(x)]
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float], digits: int = 4) -> tuple[str, str]:
    """(figure, verdict) of A - B paired by seed: 'd ± sd, signs' and beats / tie / fails
    (the rule is `fedkd sweep`'s; the spec's must-beat says 'fails' where sweep says 'loses')."""
    seeds = sorted(s for s in a if s in b and not math.isnan(a[s]) and not math.isnan(b[s]))
    if not seeds:
        return "—", "no runs"
    p = Paired({s: a[s] - b[s] for s in seeds})
    if p.std is None:
        return f"{p.mean:+.{digits}f} (seed {seeds[0]} only)", "open (1 seed)"
    verdict = "fails" if p.verdict == "loses" else p.verdict
    return f"{p.mean:+.{digits}f} ± {p.std:.{digits}f}, {p.signs} (seeds {','.join(map(str, seeds))})", verdict


def seeds_of(*runs: Runs) -> str:
    return ", ".join(f"{len(r)}" for r in runs)


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    h = list(header)
    lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


# --- kd --------------------------------------------------------------------------------------------

def kd() -> str:
    out = ["### kd (Hinton) on mnist5k\n"]
    v1 = load("kd-mnist5k", "kd-mnist5k")
    sizes = {"784-32-10": load("kd-mnist5k-v2", "kd-mnist5k-v2"),
             "784-100-10": load("kd-mnist5k-s100-v2", "kd-mnist5k-s100-v2")}
    rows = [["v1 (MLP teacher, 20 epochs, no validation)", "784-32-10", len(v1),
             mean_std(values(v1, "teacher_accuracy")), mean_std(values(v1, "baseline_accuracy")),
             mean_std(values(v1, "student_accuracy")), *paired(values(v1, "student_accuracy"),
                                                               values(v1, "baseline_accuracy")), "—", "—"]]
    for size, runs in sizes.items():
        rows.append(["v2 (CNN teacher, early stopping)", size, len(runs),
                     mean_std(values(runs, "teacher_accuracy")), mean_std(values(runs, "baseline_accuracy")),
                     mean_std(values(runs, "student_accuracy")),
                     *paired(values(runs, "student_accuracy"), values(runs, "baseline_accuracy")),
                     mean_std(values(runs, "teacher_minus_baseline")),
                     " / ".join(f"{int(m.get('student_best_epoch', 0))}·{int(m.get('baseline_best_epoch', 0))}"
                                for _, m in sorted(runs.items()))])
    out.append(table(["setting", "student", "seeds", "teacher", "baseline student", "KD student",
                      "KD − baseline (paired)", "verdict", "teacher − baseline", "best epoch KD·baseline per seed"],
                     rows))
    for size, exp in (("784-32-10, v1 MLP teacher", "kd-mnist5k-grid"),
                      ("784-32-10, v2 CNN teacher", "kd-mnist5k-v2-grid"),
                      ("784-100-10, v2 CNN teacher", "kd-mnist5k-s100-v2-grid")):
        if not (RESULTS / exp).is_dir():
            continue
        grid = []
        for t in ("1", "2", "4"):
            cells = []
            for a in ("0.5", "0.9"):
                runs = next((r for lab in (f"temperature{t}-alpha{a}-shared_teacher",  # v2 grid
                                           f"{t}-{a}")  # v1 grid
                             if (r := load(exp, lab))), {})
                fig, verdict = paired(values(runs, "student_accuracy"), values(runs, "baseline_accuracy"))
                cells.append(f"{fig} [{verdict}]")
            grid.append([t, *cells])
        out.append(f"\nT × alpha, KD − baseline (paired), student {size}:\n")
        out.append(table(["T \\ alpha", "0.5", "0.9"], grid))
    return "\n".join(out)


# --- xtime -----------------------------------------------------------------------------------------

def xtime() -> str:
    out = ["### xtime on ETTh1\n"]
    sets = {"v1 (vol_change)": load("xtime-etth1", "xtime-etth1"),
            "v2 (detrended_value)": load("xtime-etth1-v2", "xtime-etth1-v2")}
    rows = []
    for name, runs in sets.items():
        for model in ("xtime", "b1", "b2", "b3", "oracle"):
            rows.append([name, model, len(runs)] + [mean_std(values(runs, f"{model}_mse_level{k}"))
                                                    for k in range(4)])
    out.append("Test MSE per level (rows with level >= k; oracle = every window to its true level's "
               "expert, reference only):\n")
    out.append(table(["setting", "model", "seeds", "level 0", "level 1", "level 2", "level 3"], rows))
    out.append("\nMust-beat, paired by seed (d = B − router MSE: positive = router better):\n")
    rows = []
    for name, runs in sets.items():
        for label, a, b in (("router vs B1, level 2", "b1_mse_level2", "xtime_mse_level2"),
                            ("router vs B1, level 3", "b1_mse_level3", "xtime_mse_level3"),
                            ("router vs B3, level 3", "b3_mse_level3", "xtime_mse_level3"),
                            ("oracle vs B1, level 2", "b1_mse_level2", "oracle_mse_level2"),
                            ("oracle vs B1, level 3", "b1_mse_level3", "oracle_mse_level3")):
            rows.append([name, label, *paired(values(runs, a), values(runs, b))])
        lvl0 = {s: m["xtime_mse_level0"] / m["b1_mse_level0"] - 1 for s, m in runs.items()
                if "xtime_mse_level0" in m}
        rows.append([name, "router level-0 MSE vs B1 (must be <= +10%)", mean_std(lvl0), "—"])
    out.append(table(["setting", "comparison", "d (paired)", "verdict"], rows))
    v2 = sets["v2 (detrended_value)"]
    if v2:
        out.append("\nSpecialisation check (v2), per seed: E_k vs E_0 on windows of level >= k, "
                   "validation (before the router) / test; check = 1 when E_k's MSE is lower, "
                   "gain = 1 − MSE(E_k)/MSE(E_0):\n")
        rows = [[s] + [f"{int(m.get(f'val_specialist_check_{k}', -1))} ({m.get(f'val_specialist_gain_{k}', math.nan):+.3f})"
                       f" / {int(m.get(f'test_specialist_check_{k}', -1))} ({m.get(f'test_specialist_gain_{k}', math.nan):+.3f})"
                       for k in (1, 2, 3)] for s, m in sorted(v2.items())]
        out.append(table(["seed", "E_1 val / test", "E_2 val / test", "E_3 val / test"], rows))
    return "\n".join(out)


# --- stkd ------------------------------------------------------------------------------------------

STKD_FILES = ("6_cardio", "2_annthyroid", "24_mnist", "32_shuttle", "30_satellite")


def stkd() -> str:
    out = ["### stkd on the ADBench default suite (natural contamination)\n"]
    exp = "stkd-suite-v2"
    runs = {(f, t): load(exp, f"adbench_{f}-{t}") for f in STKD_FILES for t in ("init", "warmup")}
    rows = []
    for (f, t), r in runs.items():
        teacher = ("frozen initial encoder (regulariser)" if t == "init"
                   else "warm-up encoder, 10 epochs on the cleanest 50%")
        rows.append([f, teacher, len(r)] + [mean_std(values(r, f"{v}_auroc")) for v in ("ae", "st", "kd", "stkd")])
    v1 = load("stkd-cardio", "stkd-cardio")
    rows.append(["6_cardio (v1 run)", "frozen initial encoder (regulariser)", len(v1)]
                + [mean_std(values(v1, f"{v}_auroc")) for v in ("ae", "st", "kd", "stkd")])
    out.append(table(["file", "teacher", "seeds", "ae", "st", "kd", "stkd"], rows))
    out.append("\nMust-beat (stkd mean AUROC over the suite >= st and >= ae), paired by seed over the "
               "files complete for that seed; and warm-up vs init teacher, paired by seed:\n")
    rows = []
    for t in ("init", "warmup"):
        def suite(v: str, t: str = t) -> dict[int, float]:
            seeds = set.intersection(*[set(runs[(f, t)]) for f in STKD_FILES]) if all(
                runs[(f, t)] for f in STKD_FILES) else set()
            return {s: statistics.mean(runs[(f, t)][s][f"{v}_auroc"] for f in STKD_FILES) for s in seeds}
        for b in ("st", "ae"):
            rows.append([t, f"stkd − {b} (suite mean)", *paired(suite("stkd"), suite(b))])
    for f in STKD_FILES:
        for v in ("stkd", "kd"):
            rows.append([f, f"{v}: warmup − init teacher",
                         *paired(values(runs[(f, "warmup")], f"{v}_auroc"), values(runs[(f, "init")], f"{v}_auroc"))])
    out.append(table(["teacher / file", "comparison", "d (paired)", "verdict"], rows))
    return "\n".join(out)


# --- betakd ----------------------------------------------------------------------------------------

def betakd() -> str:
    out = ["### betakd on AV-MNIST-style pairs\n"]
    sets = {"v1 (width 32, 30% audio noise, weight lr 0.01)": ("betakd-avmnist", "betakd-avmnist"),
            "v2 official lr (width 16, 50% either)": ("betakd-avmnist-v2", "official"),
            "v2 fixed lr 0.01 (width 16, 50% either)": ("betakd-avmnist-v2", "fixed")}
    loaded = {k: load(*v) for k, v in sets.items()}
    rows = []
    for name, r in loaded.items():
        rows.append([name, len(r), mean_std(values(r, "teacher_multimodal_accuracy_clean"))]
                    + [mean_std(values(r, f"{v}_accuracy_clean")) for v in ("ce_only", "equal", "task", "instance")])
    out.append("Clean-test accuracy:\n")
    out.append(table(["setting", "seeds", "teacher (multimodal)", "ce_only", "equal", "task", "instance"], rows))
    rows = []
    for name, r in loaded.items():
        for a, b in (("task", "equal"), ("instance", "equal"), ("equal", "ce_only")):
            rows.append([name, f"{a} − {b}", *paired(values(r, f"{a}_accuracy_clean"), values(r, f"{b}_accuracy_clean"))])
        rows.append([name, "teacher − ce_only (gap)",
                     *paired(values(r, "teacher_multimodal_accuracy_clean"), values(r, "ce_only_accuracy_clean"))])
    out.append("\nMust-beat (task or instance >= equal >= ce_only), paired by seed:\n")
    out.append(table(["setting", "comparison", "d (paired)", "verdict"], rows))
    rows = []
    for name, (exp, label) in sets.items():
        for s, m in sorted(loaded[name].items()):
            tr = train_metrics(exp, label, s)
            parts = (("audio_replaced", "image_replaced", "clean") if "instance_weight_ce_train_audio_replaced" in tr
                     else ("corrupted", "clean"))  # v1: only audio is ever replaced
            inst = " / ".join(
                "·".join(f"{tr.get(f'instance_weight_{c}_train_{part}', math.nan):.2f}" for c in ("ce", "kd", "fd"))
                for part in parts)
            inst = inst if tr else "— (run directory not here)"
            rows.append([name, s, "·".join(f"{m.get(f'task_weight_{c}', math.nan):.3f}" for c in ("ce", "kd", "fd")), inst])
    out.append("\nLearned weights (normalised, CE·KD·FD): task mode; instance mode on audio-replaced / "
               "image-replaced / clean training pairs (v1: audio-replaced / clean), from the run "
               "directory's last train record:\n")
    out.append(table(["setting", "seed", "task weights", "instance weights"], rows))
    return "\n".join(out)


# --- mixclap ---------------------------------------------------------------------------------------

CONDITIONS = ("clean", "white20", "white10", "white5", "white0", "babble10", "babble0", "device10")


def mixclap() -> str:
    out = ["### mixclap on FSDD\n"]
    sets = {"v1 (entropy, clean teacher)": load("mixclap-fsdd", "mixclap-fsdd"),
            "v2 clean teacher": load("mixclap-fsdd-v2", "no_teacher_noise_aug"),
            "v2 noise-augmented teacher": load("mixclap-fsdd-v2", "teacher_noise_aug")}
    models = [("teacher", "teacher_accuracy_mean"), ("S_c alone", "clean_student_accuracy_mean"),
              ("S_n alone", "noisy_student_accuracy_mean"), ("fixed 0.5", "fixed_half_accuracy_mean"),
              ("fused, infomax", "fused_infomax_accuracy_mean"), ("fused, entropy", "fused_entropy_accuracy_mean"),
              ("oracle lambda", "oracle_accuracy_mean")]
    rows = []
    for name, r in sets.items():
        if name.startswith("v1"):
            r = {s: {**m, "fused_entropy_accuracy_mean": m.get("fused_accuracy_mean", math.nan)} for s, m in r.items()}
        rows.append([name, len(r)] + [mean_std(values(r, k), 3) for _, k in models])
    out.append("Mean accuracy over the 8 test conditions:\n")
    out.append(table(["setting", "seeds"] + [m for m, _ in models], rows))
    rows = []
    for name, r in sets.items():
        if name.startswith("v1"):
            continue
        fused = values(r, "fused_infomax_accuracy_mean")
        half = values(r, lambda m: 0.5 * (m["clean_student_accuracy_mean"] + m["noisy_student_accuracy_mean"]))
        best = values(r, lambda m: max(m["clean_student_accuracy_mean"], m["noisy_student_accuracy_mean"]) - 0.02)
        means = {k: statistics.mean(v.values()) if v else math.nan for k, v in
                 (("fused", fused), ("half", half), ("best", best))}
        ok = "met" if means["fused"] >= means["half"] and means["fused"] >= means["best"] else "fails"
        if len(fused) < 3:  # the must-beat is on the means over seeds 0-2
            ok = f"{ok} so far, open ({len(fused)} seed{'s' * (len(fused) != 1)})" if fused else "no runs"
        rows.append([name, "fused (infomax) − ½(S_c + S_n)", *paired(fused, half)])
        rows.append([name, "fused (infomax) − (max student − 0.02)", *paired(fused, best)])
        rows.append([name, f"on the means: {means['fused']:.3f} vs {means['half']:.3f} and {means['best']:.3f}"
                     if fused else "on the means over seeds 0-2", ok, "v2 must-beat"])
        sanity = [m.get("fusion_weight_infomax_clean", math.nan) > m.get("fusion_weight_infomax_white0", math.nan)
                  for _, m in sorted(r.items())]
        rows.append([name, "lambda*(clean) > lambda*(white 0 dB), per seed (infomax)",
                     " ".join("yes" if x else "no" for x in sanity) or "—", "sanity"])
        v1_ok = [m.get("fused_infomax_accuracy_mean", 0) >= max(m["clean_student_accuracy_mean"],
                                                                  m["noisy_student_accuracy_mean"])
                 for _, m in sorted(r.items())]
        rows.append([name, "v1 criterion (fused >= the better student), per seed",
                     " ".join("yes" if x else "no" for x in v1_ok) or "—", "v1 line"])
    out.append("\nMust-beat (v2), paired by seed:\n")
    out.append(table(["setting", "comparison", "d (paired)", "verdict"], rows))
    for name, r in sets.items():
        if name.startswith("v1") or not r:
            continue
        rows = []
        for s, m in sorted(r.items()):
            for rule in ("infomax", "entropy"):
                rows.append([s, rule] + [f"{m.get(f'fusion_weight_{rule}_{c}', math.nan):.2f}" for c in CONDITIONS])
            rows.append([s, "oracle"] + [f"{m.get(f'oracle_weight_{c}', math.nan):.2f}" for c in CONDITIONS])
        out.append(f"\nPicked lambda per condition against the oracle's, {name}:\n")
        out.append(table(["seed", "rule"] + list(CONDITIONS), rows))
        rows = []
        for rule in ("infomax", "entropy"):
            for tau in ("0.05", "0.1", "0.2"):
                rows.append([rule, tau, mean_std(values(r, f"fused_{rule}_tau{tau}_accuracy_mean"), 3)])
        out.append(f"\nRule × tau (mean accuracy over conditions; selection only), {name}:\n")
        out.append(table(["rule", "tau", "fused"], rows))
    return "\n".join(out)


def main() -> None:
    for part in (kd, xtime, stkd, betakd, mixclap):
        print(part())
        print()


if __name__ == "__main__":
    main()
