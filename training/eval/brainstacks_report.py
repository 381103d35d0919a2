"""The report of `training eval brainstacks`: a table per zoo, zoos side by side, and a chart."""

from __future__ import annotations

from pathlib import Path

SETTINGS = ("base", "ungated", "routed", "routed_other_weighting", "oracle")


def format_report(report: dict) -> str:
    lines = [f"{report['base']}, stacks {'on earlier domains' if report['stacked'] else 'on the base alone'}"
             f" ({report['seconds'] / 60:.1f} min, {report['replies_generated']} replies generated)",
             "exact match on held-out phrasings [95% interval], n = distinct prompts"]
    lines.append(f"{'set':<10}{'n':>5}" + "".join(f"{s:>24}" for s in SETTINGS))
    for name, row in report["settings"].items():
        cells = "".join(f"{row[s]['exact_match']:>8.2f} [{row[s]['interval'][0]:.2f},{row[s]['interval'][1]:.2f}]"
                        .rjust(24) for s in SETTINGS)
        lines.append(f"{name:<10}{row['distinct_prompts']:>5}{cells}")
    lines.append(f"{'':<15}" + "".join(f"{'loss ' + format(row_loss, '.3f'):>24}" for row_loss in
                                      (sum(r[s]['loss'] for r in report['settings'].values()) / len(report['settings'])
                                       for s in SETTINGS)) + "  (mean answer loss)")
    lines.append("oracle prompts (the first of each kind): " + ", ".join(
        f"{name} n={row['oracle']['n']} oracle {row['oracle']['exact_match']:.2f} routed "
        f"{row['oracle']['routed_on_the_same_prompts']['exact_match']:.2f}" for name, row in report["settings"].items()))
    router = report["router"]
    lines.append(f"routed: the router's {router['weighting']} weighting, gate threshold {router['gate_threshold']}; "
                 f"routed_other_weighting: {router['other_weighting']} weighting")
    lines.append(f"ungated and routed at {router['other_weighting']} weighting ran on the first prompts of each kind: " + ", ".join(
        f"{name} n={row['ungated']['n']}" for name, row in report["settings"].items()))
    lines.append("answer in reply (any format): " + ", ".join(
        f"{name} base {row['base']['answer_in_reply']:.2f} routed {row['routed']['answer_in_reply']:.2f}"
        for name, row in report["settings"].items()))
    lines.append("routed exact match by form (held-out forms: never trained on; held-out phrasings: of the forms "
                 "training had) [95% interval] n, base beside it:")
    for name, row in report["settings"].items():
        if "by_form" not in row:
            continue
        forms, base = row["by_form"]["routed"], row["by_form"]["base"]
        cells = [f"{part.replace('_', ' ')} {forms[part]['exact_match']:.2f} [{forms[part]['interval'][0]:.2f},"
                 f"{forms[part]['interval'][1]:.2f}] n={forms[part]['n']} (base {base[part]['exact_match']:.2f})"
                 for part in ("held_out_forms", "held_out_phrasings")]
        extra = row["extra_step"]
        where = extra.get("by_form", {})
        split = (f" (held-out forms {where['held_out_forms']['exact_match']:.2f}, held-out phrasings "
                 f"{where['held_out_phrasings']['exact_match']:.2f})" if where else "")
        lines.append(f"  {name:<10} {'; '.join(cells)}; held out as a form: {', '.join(forms['forms_held_out'])}; "
                     f"answers with a step more than asked: {extra['exact_match']:.2f} (n={extra['n']}){split}")
        if "by_kind" in row:
            lines.append("  " + " " * 10 + " routed by kind: " + ", ".join(
                f"{kind} {v['exact_match']:.2f} (n={v['n']})" for kind, v in row["by_kind"].items()))
    if "math" in report["settings"] and "single_operation" in report["settings"]["math"]:
        single = report["settings"]["math"]["single_operation"]
        lines.append(f"one-operation arithmetic under the served route: {single['exact_match']:.2f} "
                     f"[{single['interval'][0]:.2f},{single['interval'][1]:.2f}] n={single['n']}")
    g = report["general"]
    lines.append(f"everyday prompts (n={g['n']}): routed answer == base answer {g['same_as_base']:.2f} "
                 f"[{g['interval'][0]:.2f},{g['interval'][1]:.2f}]; router picked no domain {g['no_domain']:.2f}; "
                 "by family: " + ", ".join(f"{k} {v:.2f}" for k, v in g.get("families", {}).items()))
    if "misrouted" in g:
        m = g["misrouted"]
        lines.append(f"  sent to a domain: {m['n']}, answer changed: {m['changed']}, taken over by a domain's "
                     f"'Answer:' format: {m['took_a_domains_format']}")
    lines.append("router top-1 on single-domain prompts: " + ", ".join(f"{d} {a:.2f}" for d, a in router["top1"].items()))
    lines.append(f"cross-domain prompts routed to >= 2 domains (no floor): {router['cross_two_or_more_domains']:.2f}")
    lines.append("router on probe phrasings (own domain alone; general: none): " + ", ".join(
        f"{d} {r['as_wanted']:.2f} [{r['interval'][0]:.2f},{r['interval'][1]:.2f}] n={r['n']}"
        for d, r in router["probe_phrasings"].items()))
    lines.append(f"  router applied: {router['cross_applied_combinations'][:6]}")
    lines.append(f"  outcome discovery found best: {router['cross_discovered_combinations'][:6]}")
    f = report["forgetting"]
    lines.append("forgetting under the served route: exact match at freeze -> after a later domain (paired)")
    for row in f["rows"]:
        lines.append(f"  after {row['after_domain']:<10} {row['domain']:<10} n={row['n']:<4} {row['before']:.2f} -> "
                     f"{row['after']:.2f}  change {row['change']:+.3f} "
                     f"[{row['change_interval'][0]:+.3f},{row['change_interval'][1]:+.3f}]  p={row['p_value']:.3f}")
    p = f["pooled_after_last"]
    lines.append(f"  pooled after the last domain: n={p['n']} {p['before']:.3f} -> {p['after']:.3f}, change "
                 f"{p['change']:+.3f} [{p['change_interval'][0]:+.3f},{p['change_interval'][1]:+.3f}], "
                 f"McNemar p={p['p_value']:.3f}")
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """Zoos side by side: routed exact match per set, general prompts kept, pooled forgetting."""
    names = list(reports)
    sets = list(next(iter(reports.values()))["settings"])
    lines = ["routed exact match by zoo (the same held-out prompts)", f"{'set':<14}" + "".join(f"{n:>22}" for n in names)]
    for s in sets + ["base"]:
        label, key = (s, "routed") if s != "base" else ("mean base", "base")
        cells = []
        for n in names:
            rows = reports[n]["settings"]
            value = (rows[s]["routed"]["exact_match"] if s != "base"
                     else sum(r[key]["exact_match"] for r in rows.values()) / len(rows))
            cells.append(f"{value:>22.2f}")
        lines.append(f"{label:<14}" + "".join(cells))
    lines.append(f"{'general same':<14}" + "".join(f"{reports[n]['general']['same_as_base']:>22.2f}" for n in names))
    lines.append(f"{'forgetting':<14}" + "".join(
        f"{reports[n]['forgetting']['pooled_after_last']['change']:>+15.3f} p={reports[n]['forgetting']['pooled_after_last']['p_value']:.2f}"
        for n in names))
    return "\n".join(lines)


def save_chart(path: Path, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 3.8), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        sets = list(report["settings"])
        width = 0.16
        for k, setting in enumerate(SETTINGS):
            values = [report["settings"][s][setting]["exact_match"] for s in sets]
            errors = [[v - report["settings"][s][setting]["interval"][0] for v, s in zip(values, sets)],
                      [report["settings"][s][setting]["interval"][1] - v for v, s in zip(values, sets)]]
            ax.bar([x + (k - 2) * width for x in range(len(sets))], values, width, yerr=errors, capsize=2,
                   label=setting)
        ax.set_xticks(range(len(sets)), sets, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}: exact match, held-out phrasings", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
