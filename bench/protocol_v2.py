"""Headline tables of benchmark protocol v2's tier 1 (issue 20): one per setting, for the setting
pages and the bench index.

Reads the result files `bench/protocol-v2.sh` wrote (`bench/results/<setting>/<label>/seed<k>.json`)
and prints per setting one row per run label: both headline numbers (mean ± sample std over
seeds), the second model's last-round accuracy, and the verdict against local training and
against FedAvg, paired by seed with `fedkd.sweep`'s rule (a tie when |mean| < std of the per-seed
differences; "beats" needs a non-tie in the same direction on both headline numbers). The
reference for a label is the local / FedAvg label with the same model or variant (`pse-cnn-amax0.2`
against `local-cnn`, `mhpflid-hetero` against `local-hetero`), else the plain one. Labels with no
result yet are absent; a verdict on fewer seeds than the protocol's three names them.

Then one row per seed method's claim (`CLAIMS`: what the specs state, else our reading of the
paper): each comparison it needs, whether it holds (see `judge`), and the specs' v2 diagnostics.

`--write` puts each setting's table between `<!-- headline -->` and `<!-- /headline -->` on its
page and between `<!-- headline:SETTING -->` and `<!-- /headline:SETTING -->` in bench/README.md,
and, when no SETTING is named, the claims between `<!-- claims -->` and `<!-- /claims -->` there
(and their verdicts, method by setting, between `<!-- claims-at-a-glance -->` and its end marker),
so the pages follow the runs without numbers copied by hand.

`--near-best PREFIX SETTING` prints the tier-2 rows to rerun on seeds 1-2 (`bench/protocol-v2.sh`'s
`tier2-seeds`).

Usage: .venv/bin/python bench/protocol_v2.py [--write] [SETTING ...]
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedkd.render import TableOptions, to_markdown
from fedkd.recorder import TIMING_BASIS
from fedkd.report import comparable_timings, timing_basis, was_loaded
from fedkd.sweep import HEADLINES, Comparison, by_label, compare, mean_std, result_rows, second_model_cell

BENCH = Path(__file__).resolve().parent
SETTINGS = ("cifar10-long", "resolution-shift", "mnist-scarce", "fmnist-mild")
TIER1_SEEDS = 3


def reference(label: str, labels: list[str], method: str) -> str | None:
    """The `method` label whose variant tokens all appear in `label`'s, the most specific first."""
    tokens = set(label.split("-")[1:])
    fits = [ref for ref in labels if ref.split("-")[0] == method and set(ref.split("-")[1:]) <= tokens]
    return max(fits, key=lambda ref: len(ref.split("-")), default=None)


def row_order(labels: list[str]) -> list[str]:
    """Rows grouped by their local reference; in each group local, then FedAvg, then the rest, so
    a reader meets the references before the rows compared with them."""
    rank = {"local": 0, "fedavg": 1}
    return sorted(labels, key=lambda label: (reference(label, labels, "local") or "",
                                             rank.get(label.split("-")[0], 2), label))


def describe(c: Comparison, bold: bool = False) -> str:
    """'beats +1.23 ± 0.40 (+ + +) / +0.98 ± 0.31 (+ + +)': the verdict, then in accuracy points
    (last round / mean of last 3) the mean ± std of the per-seed differences and the sign on each
    seed, with the seeds when fewer than tier 1's; `bold`: a beats or loses verdict in bold."""
    word = f"**{c.verdict}**" if bold and c.verdict in ("beats", "loses") else c.verdict
    return f"{word} {' / '.join(p.cell() for p in c.pairs.values())}{c.seeds_note(TIER1_SEEDS)}"


def verdict_cell(rows: list[dict], refs: list[dict]) -> str:
    """`rows` against `refs` paired by seed (`describe`, in bold), '—' when they share no seed."""
    c = compare(rows, refs)
    return "—" if c is None else describe(c, bold=True)


Groups = dict[str, list[dict]]  # run label -> its result rows


def results(setting: str) -> Groups:
    """Run label -> its complete result rows (one per seed) under bench/results/SETTING."""
    return dict(by_label([r for r in result_rows(BENCH / "results" / setting) if r.get("status") == "complete"]))


def headline_table(setting: str) -> str:
    """The setting's headline table in Markdown ('no result yet' before its first run ends)."""
    groups = results(setting)
    if not groups:
        return "No result yet.\n"
    labels = list(groups)
    body = []
    for label in row_order(labels):
        rows = groups[label]
        refs = {method: reference(label, labels, method) for method in ("local", "fedavg")}
        cells = []
        for ref in refs.values():
            cell = "—" if ref in (None, label) else verdict_cell(rows, groups[ref])
            cells.append(cell if cell == "—" else f"{cell} ({ref})")
        body.append([label, *(mean_std([r[k] for r in rows if r.get(k) is not None]) for k in HEADLINES),
                     second_model_cell(rows), *cells, time_cell(rows, groups.get(refs["fedavg"] or "")),
                     str(len(rows))])
    head = ["run", "last round", "mean of last 3", "second model (last round / last 3)",
            "vs local: Δ points last / last 3", "vs FedAvg: Δ points last / last 3", "s/round, fastest seed (× FedAvg)", "seeds"]
    return to_markdown([("table", head, body, TableOptions(text=frozenset({3, 4, 5})))])


def time_cell(rows: list[dict], fedavg: list[dict] | None) -> str:
    """s/round of the fastest seed (each run's median over rounds 2..R) and its ratio to FedAvg's
    fastest of the same model (protocol v2, "Time"), among the seeds that had the machine to
    themselves (`was_loaded`); when every seed was loaded, the fastest, marked loaded. The fastest,
    because a seed that shared the machine with other work is only slower. The ratio takes FedAvg's
    seeds timed comparably only (`comparable_timings`: the same timing basis and a machine of the
    same speed; none: no ratio); a figure of basis 1 (fedkd's allocator setting before 2026-12-06,
    ~1.9x slower on resnet8) is marked "(basis 1)"."""
    def fastest(group: list[dict]) -> dict | None:
        timed = [r for r in group if r.get("seconds_per_round")]
        return min(timed, key=lambda r: (was_loaded(r), r["seconds_per_round"]), default=None)

    mine = fastest(rows)
    if mine is None:
        return "—"
    theirs = fastest([r for r in fedavg or [] if comparable_timings(r, mine)])
    seconds, basis = mine["seconds_per_round"], timing_basis(mine)
    ratio = f" ({seconds / theirs['seconds_per_round']:.1f}×)" if theirs else ""
    return (f"{seconds:.1f}{ratio}" + (" loaded" if was_loaded(mine) or (theirs and was_loaded(theirs)) else "")
            + (f" (basis {basis})" if basis < TIMING_BASIS else ""))


Evidence = Callable[[Groups], str | None]  # one diagnostic, None while its runs are missing


def _values(rows: list[dict], get: Callable[[dict], float | None]) -> list[float]:
    return [v for r in rows if (v := get(r)) is not None]


def method_metric(label: str, key: str, name: str) -> Evidence:
    """A method-reported accuracy difference of `label` (summary.json's extra_metrics), in points,
    mean over seeds."""
    def read(groups: Groups) -> str | None:
        vals = _values(groups.get(label, []), lambda r: (r.get("extra_metrics") or {}).get(key))
        return f"{name} {100 * statistics.fmean(vals):+.2f} points" if vals else None
    return read


def second_model_of(label: str) -> Evidence:
    """The second model (FML's meme, FedKD's mentee, ...): last round / last 3 over seeds."""
    def read(groups: Groups) -> str | None:
        cell = second_model_cell(groups.get(label, []))
        return None if cell == "—" else cell
    return read


def bytes_ratio(label: str, ref: str) -> Evidence:
    """Bytes sent per client and round, as a fraction of `ref`'s."""
    def read(groups: Groups) -> str | None:
        mine = _values(groups.get(label, []), lambda r: r.get("bytes_sent_per_client_round"))
        theirs = _values(groups.get(ref, []), lambda r: r.get("bytes_sent_per_client_round"))
        if not mine or not theirs or not statistics.fmean(theirs):
            return None
        return f"bytes/client/round {statistics.fmean(mine) / statistics.fmean(theirs):.2f}× {ref}'s"
    return read


def versus(label: str, ref: str, subject: str = "") -> Evidence:
    """`label` (named `subject` when it is not the claim's own row) against `ref`, paired by seed."""
    def read(groups: Groups) -> str | None:
        c = compare(groups.get(label, []), groups.get(ref, []))
        return None if c is None else f"{subject + ' ' if subject else ''}vs {ref}: {describe(c)}"
    return read


def factor_gains(label: str, ref: str) -> Evidence:
    """Δ points against `ref` per resolution factor (last round, mean over the seeds both have)."""
    def read(groups: Groups) -> str | None:
        refs = {r.get("seed"): r.get("per_factor") or {} for r in groups.get(ref, [])}
        gains: dict[str, list[float]] = defaultdict(list)
        for r in groups.get(label, []):
            for factor, stats in (r.get("per_factor") or {}).items():
                if (other := refs.get(r.get("seed"), {}).get(factor)) is not None:
                    gains[factor].append(stats["accuracy"] - other["accuracy"])
        if not gains:
            return None
        order = sorted(gains, key=lambda f: int(f[1:]))
        return f"Δ vs {ref} per factor: " + ", ".join(f"{f} {100 * statistics.fmean(gains[f]):+.2f}" for f in order)
    return read


@dataclass(frozen=True)
class Claim:
    """A seed method's claim on one setting: `label` must beat (">") or at least tie (">=") each
    reference label, paired by seed on both headline numbers; `evidence`: the specs' diagnostics."""
    method: str
    setting: str
    label: str
    against: tuple[tuple[str, str], ...]  # (relation, reference label)
    says: str
    evidence: tuple[Evidence, ...] = ()
    case: str = ""  # which of a method's claims on one setting this is (PSE: the model)


def _claims() -> list[Claim]:
    """The claims as the specs state them: PSE's anchors (pse.md g: >= FedRep, >= Ditto, > FedAvg;
    its diagnostics add pse.md k's ablation readings),
    MH-pFLID's (mhpflid.md f: > local-hetero), FedKD's narrow mentee (local-kd.md 2.5). The specs
    state none for FML, FedDistill, FedProto and FedNTD; for those the claim is our reading of each
    paper (ASSUMED): the personalized KD methods beat training alone (FedProto also FedAvg), FedNTD,
    a global-model method, beats FedAvg. PSE's claim is also read on fmnist-mild, where PSE v2 is a
    tier-2 row that `bench/protocol-v2.sh` runs on seeds 0-2 (it beat every tier-1 row on seed 0)."""
    def pse(setting: str, model: str = "") -> Claim:
        v = f"-{model}" if model else ""  # cifar10-long's labels name the model: pse-cnn-amax0.2, local-cnn
        label = f"pse{v}-amax0.2"
        return Claim("PSE", setting, label, ((">", f"fedavg{v}"), (">=", f"fedrep{v}"), (">=", f"ditto{v}")),
                     f"PSE v2{f' ({model})' if model else ''} > FedAvg, >= FedRep, >= Ditto",
                     (versus(label, f"local{v}"),
                      method_metric(label, "post_minus_pre_excitation_accuracy", "excitation post − pre (fused)"),
                      method_metric(label, "post_minus_pre_excitation_local_accuracy", "(local head)"),
                      # pse.md k's reading: does the excitation add to the attention, does it help alone
                      versus(label, f"pse{v}-attention_only"),
                      versus(f"pse{v}-excitation_only-amax0.2", f"local{v}", "excitation only")), model)

    out = [pse("cifar10-long", "cnn"), pse("cifar10-long", "resnet8"), pse("fmnist-mild")]
    out.append(Claim("MH-pFLID", "resolution-shift", "mhpflid-hetero", ((">", "local-hetero"),),
                     "local models > the same architectures trained alone",
                     (second_model_of("mhpflid-hetero"), factor_gains("mhpflid-hetero", "local-hetero"))))
    for setting in ("mnist-scarce", "fmnist-mild"):
        narrow = "fedkd_mentor-mentee_cnn_narrow"
        out += [Claim("FedKD", setting, narrow, ((">=", "fedkd_mentor"),),
                      "mentor with the narrow mentee (~1/4 of the bytes) >= with the full-size mentee",
                      (bytes_ratio(narrow, "fedkd_mentor"), second_model_of(narrow), versus(narrow, "local"))),
                Claim("FML", setting, "fml", ((">", "local"),), "local model > local training",
                      (second_model_of("fml"),)),
                Claim("FedDistill", setting, "feddistill-exclude_self", ((">", "local"),),
                      "leave-own-out teacher > local training", (versus("feddistill-exclude_self", "feddistill"),)),
                Claim("FedProto", setting, "fedproto", ((">", "local"), (">", "fedavg")),
                      "> local training and > FedAvg", (second_model_of("fedproto"),))]
    out.append(Claim("FedNTD", "fmnist-mild", "fedntd", ((">", "fedavg"),), "> FedAvg",
                     # PFLlib averages uniformly, FedAvg by examples: the same weighting separates the KL term
                     (versus("fedntd-aggregation_examples", "fedavg", "with FedAvg's example weighting"),)))
    return out


CLAIMS = _claims()


def judge(claim: Claim, groups: Groups) -> tuple[str, list[str]]:
    """('holds' | 'tie' | 'mixed' | 'fails' | 'open ...' | 'pending', one cell per reference).

    Judged per headline number: ">" needs "beats" on both, ">=" needs no "loses". A claim fails
    when a comparison loses on a number and beats on neither, is mixed when one comparison goes both
    ways, and is a tie otherwise. Before every comparison has tier 1's seeds the verdict is open
    (protocol: a claim is judged on seeds 0-2 only) and says how it reads so far."""
    cells, comparisons = [], []
    for relation, ref in claim.against:
        c = compare(groups.get(claim.label, []), groups.get(ref, []))
        if c is None:
            cells.append(f"{relation} {ref}: pending")
            continue
        comparisons.append((relation, c))
        cells.append(f"{relation} {ref}: {describe(c)}")
    if len(comparisons) < len(claim.against):
        return "pending", cells
    numbers = [(relation, {p.verdict for p in c.pairs.values()}) for relation, c in comparisons]
    if all(v == {"beats"} or (relation == ">=" and "loses" not in v) for relation, v in numbers):
        outcome = "holds"
    elif any("loses" in v and "beats" not in v for _, v in numbers):
        outcome = "fails"
    elif any({"beats", "loses"} <= v for _, v in numbers):
        outcome = "mixed"
    else:
        outcome = "tie"
    seeds = min(len(c.seeds) for _, c in comparisons)
    return (outcome if seeds >= TIER1_SEEDS else f"open ({seeds} of {TIER1_SEEDS} seeds; so far: {outcome})"), cells


def bold_verdict(outcome: str) -> str:
    """A claim's verdict as the tables print it: the settled ones ('holds', 'fails') in bold."""
    return f"**{outcome}**" if outcome in ("holds", "fails") else outcome


@dataclass(frozen=True)
class Verdict:
    """A claim judged on its setting's results: the outcome, one cell per comparison, the diagnostics."""

    claim: Claim
    outcome: str
    cells: list[str]
    evidence: list[str]


def verdicts(settings: Sequence[str] = SETTINGS) -> list[Verdict]:
    """Every claim on `settings`, judged once (each setting's results read once) for both claim tables."""
    groups = {setting: results(setting) for setting in settings}
    out = []
    for claim in CLAIMS:
        if claim.setting in groups:
            found = groups[claim.setting]
            outcome, cells = judge(claim, found)
            out.append(Verdict(claim, outcome, cells, [e for probe in claim.evidence if (e := probe(found))]))
    return out


def claims_table(judged: Sequence[Verdict]) -> str:
    """One row per claim: what it says, each paired comparison, and whether it holds."""
    body = [[v.claim.method, v.claim.setting, v.claim.says, "; ".join(v.cells), bold_verdict(v.outcome),
             "; ".join(v.evidence) or "—"] for v in judged]
    head = ["method", "setting", "claim", "paired by seed (Δ points: last round / last 3)", "verdict",
            "diagnostics"]
    return to_markdown([("table", head, body, TableOptions(left=len(head)))])


def claims_at_a_glance(judged: Sequence[Verdict], settings: Sequence[str] = SETTINGS) -> str:
    """One row per seed method, one column per setting: the verdicts of `claims_table`, the short
    answer a newcomer reads first ("—" where the protocol judges the method on another setting)."""
    cells: dict[str, dict[str, list[str]]] = {}
    for v in judged:
        word = bold_verdict(v.outcome)
        cells.setdefault(v.claim.method, {}).setdefault(v.claim.setting, []).append(
            f"{word} ({v.claim.case})" if v.claim.case else word)
    body = [[method, *(", ".join(by_setting.get(s, [])) or "—" for s in settings)]
            for method, by_setting in cells.items()]
    return to_markdown([("table", ["method", *settings], body, TableOptions(left=1 + len(settings)))])


def near_best(setting: str, prefix: str, points: float = 1.0) -> list[str]:
    """The labels `prefix` or `prefix-...` that have seed 0 but not seeds 1-2 and whose seed-0 result
    is within `points` accuracy points of the best such row on either headline number (including
    rows that have every seed): the tier-2 rows pse.md k reruns on seeds 1-2."""
    groups = {label: rows for label, rows in results(setting).items()
              if label == prefix or label.startswith(f"{prefix}-")}
    seed0 = {label: row for label, rows in groups.items() for row in rows if row["seed"] == 0}
    best = {k: max(vals) for k in HEADLINES if (vals := [r[k] for r in seed0.values() if r.get(k) is not None])}

    def close(row: dict) -> bool:
        return any(row.get(k) is not None and 100 * (top - row[k]) <= points for k, top in best.items())

    return [label for label in sorted(seed0)
            if not {1, 2} <= {r["seed"] for r in groups[label]} and close(seed0[label])]


def replace_between(text: str, tag: str, table: str) -> str:
    """`text` with the lines between `<!-- TAG -->` and `<!-- /TAG -->` replaced by `table`."""
    pattern = re.compile(rf"(<!-- {re.escape(tag)} -->\n).*?(<!-- /{re.escape(tag)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- {tag} --> ... <!-- /{tag} --> markers to write between")
    return pattern.sub(lambda m: m.group(1) + table.rstrip("\n") + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", metavar="SETTING", help=f"default: all of {', '.join(SETTINGS)}")
    parser.add_argument("--write", action="store_true", help="update the setting pages and bench/README.md")
    parser.add_argument("--near-best", metavar="PREFIX", help="print the labels of SETTING starting with PREFIX "
                        "that pse.md k reruns on seeds 1-2 (seed 0 within 1 point of the best), and exit")
    args = parser.parse_args()
    if args.near_best:
        if len(args.settings) != 1:
            parser.error("--near-best needs exactly one SETTING")
        print(" ".join(near_best(args.settings[0], args.near_best)))
        return
    for setting in args.settings:
        if setting not in SETTINGS:
            parser.error(f"setting {setting!r}: one of {', '.join(SETTINGS)}")
    index = BENCH / "README.md"
    for setting in args.settings or SETTINGS:
        table = headline_table(setting)
        if not args.write:
            print(f"## {setting}\n\n{table}")
            continue
        page = BENCH / "results" / setting / "README.md"
        page.write_text(replace_between(page.read_text(), "headline", table))
        index.write_text(replace_between(index.read_text(), f"headline:{setting}", table))
        print(f"{setting}: wrote {page.relative_to(BENCH.parent)} and {index.relative_to(BENCH.parent)}")
    if not args.write:
        chosen = args.settings or SETTINGS
        judged = verdicts(chosen)
        print(f"## Claims at a glance\n\n{claims_at_a_glance(judged, chosen)}\n## Claims\n\n{claims_table(judged)}")
    elif not args.settings:  # the claims tables span every setting
        judged = verdicts()
        text = replace_between(index.read_text(), "claims", claims_table(judged))
        index.write_text(replace_between(text, "claims-at-a-glance", claims_at_a_glance(judged)))
        print(f"claims: wrote {index.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
