"""Statistical comparison of methods: numbers against hand formulas, pair matching, the CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from psmamba.cli import main
from psmamba.engine.stats import bonferroni, compare_methods, paired_tests
from psmamba.errors import PsmambaError

A = [0.70, 0.72, 0.68, 0.75, 0.71, 0.69]
B = [0.66, 0.70, 0.69, 0.70, 0.65, 0.66]
C = [0.60, 0.64, 0.61, 0.66, 0.62, 0.60]


def hand_t(a, b) -> float:
    """Paired t statistic: mean(d) / (sd(d) / sqrt(n)), sd with n - 1."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean / (sd / math.sqrt(n))


def hand_anova_f(*groups) -> float:
    """One-way ANOVA F = (SS_between / (k - 1)) / (SS_within / (N - k))."""
    allv = [x for g in groups for x in g]
    grand = sum(allv) / len(allv)
    ssb = sum(len(g) * (sum(g) / len(g) - grand) ** 2 for g in groups)
    ssw = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g)
    k, n = len(groups), len(allv)
    return (ssb / (k - 1)) / (ssw / (n - k))


def test_paired_t_matches_hand_formula():
    r = paired_tests(A, B)
    assert r["t"] == pytest.approx(hand_t(A, B), rel=1e-12)
    assert r["mean_diff"] == pytest.approx(np.mean(np.subtract(A, B)))
    # p from the t distribution with n - 1 degrees of freedom, two-sided
    from scipy.stats import t as t_dist

    assert r["p_t"] == pytest.approx(2 * t_dist.sf(abs(hand_t(A, B)), len(A) - 1), rel=1e-9)


def test_wilcoxon_exact_small_case():
    """Five positive differences of distinct sizes: W = 0, exact two-sided p = 2 / 2^5."""
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [0.9, 1.8, 2.7, 3.6, 4.5]
    r = paired_tests(a, b)
    assert r["w"] == 0.0
    assert r["p_w"] == pytest.approx(2 / 32)


def test_identical_methods_give_p_one():
    r = paired_tests(A, A)
    assert math.isnan(r["t"]) and r["p_t"] == 1.0 and r["p_w"] == 1.0


def test_bonferroni():
    assert bonferroni(0.01, 3) == pytest.approx(0.03)
    assert bonferroni(0.5, 3) == 1.0
    assert math.isnan(bonferroni(float("nan"), 3))


def test_compare_three_methods_anova_tukey_and_matching():
    ids = [f"p{i}" for i in range(len(A))]
    per_pair = {
        "A": dict(zip(ids, A)),
        "B": dict(zip(reversed(ids), reversed(B))),  # another order: matched by id, not position
        "C": {**dict(zip(ids, C)), "extra": 0.1},  # a pair only C has is left out
    }
    comp = compare_methods(per_pair)
    assert comp.pair_ids == sorted(ids) and comp.left_out == {"A": 0, "B": 0, "C": 1}
    assert len(comp.pairwise) == 3
    ab = comp.pairwise[0]
    assert (ab.a, ab.b) == ("A", "B")
    assert ab.t == pytest.approx(hand_t(A, B))
    assert ab.p_t_bonferroni == pytest.approx(min(1.0, 3 * ab.p_t))
    assert ab.p_w_bonferroni == pytest.approx(min(1.0, 3 * ab.p_w))
    assert comp.anova["F"] == pytest.approx(hand_anova_f(A, B, C), rel=1e-10)
    tk = {(r["a"], r["b"]): r for r in comp.tukey}
    assert tk[("A", "C")]["diff"] == pytest.approx(np.mean(A) - np.mean(C))
    assert tk[("A", "C")]["p"] < 0.01  # C is clearly worse
    assert tk[("A", "C")]["ci_low"] < tk[("A", "C")]["diff"] < tk[("A", "C")]["ci_high"]
    text = comp.to_text()
    assert "ANOVA" in text and "Tukey" in text and "Bonferroni over 3" in text
    # two methods: no ANOVA / Tukey
    two = compare_methods({"A": per_pair["A"], "B": per_pair["B"]})
    assert two.anova is None and two.tukey is None and len(two.pairwise) == 1


def test_compare_needs_common_pairs():
    with pytest.raises(PsmambaError, match="pair"):
        compare_methods({"A": {"x": 0.5, "y": 0.6}, "B": {"z": 0.5, "w": 0.4}})
    with pytest.raises(PsmambaError, match="two"):
        compare_methods({"A": {"x": 0.5}})


def _write_results(path, method, values, labels=(1, 2)):
    """A per pair x label results CSV whose per-pair mean Dice is ``values``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "pair_id", "label", "dice", "folding_percent", "sdlogj", "seconds"])
        for i, v in enumerate(values):
            # labels at v - 0.05 and v + 0.05: their mean is v
            for lab, d in zip(labels, (v - 0.05, v + 0.05)):
                w.writerow([method, f"p{i}", lab, f"{d:.6f}", "0.1", "0.2", "1.5"])
    return path


def test_compare_cli_prints_table_and_tests(tmp_path, capsys):
    files = [_write_results(tmp_path / f"{n}.csv", n, v) for n, v in (("A", A), ("B", B), ("C", C))]
    out = tmp_path / "stats.csv"
    assert main(["evaluate", "--compare", *map(str, files), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| A | 6 | " in text and "ANOVA" in text and "Tukey" in text
    assert f"{hand_t(A, B):.3f}" in text
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and float(rows[0]["t"]) == pytest.approx(hand_t(A, B), rel=1e-6)
    assert float(rows[0]["anova_F"]) == pytest.approx(hand_anova_f(A, B, C), rel=1e-6)


def test_compare_cli_bad_input(tmp_path, capsys):
    a = _write_results(tmp_path / "a.csv", "A", A)
    assert main(["evaluate", "--compare", str(a), str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    junk = tmp_path / "junk.csv"
    junk.write_text("x,y\n1,2\n")
    assert main(["evaluate", "--compare", str(a), str(junk)]) == 2
    assert "junk.csv" in capsys.readouterr().err
    # one file, or files without shared pairs: the error alone, no table printed before it
    assert main(["evaluate", "--compare", str(a)]) == 2
    captured = capsys.readouterr()
    assert "at least two result files" in captured.err and captured.out == ""
    other = tmp_path / "other.csv"
    head, *rows = a.read_text().splitlines(keepends=True)
    other.write_text(head + "".join(r.replace(",p", ",q", 1) for r in rows))  # pair ids q0.. against p0..
    assert main(["evaluate", "--compare", str(a), str(other)]) == 2
    captured = capsys.readouterr()
    assert "pair_id columns must match" in captured.err and captured.out == ""


def test_compare_cli_summary_over_the_shared_pairs(tmp_path, capsys):
    """The summary table covers the pairs the tests compare; a file's extra pairs are said."""
    a = _write_results(tmp_path / "A.csv", "A", list(A) + [0.1])  # one pair more than B
    b = _write_results(tmp_path / "B.csv", "B", B)
    assert main(["evaluate", "--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert f"| A | {len(B)} | " in text and "left out: A 1 more" in text, text
