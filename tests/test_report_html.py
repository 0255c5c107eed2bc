"""What a reader sees: report.html (phone and desktop), report.md at 80 columns, the terminal
table, and the rules above 200 clients (summary plus the 20 worst and 20 best)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.markdown import Markdown

from fedkd.config import load_config
from fedkd.render import human_bytes
from fedkd.report import client_table, error_line, write_outputs
from fedkd.report_page import MANY_CLIENTS, SHOWN
from report_runs import synthetic_run


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = synthetic_run(tmp_path_factory.mktemp("small") / "run", 12, failed=(3,))
    write_outputs(run)
    return run


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = synthetic_run(tmp_path_factory.mktemp("large") / "run", 300, failed=(7,))
    write_outputs(run)
    return run


def test_error_line_finds_the_exception_after_a_header() -> None:
    text = ("client 3 (round 2, train):\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
            "    raise ValueError('bad')\n    ^^^^^^\nValueError: bad\n")
    assert error_line(text) == "ValueError: bad"
    chained = text + "\nDuring handling of the above exception, another exception occurred:\n\n" + \
        text.split("\n", 1)[1].replace("ValueError: bad", "KeyError: 'w'")
    assert error_line(chained) == "KeyError: 'w'"
    assert error_line("3 valid update(s), fewer than validation.min_clients=4") .startswith("3 valid")
    assert error_line(None) == ""


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 23_281_040, 5 * 1024 ** 3)] == \
        ["0 B", "1023 B", "1.5 KiB", "22.2 MiB", "5.0 GiB"]


def test_html_reads_on_any_screen(small: Path) -> None:
    page = (small / "report.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert page.count('<div class="scroll">') >= 3  # every table scrolls in its own box
    assert re.search(r"<td>\d+\.\d MiB</td>", page)  # bytes a reader can compare
    assert not re.search(r"<td>\d{7,}</td>", page)
    # the failed client: exception line up front, the traceback one click away, its rows marked
    assert '<strong class="error">RuntimeError: injected fault: client 3 ran out of memory</strong>' in page
    assert re.search(r"<details><summary>traceback</summary><pre>client 3 \(round 2, train\):\nTraceback", page)
    assert page.count("<div class=\"failure\">") == 1 and page.count("<tr class=\"failed\">") == 2
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert "<script" not in page and "<link" not in page and "http" not in page  # no network requests
    # captions add something beyond the title
    assert "from client" in page and "worst-10% mean" in page and "dirichlet, alpha 0.5" in page


def test_markdown_fits_80_columns(small: Path) -> None:
    md = (small / "report.md").read_text()
    prose = [ln for ln in md.splitlines() if not ln.startswith(("|", "!["))]
    assert max(map(len, prose)) <= 80
    console = Console(width=80, record=True, color_system=None)
    console.print(Markdown(md))
    rendered = console.export_text()
    assert "…" not in rendered  # no per-client cell cut
    assert "0.5" in rendered and "MiB" in rendered


def test_terminal_table_fits_80_columns(small: Path) -> None:
    console = Console(width=80, record=True, color_system=None)
    console.print(client_table(small))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "…" not in text
    head = next(ln for ln in text.splitlines() if " acc " in ln)
    assert all(h in head.split() for h in ("id", "train", "test", "acc", "loss", "trained", "fails", "sent", "recv"))


def test_heterogeneous_terminal_table_fits_80_columns(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "run", 8, models=["cnn_narrow", "mlp"])
    # a client that was not evaluated in the last round adds the "round" column
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if not (r["phase"] == "evaluate" and r["round"] == 3 and r["partition_id"] == 0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    console = Console(width=80, record=True, color_system=None)
    console.print(client_table(run))
    text = console.export_text()
    assert "…" not in text and "cnn_narrow" in text and " round " in text


def test_above_200_clients_summary_worst_and_best(large: Path) -> None:
    assert MANY_CLIENTS == 200 and SHOWN == 20
    md = (large / "report.md").read_text()
    assert "## 20 worst clients" in md and "## 20 best clients" in md
    client_lines = [ln for ln in md.splitlines() if re.match(r"\| \d+ \| \d+ \| \d+ \| 0\.\d+", ln)]
    assert len(client_lines) == 2 * SHOWN
    rows = list(csv.DictReader((large / "clients.csv").open()))
    assert len(rows) == 300  # the full table stays in clients.csv
    accs = sorted(float(r["accuracy"]) for r in rows)
    assert f"| {accs[0]:.4f} |" in md and f"| {accs[-1]:.4f} |" in md
    assert "seeded sample of 100 of 300 clients" in md and "Histogram and ECDF" in md
    summary = json.loads((large / "summary.json").read_text())
    assert summary["clients_evaluated"] == 300  # the headline stays complete
    console = Console(width=80, record=True, color_system=None)
    table = client_table(large)
    assert table.row_count == 2 * SHOWN
    console.print(table)
    assert "20 worst, then 20 best of 300 clients" in console.export_text()
    assert (large / "report.html").stat().st_size < 400_000


def test_run_json_does_not_repeat_per_client_constants() -> None:
    from fedkd.simulation import run_info

    info = run_info(load_config(None, ["data.num_clients=300"]), "complete", 1.0)
    assert info["client_models"] == ["cnn"]
    hetero = run_info(load_config(None, ["data.num_clients=300", "method.name=local",
                                         "model.per_client=[cnn,mlp]"]), "complete", 1.0)
    assert hetero["client_models"] == ["cnn", "mlp"]


def test_sampled_cohort_of_a_large_population(tmp_path: Path) -> None:
    """A population above 200 of which a cohort of 50 was evaluated (as with
    train.fraction_clients): tables by population size (summary, worst, best), the accuracy
    figure by evaluated clients (a dot each), and captions that say which."""
    run = synthetic_run(tmp_path / "run", 250)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r.get("partition_id") is None or r["partition_id"] % 5 == 0]  # 50 of 250
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_outputs(run)
    md = (run / "report.md").read_text()
    assert "## 20 worst clients" in md and "One dot per client: final accuracy of 50 clients" in md
    assert "Histogram" not in md and "seeded sample of 100 of 250 clients" in md
