"""Statistical comparison of registration methods (the paper's Section 6 tests).

All tests use the per-pair mean Dice (mean over labels) of each method, on the pairs that every
method scored (matched by ``pair_id``; pairs missing from a method, or with no finite Dice, are
left out and counted):

* every two methods: a paired t-test (``scipy.stats.ttest_rel``) and a Wilcoxon signed-rank
  test (``scipy.stats.wilcoxon``, two-sided), each with its raw p-value and the
  Bonferroni-corrected one (``min(1, p * m)``, ``m = k (k - 1) / 2`` comparisons of k methods);
  or, with ``reference=`` (the paper: PSMamba-Net against each peer), the reference against
  every other method only (``m = k - 1``);
* with three or more methods: a one-way ANOVA (``scipy.stats.f_oneway``) and Tukey's honestly
  significant difference test (``scipy.stats.tukey_hsd``) with 95 % confidence intervals.
  These treat the methods' Dice as independent groups, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psmamba.errors import PsmambaError

__all__ = ["PairwiseTest", "Comparison", "paired_tests", "compare_methods", "bonferroni"]


def bonferroni(p: float, m: int) -> float:
    """Bonferroni-corrected p-value ``min(1, p * m)`` (NaN stays NaN)."""
    return p if math.isnan(p) else min(1.0, p * m)


@dataclass
class PairwiseTest:
    """One method against another on the same pairs (``diff = a - b``)."""

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    t: float
    p_t: float
    p_t_bonferroni: float
    w: float
    p_w: float
    p_w_bonferroni: float


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of ``a`` against ``b`` (same pairs, same order).

    Returns ``{"t", "p_t", "w", "p_w", "mean_diff"}``. When every difference is zero both tests
    are undefined: ``t`` and ``w`` are NaN and both p-values 1 (no evidence of a difference).
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise PsmambaError(f"paired tests need two 1-D samples of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise PsmambaError(f"paired tests need at least 2 common pairs, got {x.size}")
    d = x - y
    out = {"mean_diff": float(d.mean())}
    if np.all(d == 0):
        out.update(t=float("nan"), p_t=1.0, w=float("nan"), p_w=1.0)
        return out
    tt = stats.ttest_rel(x, y)
    wt = stats.wilcoxon(x, y)
    out.update(t=float(tt.statistic), p_t=float(tt.pvalue), w=float(wt.statistic), p_w=float(wt.pvalue))
    return out


@dataclass
class Comparison:
    """Result of :func:`compare_methods`.

    Attributes:
        methods: method names, in the order given.
        pair_ids: the common pairs used, sorted.
        values: ``(methods, pairs)`` per-pair mean Dice.
        left_out: ``{method: pairs of that method not used}``.
        pairwise: one :class:`PairwiseTest` per pair of methods (i < j).
        anova: ``{"F", "p"}`` with three or more methods, else None.
        tukey: one dict per pair of methods (``a``, ``b``, ``diff`` = mean a - mean b, ``p``,
            ``ci_low``, ``ci_high``) with three or more methods, else None.
        reference: the method the paired tests compare with the others (None: every two).
    """

    methods: list[str]
    pair_ids: list[str]
    values: np.ndarray
    left_out: dict[str, int]
    pairwise: list[PairwiseTest] = field(default_factory=list)
    anova: dict[str, float] | None = None
    tukey: list[dict[str, Any]] | None = None
    reference: str | None = None

    def to_text(self) -> str:
        """A readable report: per-method means, the pairwise table, ANOVA and Tukey's HSD."""
        k, n = len(self.methods), len(self.pair_ids)
        m = len(self.pairwise)
        lines = [f"Per-pair mean Dice on {n} pairs common to all {k} methods"]
        dropped = {name: c for name, c in self.left_out.items() if c}
        if dropped:
            lines[-1] += " (left out: " + ", ".join(f"{nm} {c}" for nm, c in dropped.items()) + ")"
        width = max(len(x) for x in self.methods)
        for name, row in zip(self.methods, self.values):
            sd = row.std(ddof=1) if row.size > 1 else 0.0
            lines.append(f"  {name:<{width}}  {row.mean():.4f} ± {sd:.4f}")
        lines.append("")
        against = f"{self.reference} against each other method" if self.reference else "every two methods"
        lines.append(f"Paired tests, {against} (two-sided; Bonferroni over {m} comparison{'s' if m != 1 else ''})")
        lines.append(
            f"  {'A':<{width}}  {'B':<{width}}  {'mean A-B':>9}  {'t':>8}  {'p':>9}  {'p_bonf':>9}"
            f"  {'W':>8}  {'p':>9}  {'p_bonf':>9}"
        )
        for t in self.pairwise:
            lines.append(
                f"  {t.a:<{width}}  {t.b:<{width}}  {t.mean_diff:>+9.4f}  {t.t:>8.3f}  {_p(t.p_t)}  {_p(t.p_t_bonferroni)}"
                f"  {t.w:>8.1f}  {_p(t.p_w)}  {_p(t.p_w_bonferroni)}"
            )
        if self.anova is not None:
            lines.append("")
            lines.append(f"One-way ANOVA: F = {self.anova['F']:.3f}, p = {self.anova['p']:.4g}")
        if self.tukey is not None:
            lines.append("Tukey's HSD (95% confidence interval of mean A - mean B)")
            lines.append(f"  {'A':<{width}}  {'B':<{width}}  {'diff':>9}  {'p':>9}  {'CI':>21}")
            for r in self.tukey:
                lines.append(
                    f"  {r['a']:<{width}}  {r['b']:<{width}}  {r['diff']:>+9.4f}  {_p(r['p'])}"
                    f"  [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                )
        return "\n".join(lines)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per pair of methods (pairwise tests, plus Tukey's columns when present)."""
        tukey = {(r["a"], r["b"]): r for r in self.tukey or []}
        tukey.update({(r["b"], r["a"]): {**r, "diff": -r["diff"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"]}
                      for r in self.tukey or []})
        rows = []
        for t in self.pairwise:
            row = dict(t.__dict__)
            tk = tukey.get((t.a, t.b))
            if tk:
                row.update(tukey_diff=tk["diff"], tukey_p=tk["p"], tukey_ci_low=tk["ci_low"], tukey_ci_high=tk["ci_high"])
            if self.anova:
                row.update(anova_F=self.anova["F"], anova_p=self.anova["p"])
            rows.append(row)
        return rows


def _p(p: float) -> str:
    return f"{p:>9.3g}" if not math.isnan(p) else f"{'nan':>9}"


def compare_methods(per_pair: dict[str, dict[str, float]], reference: str | None = None) -> Comparison:
    """Run the tests of the module docstring on ``{method: {pair_id: mean Dice}}``.

    Args:
        per_pair: the per-pair mean Dice of each method.
        reference: compare this method with each other one (``k - 1`` paired tests, Bonferroni
            over ``k - 1``) instead of every two methods. ANOVA and Tukey's HSD are unchanged.

    Raises:
        PsmambaError: fewer than two methods, fewer than two pairs common to all of them, or a
            reference that is not among the methods.
    """
    from scipy import stats

    methods = list(per_pair)
    if len(methods) < 2:
        raise PsmambaError(f"--compare needs at least two result files, got {len(methods)}")
    common = set.intersection(
        *({p for p, v in per_pair[m].items() if v is not None and math.isfinite(v)} for m in methods)
    )
    ids = sorted(common)
    if len(ids) < 2:
        raise PsmambaError(
            f"--compare: only {len(ids)} pair(s) with a Dice in every file; the pair_id columns must match"
        )
    values = np.array([[per_pair[m][p] for p in ids] for m in methods], dtype=np.float64)
    left_out = {m: len(per_pair[m]) - len(ids) for m in methods}
    k = len(methods)
    if reference is not None and reference not in methods:
        raise PsmambaError(f"reference method {reference!r} is not among {methods}")
    if reference is None:
        tests = [(i, j) for i in range(k) for j in range(i + 1, k)]
    else:
        r0 = methods.index(reference)
        tests = [(r0, j) for j in range(k) if j != r0]
    n_cmp = len(tests)
    comp = Comparison(methods, ids, values, left_out, reference=reference)
    for i, j in tests:
        r = paired_tests(values[i], values[j])
        comp.pairwise.append(PairwiseTest(
            a=methods[i], b=methods[j], n=len(ids),
            mean_a=float(values[i].mean()), mean_b=float(values[j].mean()), mean_diff=r["mean_diff"],
            t=r["t"], p_t=r["p_t"], p_t_bonferroni=bonferroni(r["p_t"], n_cmp),
            w=r["w"], p_w=r["p_w"], p_w_bonferroni=bonferroni(r["p_w"], n_cmp),
        ))
    if k >= 3:
        an = stats.f_oneway(*values)
        comp.anova = {"F": float(an.statistic), "p": float(an.pvalue)}
        hsd = stats.tukey_hsd(*values)
        ci = hsd.confidence_interval(confidence_level=0.95)
        comp.tukey = [
            {
                "a": methods[i], "b": methods[j], "diff": float(hsd.statistic[i, j]), "p": float(hsd.pvalue[i, j]),
                "ci_low": float(ci.low[i, j]), "ci_high": float(ci.high[i, j]),
            }
            for i in range(k) for j in range(i + 1, k)
        ]
    return comp
