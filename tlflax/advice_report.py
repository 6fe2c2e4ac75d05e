"""The advice as a person reads it: ``reports/<experiment>/advice.md``.

The recommendation and why, the paired comparisons behind each call, the probe accuracy
after every layer group, the depths the head reads, and the learning-rate multipliers and
schedule the plan will use.
"""

from __future__ import annotations

from tlflax.advisor import Advice


def advice_markdown(advice: Advice, *, title: str) -> str:
    """The advice, the rules that chose it, the paired comparisons and the probe curve."""
    evidence = advice.evidence
    lines = [
        f"# {title}",
        "",
        f"**Recommendation: {advice.strategy.replace('_', ' ')}**"
        + (
            f", the top {advice.unfreeze_groups} of {evidence.num_groups} layer groups"
            if advice.strategy == "top_k"
            else ""
        )
        + f"; {advice.schedule.steps} steps ({advice.schedule.warmup_steps} warmup).",
        "",
        "## Why",
        "",
        *(f"- {reason}" for reason in advice.reasons),
        "",
        "## Evidence",
        "",
        f"- classes {evidence.num_classes}; training examples {evidence.train_examples} "
        f"({evidence.train_examples_per_class} in the rarest class), "
        f"{evidence.probed_train_examples} probed; validation examples "
        f"{evidence.validation_examples} (majority class {evidence.majority_accuracy:.3f})",
    ]
    if evidence.pretraining_gain is not None:
        lines.append(f"- pretrained minus random-init best probe: {evidence.pretraining_gain:.3f}")
    lines += _backbone_section(advice)
    lines += _comparisons(advice) + _probe_table(advice) + _taps_section(advice)
    lines += _learning_rates(advice)
    return "\n".join(lines)


def _comparisons(advice: Advice) -> list[str]:
    evidence, thresholds = advice.evidence, advice.thresholds
    lines = [
        "",
        "Paired comparisons behind each call: all probes are scored on the same "
        f"{evidence.validation_examples} validation examples, so only those the two probes "
        "classify differently (discordant) decide. A lead is real when it exceeds the call's "
        "threshold (advise.plateau_tolerance, or advise.min_pretraining_gain for pretraining) "
        f"and McNemar's test (two-sided mid-p) is below advise.significance "
        f"({thresholds.significance}).",
        "",
        "| call | compared | validation examples | discordant (right only by the first vs "
        "only by the second) | difference | McNemar mid-p | real difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for comparison in advice.comparisons:
        test = comparison.test
        verdict = "yes" if comparison.real else "no"
        lines.append(
            f"| {comparison.call} | {comparison.better} vs {comparison.worse} | "
            f"{test.examples} | {test.discordant} ({test.first_only_correct} vs "
            f"{test.second_only_correct}) | {test.difference:.3f} "
            f"(threshold {comparison.min_difference}) | {test.p_value:.3g} | {verdict} |"
        )
    return lines


def _probe_table(advice: Advice) -> list[str]:
    evidence, plateau = advice.evidence, advice.plateau_depth
    random_by_depth = {p.groups: p for p in evidence.random_init or ()}
    header = "| groups | last group | dim | probe accuracy | leave-one-out (train) |"
    rule = "|---|---|---|---|---|"
    if random_by_depth:
        header += " random init |"
        rule += "---|"
    lines = ["", "Linear probe (ridge) of the pooled output after each layer group:", ""]
    lines += [header, rule]
    for probe in evidence.pretrained:
        marks = []
        if probe.groups == evidence.best.groups:
            marks.append("best")
        if probe.groups == plateau:
            marks.append("plateau")
        note = f" ({', '.join(marks)})" if marks else ""
        row = (
            f"| {probe.groups} | {probe.group_name}{note} | {probe.feature_dim} | "
            f"{probe.validation_accuracy:.3f} | {probe.leave_one_out_accuracy:.3f} |"
        )
        if random_by_depth:
            row += f" {random_by_depth[probe.groups].validation_accuracy:.3f} |"
        lines.append(row)
    return lines


def _backbone_section(advice: Advice) -> list[str]:
    choice = advice.backbone
    if choice is None:
        return []
    best = choice.candidates[0]
    lines = [
        "",
        "## Backbone (extract.backbone: auto)",
        "",
        f"**{choice.chosen}**, by the rule: {choice.rule}. Each candidate's frozen features "
        "after every layer group were probed as below; the probe here is the ridge probe "
        "of the depths its head would read (taps chosen on train), scored on validation. "
        "The evidence and the plan that follow are the chosen backbone's.",
        "",
        "| rank | backbone | probe (validation) | taps | best single depth | "
        "MFLOPs / example | parameters | against the best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {c.worse: c for c in choice.comparisons}
    for rank, candidate in enumerate(choice.candidates, start=1):
        comparison = verdicts.get(candidate.name)
        if candidate.name == best.name:
            verdict = "the best"
        else:
            assert comparison is not None
            verdict = (
                f"{'really worse' if comparison.real else 'not really worse'} "
                f"(disagree on {comparison.test.discordant}: "
                f"{comparison.test.first_only_correct} vs "
                f"{comparison.test.second_only_correct}, mid-p {comparison.test.p_value:.3g})"
            )
        lines.append(
            f"| {rank} | {candidate.name} | {candidate.probe_accuracy:.3f} | "
            f"{', '.join(map(str, candidate.taps))} | {candidate.best_depth_probe_accuracy:.3f} "
            f"| {candidate.flops_per_example / 1e6:.1f} | {candidate.parameters:,} | {verdict} |"
        )
    return lines


def _taps_section(advice: Advice) -> list[str]:
    if advice.taps is None:
        return []
    evidence, taps = advice.evidence, advice.taps
    return [
        "",
        "## Depths the head reads (extract.taps: auto)",
        "",
        f"Taps {', '.join(map(str, taps.taps))} (layer groups counted from 1): the same "
        f"ridge probe on their joined pooled outputs scores {taps.validation_accuracy:.3f} "
        f"on validation, against {evidence.top.validation_accuracy:.3f} for the last "
        f"group alone and {evidence.best.validation_accuracy:.3f} for the best single "
        "depth. Chosen on the probed training examples alone (greedy forward selection "
        "by leave-one-out accuracy; a depth joins while it adds at least "
        f"advise.min_tap_gain = {advice.thresholds.min_tap_gain}):",
        "",
        "| step | depth added | after group | leave-one-out accuracy (train) |",
        "|---|---|---|---|",
        *(
            f"| {step} | {depth} | {evidence.pretrained[depth - 1].group_name} | {accuracy:.3f} |"
            for step, (depth, accuracy) in enumerate(taps.steps, start=1)
        ),
    ]


def _learning_rates(advice: Advice) -> list[str]:
    lines = ["", "## Learning-rate multipliers (of finetune.learning_rate)", ""]
    lines += ["| trains | multiplier |", "|---|---|"]
    lines += [f"| {name} | {multiplier:g} |" for name, multiplier in advice.lr_multipliers()]
    schedule = advice.schedule
    lines += [
        "",
        f"Schedule ({schedule.rule}): {schedule.steps} steps, linear warmup "
        f"{schedule.warmup_steps}, 10x drops at {', '.join(map(str, schedule.decay_steps))} "
        "(the pipeline runs the same steps with warmup + cosine).",
        "",
        "Settings written in params.yaml's finetune section win over this advice.",
        "",
    ]
    return lines
