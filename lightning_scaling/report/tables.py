"""Text tables of a scaling study: the recipe's prediction table, ``fit``'s summary and the README section.

They take plain result objects (report dicts, :class:`~lightning_scaling.history.RunHistory`); the figures are in
:mod:`lightning_scaling.report.figures`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from lightning_scaling.history import RunHistory, final_loss, live_b_simple

__all__ = ["format_table", "format_fit_table", "format_prediction", "format_runs_table", "fmt_n", "readme_section",
           "update_readme"]

#: Markers around the demo's section of the README (``lightning-scaling demo --readme README.md`` rewrites it).
README_START = "<!-- demo-table:start: written by `lightning-scaling demo --readme README.md` -->"
README_END = "<!-- demo-table:end -->"


def fmt_n(n: float | None) -> str:
    """Compact parameter count: ``98304 -> '98.3k'``.

    Example::

        >>> fmt_n(98304), fmt_n(1.5e6), fmt_n(None)
        ('98.3k', '1.5M', '?')
    """
    if n is None or not math.isfinite(n):
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _num(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not (isinstance(x, (int, float)) and math.isfinite(x)) else format(x, spec)


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _interval(iv: Sequence[float] | None, spec: str) -> str:
    if not iv or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in iv):
        return ""
    return f" [{format(iv[0], spec)}, {format(iv[1], spec)}]"


def _rows_to_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def format_runs_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per run: role, N, batch, steps, final loss, live B_simple, wall time."""
    rows = []
    for name, r in runs.items():
        rows.append([name, r.get("role", ""), fmt_n(r.get("n_params")), _num(r.get("batch_size"), ".0f"),
                     str(r.get("steps", "")), _num(r.get("final_loss")), _num(r.get("live_b_simple"), ".1f"),
                     _num(r.get("wall_s"), ".1f")])
    return _rows_to_text(["run", "role", "N", "batch", "steps", "final loss", "B_simple", "wall s"], rows)


def format_table(report: Mapping[str, Any]) -> str:
    """The side-by-side prediction table of a recipe report (predicted before training vs actual).

    Example::

        >>> rep = {"runs": {}, "prediction": {"n_params": 2e5, "batch_size": 16, "min_loss": 1.5},
        ...        "comparison": {"final_loss": {"predicted": 2.0, "actual": 2.1, "rel_error": -0.048},
        ...                       "critical_batch": {"loss": 2.1, "sweep": 40.0, "live_b_simple": 30.0}}}
        >>> "final loss" in format_table(rep)
        True
    """
    out = []
    runs = report.get("runs") or {}
    if runs:
        out += ["Runs", format_runs_table(runs), ""]
    law = (report.get("law") or {}).get("params")
    cb = report.get("critical_batch") or {}
    if law:
        out.append("Fitted law  L(N, S_min) = e + (N_c/N)^a_N + (S_c/S_min)^a_S,  B_crit(L) = B*/L^(1/a_B)")
        out.append("  " + ", ".join(f"{k}={v:.4g}" for k, v in law.items()))
        # what the fit said about itself (e.g. an irreducible loss at 0: its min loss is then no floor)
        out += [f"  note: {m}" for m in ((report.get("law") or {}).get("info") or {}).get("messages") or ()]
        if cb.get("source") == "none":
            out.append("  critical batch: not fitted (critical_batch='none': runs at one batch size), so the law "
                       "predicts at that batch size only")
        elif cb:
            b_star, alpha_b = _num(_as_float(cb.get("b_star")), ".4g"), _num(_as_float(cb.get("alpha_b")), ".3g")
            out.append(f"  critical batch B_crit(L) = B*/L^(1/alpha_B): B* = {b_star} samples, "
                       f"alpha_B = {alpha_b} (source: {cb.get('source', '?')})")
        out.append("")
    pred, comp = report.get("prediction"), report.get("comparison")
    if pred and comp:
        title = (f"Held-out model: N = {fmt_n(pred['n_params'])} at batch {pred['batch_size']:g}, "
                 f"predicted before it was trained")
        rows = []
        fl = comp["final_loss"]
        rows.append([f"final loss (mean from step {fl.get('from_step', '?')})",
                     _num(fl["predicted"]) + _interval(fl.get("interval"), ".3f"), _num(fl["actual"]),
                     _pct(fl.get("rel_error"))])
        st = comp.get("steps_to_target")
        if st:
            rows.append([f"steps to loss {st['target_loss']:.3f}",
                         _num(st["predicted"], ".0f") + _interval(st.get("interval"), ".0f"),
                         _num(st["actual"], ".0f"), _pct(st.get("rel_error"))])
        cbr = comp.get("critical_batch") or {}
        if cbr:
            rows.append([f"critical batch at loss {cbr['loss']:.3f} (samples)",
                         f"{_num(cbr.get('sweep'), '.1f')} (sweep fit)",
                         f"{_num(cbr.get('live_b_simple'), '.1f')} (live B_simple)", ""])
        rows += [r + ["-", ""] for r in _min_loss_rows(pred)]
        rows += _live_forecast_rows("final loss forecast", comp.get("live_forecast"), fl["actual"])
        others = _schedule_rows(report)
        if others:
            title += f" (also under {', '.join(report['schedule_comparisons'])}: one law fitted on every schedule)"
        out += [title, _rows_to_text(["quantity", "predicted", "actual", "error"], rows + others)]
    elif pred:
        out.append(format_prediction(pred))
    return "\n".join(out).rstrip() + "\n"


def _schedule_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Table rows of the held-out model under the recipe's other LR schedules: predicted before training vs actual.

    Example::

        >>> comp = {"cosine": {"final_loss": {"predicted": 1.80, "actual": 1.78, "rel_error": 0.011,
        ...                                   "from_step": 720}}}
        >>> _schedule_rows({"schedule_comparisons": comp})
        [['final loss under cosine (mean from step 720)', '1.800', '1.780', '+1.1%']]
    """
    rows = []
    for name, comp in (report.get("schedule_comparisons") or {}).items():
        fl = comp["final_loss"]
        rows.append([f"final loss under {name} (mean from step {fl.get('from_step', '?')})",
                     _num(fl["predicted"]) + _interval(fl.get("interval"), ".3f"), _num(fl["actual"]),
                     _pct(fl.get("rel_error"))])
        rows += _live_forecast_rows(f"{name}: forecast", comp.get("live_forecast"), fl["actual"])
    return rows


def _live_forecast_rows(label: str, live: Mapping[str, Any] | None, actual: float) -> list[list[str]]:
    """The row of a forecast of the held-out run from its own first half (none when it was refused)."""
    if not live or "final_loss" not in live:
        return []
    band = _interval([live.get("final_lower", float("nan")), live.get("final_upper", float("nan"))], ".3f")
    return [[f"{label} from its own first {live['observed_until']} steps", _num(live["final_loss"]) + band,
             _num(actual), _pct(live["final_loss"] / actual - 1.0)]]


def readme_section(report: Mapping[str, Any], *, machine: str, cpu_seconds: float) -> str:
    """The README's demo section from a report: the held-out table, where and how long it ran, the B_crit check.

    Example::

        >>> rep = {"prediction": {"n_params": 2e5, "batch_size": 16, "min_loss": 1.5}, "timings": {"total_s": 99.6},
        ...        "comparison": {"final_loss": {"predicted": 2.0, "actual": 2.1, "rel_error": -0.048},
        ...                       "critical_batch": {"loss": 2.1, "sweep": 40.0, "live_b_simple": 30.0}}}
        >>> text = readme_section(rep, machine="x86_64, 2 cores", cpu_seconds=180.2)
        >>> "(x86_64, 2 cores: 100 s wall clock, 180 s CPU time)" in text, "differ by 33%" in text
        (True, True)
    """
    table = format_table({k: v for k, v in report.items() if k not in ("runs", "law", "critical_batch")})
    wall = _as_float((report.get("timings") or {}).get("total_s"))
    lines = [README_START,
             textwrap.fill(f"Table from one run ({machine}: {wall:.0f} s wall clock, {cpu_seconds:.0f} s CPU time):",
                           width=110), "", "```", table.rstrip(), "```", ""]
    cbr = (report.get("comparison") or {}).get("critical_batch") or {}
    sweep, live = _as_float(cbr.get("sweep")), _as_float(cbr.get("live_b_simple"))
    if math.isfinite(sweep) and math.isfinite(live) and live > 0:
        lines.append(textwrap.fill(
            f"Brackets are 90% bootstrap intervals. The critical batch from the batch sweep ({sweep:.1f}) and the "
            f"live gradient noise scale ({live:.1f}) differ by {100 * abs(sweep / live - 1):.0f}%.", width=110))
    else:
        lines.append("Brackets are 90% bootstrap intervals.")
    return "\n".join([*lines, README_END])


def update_readme(readme: str | Path, section: str) -> None:
    """Replace the text between :data:`README_START` and :data:`README_END` in ``readme`` with ``section``.

    Raises:
        ValueError: the file lacks the markers (the section is not written anywhere by surprise).
    """
    path = Path(readme)
    text = path.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{path}: no demo section markers ({README_START!r} ... {README_END!r})")
    path.write_text(text[:i] + section + text[j + len(README_END):])


def _min_loss_rows(pred: Mapping[str, Any]) -> list[list[str]]:
    """The floor of L(N): at a constant LR, and (a law with an annealing term) after a decay to zero."""
    if "min_loss_decayed" not in pred:
        return [["min loss L(N) (infinite steps)",
                 _num(pred.get("min_loss")) + _interval(pred.get("min_loss_interval"), ".3f")]]
    return [["min loss L(N) (infinite steps, constant LR)",
             _num(pred.get("min_loss")) + _interval(pred.get("min_loss_interval"), ".3f")],
            ["min loss L(N) (infinite steps, LR decayed to 0)",
             _num(pred.get("min_loss_decayed")) + _interval(pred.get("min_loss_decayed_interval"), ".3f")]]


def format_prediction(pred: Mapping[str, Any]) -> str:
    """Prediction of a ``fit --predict-n`` without an actual run to compare with."""
    last = _interval([pred["lower"][-1], pred["upper"][-1]] if "lower" in pred else None, ".3f")
    rows = _min_loss_rows(pred) + [[f"loss after {pred['steps'][-1]} steps at batch {pred['batch_size']:g}",
                                    _num(pred["loss"][-1]) + last]]
    if "steps_to_target" in pred:
        rows.append([f"steps to loss {pred['target_loss']:.3f}",
                     _num(pred["steps_to_target"], ".0f") + _interval(pred.get("steps_to_target_interval"), ".0f")])
        rows.append([f"tokens to loss {pred['target_loss']:.3f}", _num(pred.get("tokens_to_target"), ".4g")])
        if "critical_batch_at_target" in pred:  # not with critical_batch="none"
            rows.append([f"critical batch at loss {pred['target_loss']:.3f} (samples)",
                         _num(pred["critical_batch_at_target"], ".1f")])
    return f"Prediction for N = {fmt_n(pred['n_params'])}\n" + _rows_to_text(["quantity", "predicted"], rows)


def format_fit_table(result: Mapping[str, Any], runs: Sequence[RunHistory]) -> str:
    """Readable summary of ``lightning-scaling fit``: runs, fitted constants, predictions."""
    rows = {}
    for r in runs:
        rows[r.name] = {"role": "fit", "n_params": r.n_params, "batch_size": r.batch_size,
                        "steps": int(r.step[-1]) + 1 if len(r) else 0, "final_loss": final_loss(r)[0],
                        "live_b_simple": live_b_simple(r), "wall_s": None}
    return format_table({"runs": rows, **{k: v for k, v in result.items() if k != "runs"}})
