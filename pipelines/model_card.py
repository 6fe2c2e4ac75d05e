"""One experiment's model card (``MODEL_CARD.md``): what the fine-tuned model is, how it was
made, how well it does, and what it is (and is not) for - every statement from the run's
own files (``pipelines.report_inputs``) and its parameters, none typed in by hand.

Lines whose input is absent are left out. No Prefect, no DVC.
"""

from __future__ import annotations

import html
import statistics
from typing import Any

from pipelines.report_inputs import RunInputs, model_entries, number, split_sizes
from pipelines.reports import MODEL_LABELS
from tlflax.config import Params
from tlflax.config_training import describe_augmentation, uses_batchnorm

# The models the fine-tuned one is compared with, in the card's order.
COMPARED = ("baseline", "head_only", "scratch")


def _md(value: object) -> str:
    """A value from a file as Markdown text: one line, no markup (HTML and pipes escaped)."""
    return html.escape(" ".join(str(value).split()), quote=False).replace("|", "\\|")


def _input_description(params: Params) -> str:
    prepare, extract = params.prepare, params.extract
    if prepare.modality == "text":
        kept = "first" if extract.truncation_side == "right" else "last"
        return (
            f"text, padded or truncated to {extract.max_length} WordPiece tokens "
            f"(a longer text keeps its {kept} tokens)"
        )
    if prepare.modality == "audio":
        return (
            f"audio clips of {prepare.clip_seconds:g} s at {prepare.sample_rate} Hz "
            f"(longer clips keep their {prepare.clip_align}, shorter ones are "
            f"{_PADDED[prepare.clip_padding]})"
        )
    return f"images resized to {extract.image_size}×{extract.image_size} pixels"


_PADDED = {"zeros": "zero-padded", "repeat": "looped to length"}


def _taps(plan: dict) -> str | None:
    taps = plan.get("taps")
    if isinstance(taps, list) and taps:
        depths = ", ".join(str(tap) for tap in taps)
        return (
            f"the pooled outputs of layer groups {depths} (counted from 1), joined; the "
            f"network is cut after group {max(taps)}"
        )
    return None


def model_section(inputs: RunInputs, params: Params | None) -> list[str]:
    plan = inputs.plan or {}
    finetune = plan.get("finetune") if isinstance(plan.get("finetune"), dict) else {}
    lines = ["## Model", ""]
    if params is not None:
        weights = "pretrained weights" if params.extract.pretrained else "random initial weights"
        choice = (inputs.advice or {}).get("backbone")
        # extract.backbone: auto - the stage's params already name the pick; say who picked.
        backbone = choice["chosen"] if isinstance(choice, dict) else params.extract.backbone
        lines.append(f"- Backbone: `{_md(backbone)}`, from {weights}.")
        if isinstance(choice, dict):
            names = ", ".join(candidate["name"] for candidate in choice["candidates"])
            lines.append(
                f"- Chosen by the advise stage (extract.backbone: auto) among {_md(names)}: "
                f"{_md(choice['rule'])}."
            )
    taps = _taps(plan)
    if taps:
        lines.append(f"- Features the head reads: {taps}.")
    if params is not None:
        head = params.train_head
        shape = {
            "mlp": f"an MLP ({head.hidden_dim} hidden units, dropout {head.dropout:g})",
            "ridge": "linear, fitted in closed form (ridge regression, penalty by leave-one-out)",
        }.get(head.head, f"linear (dropout {head.dropout:g})")
        lines.append(f"- Head: {shape}, trained first on the frozen backbone's features.")
    if finetune:
        advised = plan.get("advised_strategy")
        taken = ", ".join(str(key) for key in plan.get("from_advice", []))
        lines.append(
            f"- Transfer strategy: **{_md(finetune.get('strategy', '?'))}**"
            + (
                f" (advised: {_md(advised)}"
                + (f"; from the advice: {_md(taken)}" if taken else "")
                + ")"
                if advised
                else ""
            )
            + "."
        )
    if params is not None:
        lines.append(f"- Input: {_input_description(params)}.")
    return lines if len(lines) > 2 else []


def _subset_size(per_class: int | None, fraction: float | None, of: str) -> str:
    if per_class is not None:
        return f"{per_class} per class"
    if fraction is not None:
        return f"{fraction:.0%} of {of}"
    return f"all of {of}"


def _subset_draw(params: Params) -> str:
    """How prepare drew the subsets (stratified; train from what validation left)."""
    prepare = params.prepare
    parts = []
    if prepare.test_fraction is not None:
        parts.append(f"test: {prepare.test_fraction:.0%} of each class, held out first")
    parts.append(
        "validation: "
        + _subset_size(prepare.validation_per_class, prepare.validation_fraction, "each class")
    )
    parts.append(
        "train: "
        + _subset_size(
            prepare.train_per_class, prepare.train_fraction, "what validation left of each class"
        )
    )
    dedup = (
        " (repeats, and training records also in test, dropped first)"
        if (prepare.deduplicate)
        else ""
    )
    return f"{'; '.join(parts)}; stratified, drawn with prepare.seed {prepare.seed}{dedup}"


def _plan_line(name: str, settings: Any, modality: str | None) -> str | None:
    if not isinstance(settings, dict):
        return None
    keys = (
        "learning_rate",
        "layer_lr_decay",
        "batch_size",
        "epochs",
        "warmup_fraction",
        "weight_decay",
        "batchnorm",
        "label_smoothing",
        "ema_decay",
    )
    not_held = set() if uses_batchnorm(modality) else {"batchnorm"}
    shown_keys = [key for key in keys if key in settings and key not in not_held]
    shown = ", ".join(f"{key} {_md(settings[key])}" for key in shown_keys)
    # WiSE-FT: validation chose among these mixes too.
    if settings.get("weight_mixes"):
        shares = ", ".join(f"{share:g}" for share in settings["weight_mixes"])
        shown += f", weight_mixes {shares}"
    augment = settings.get("augment")
    if isinstance(augment, dict):
        shown += f", augmentation: {describe_augmentation(augment, modality)}"
    return f"  - {name}: {shown}."


def making_section(inputs: RunInputs, params: Params | None) -> list[str]:
    lines = ["## How it was made", ""]
    sizes = split_sizes(inputs)
    dataset = f"`{_md(params.prepare.dataset)}`" if params is not None else "the dataset"
    if sizes:
        counts = ", ".join(f"{count} {split}" for split, count in sizes.items())
        lines.append(f"- Data: {dataset}; examples per split: {counts}.")
    if params is not None:
        lines.append(f"- Subset draw: {_subset_draw(params)}.")
    validation = inputs.validation
    if validation is not None:
        verdict = "PASSED" if validation.get("success") is True else "FAILED"
        lines.append(
            f"- Data validation: **{verdict}** ({_md(validation.get('num_checks', '?'))} checks, "
            f"{_md(validation.get('num_critical_failures', '?'))} critical failures, "
            f"{_md(validation.get('num_warnings', '?'))} warnings; the Great Expectations Data "
            "Docs are linked from the run report)."
        )
    baseline = (inputs.evaluation or {}).get("baseline")
    if isinstance(baseline, dict) and baseline.get("model"):
        lines.append(
            f"- Classical baseline: `{_md(baseline['model'])}`, chosen by "
            "cross-validation on the training split alone."
        )
    plan = inputs.plan or {}
    modality = params.prepare.modality if params is not None else None
    plan_lines = [
        line
        for line in (
            _plan_line("fine-tuning", plan.get("finetune"), modality),
            _plan_line("from scratch", plan.get("scratch"), modality),
        )
        if line
    ]
    if plan_lines:
        lines += [f"- Plan (`metrics/{inputs.experiment}/plan.json`):", *plan_lines]
    reasons = (inputs.advice or {}).get("reasons")
    if isinstance(reasons, list) and reasons:
        lines += ["- Why this strategy (the advise stage):", *(f"  - {_md(r)}" for r in reasons)]
    return lines if len(lines) > 2 else []


def _seed_runs(seeds: dict) -> dict[str, dict]:
    runs = seeds.get("runs")
    return (
        {str(seed): run for seed, run in runs.items() if isinstance(run, dict)}
        if isinstance(runs, dict)
        else {}
    )


def metrics_section(inputs: RunInputs, params: Params | None) -> list[str]:
    entries = model_entries(inputs.evaluation)
    models = (inputs.seeds or {}).get("models")
    lines = ["## Metrics (test set)", ""]
    if isinstance(models, dict) and models:
        seeds = ", ".join(str(seed) for seed in inputs.seeds.get("seeds", []))
        lines += [
            f"Mean ± standard deviation over seeds {seeds} "
            f"(ddof {_md(inputs.seeds.get('std_ddof', '?'))}):",
            "",
            "| model | accuracy | macro-F1 |",
            "|---|---|---|",
        ]
        for name in [n for n in MODEL_LABELS if isinstance(models.get(n), dict)]:
            row = models[name]
            lines.append(
                f"| {MODEL_LABELS[name]} | {number(row.get('accuracy_mean'))} ± "
                f"{number(row.get('accuracy_std'))} | {number(row.get('macro_f1_mean'))} ± "
                f"{number(row.get('macro_f1_std'))} |"
            )
        lines.append("")
    seed = params.finetune.seed if params is not None else 0
    if entries:
        alone = "" if isinstance(models, dict) and models else " (one seed only: no seeds.json)"
        lines += [
            f"This run, seed {seed}{alone}:",
            "",
            "| model | accuracy | macro-F1 | ECE |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {MODEL_LABELS[name]} | {number(s.get('accuracy'))} | {number(s.get('macro_f1'))} "
            f"| {number(s.get('ece'))} |"
            for name, s in entries
        ]
        n_test = (inputs.evaluation or {}).get("n_test")
        if n_test is not None:
            lines += ["", f"On {_md(n_test)} test examples."]
    return lines if len(lines) > 2 else []


def _paired_gain(seeds: dict, other: str, ddof: int) -> str | None:
    """The fine-tuned model's accuracy gain over ``other``, mean ± std over the seeds'
    paired differences, in points."""
    gains = [
        100 * (run["finetune"]["accuracy"] - run[other]["accuracy"])
        for run in _seed_runs(seeds).values()
        if isinstance(run.get("finetune"), dict)
        and isinstance(run.get(other), dict)
        and isinstance(run["finetune"].get("accuracy"), int | float)
        and isinstance(run[other].get("accuracy"), int | float)
    ]
    if len(gains) <= ddof:
        return None
    spread = statistics.stdev(gains) if ddof == 1 else statistics.pstdev(gains)
    return f"{statistics.fmean(gains):+.2f} ± {spread:.2f} pts over {len(gains)} seeds"


def gains_section(inputs: RunInputs) -> list[str]:
    evaluation = inputs.evaluation or {}
    finetune = evaluation.get("finetune")
    if not isinstance(finetune, dict) or not isinstance(finetune.get("accuracy"), int | float):
        return []
    lines = ["## Gains of the fine-tuned model (test accuracy)", ""]
    ddof = (inputs.seeds or {}).get("std_ddof", 1)
    for other in COMPARED:
        scores = evaluation.get(other)
        if not isinstance(scores, dict) or not isinstance(scores.get("accuracy"), int | float):
            continue
        line = (
            f"- over {MODEL_LABELS[other]}: "
            f"{100 * (finetune['accuracy'] - scores['accuracy']):+.2f} pts in this run"
        )
        paired = _paired_gain(inputs.seeds, other, ddof) if inputs.seeds else None
        lines.append(line + (f"; {paired}" if paired else "") + ".")
    return lines if len(lines) > 2 else []


def calibration_section(inputs: RunInputs, params: Params | None) -> list[str]:
    """Each model's expected calibration error, before and after its temperature scaling
    where the evaluation did it."""
    bins = f" ({params.evaluate.calibration_bins} bins)" if params is not None else ""
    lines = ["## Calibration", "", f"Expected calibration error (ECE) on the test set{bins}:", ""]
    for name, scores in model_entries(inputs.evaluation):
        if "ece" not in scores:
            continue
        line = f"- {MODEL_LABELS[name]}: ECE {number(scores['ece'])}"
        if "temperature" in scores:
            line += (
                f" after temperature scaling (temperature {number(scores['temperature'], 3)}, "
                "fitted on the validation split)"
            )
        if "ece_uncalibrated" in scores:
            line += f"; {number(scores['ece_uncalibrated'])} before"
        lines.append(line + ".")
    if len(lines) > 4 and not any(
        "temperature" in scores for _, scores in model_entries(inputs.evaluation)
    ):
        lines += [
            "",
            "No temperature scaling is recorded in evaluate.json: these are the "
            "models' own probabilities.",
        ]
    return lines if len(lines) > 4 else []


def _weakest_classes(inputs: RunInputs, count: int = 2) -> list[tuple[str, float]]:
    results = (inputs.classification or {}).get("finetune")
    per_class = results.get("per_class") if isinstance(results, dict) else None
    if not isinstance(per_class, dict):
        return []
    scored = [
        (str(name), s["f1"])
        for name, s in per_class.items()
        if isinstance(s, dict) and isinstance(s.get("f1"), int | float)
    ]
    return sorted(scored, key=lambda item: item[1])[:count]


def use_section(inputs: RunInputs, params: Params | None) -> list[str]:
    dataset = f"`{_md(params.prepare.dataset)}`" if params is not None else "this dataset"
    evidence = (inputs.advice or {}).get("evidence")
    evidence = evidence if isinstance(evidence, dict) else {}
    classes = list(((inputs.classification or {}).get("finetune") or {}).get("per_class") or {})
    lines = ["## Intended use and limits", ""]
    if classes:
        names = ", ".join(_md(name) for name in classes)
        lines.append(
            f"- Intended use: sorting inputs like {dataset}'s into its "
            f"{len(classes)} classes ({names}); any other input still gets one of "
            "these labels."
        )
    per_class = evidence.get("train_examples_per_class")
    if per_class is not None:
        kind = f", {_input_description(params)}" if params is not None else ""
        lines.append(
            f"- Trained on {_md(per_class)} examples per class (rarest class) of {dataset}{kind}."
        )
    n_test = (inputs.evaluation or {}).get("n_test")
    if n_test is not None:
        lines.append(
            f"- Evaluated only on {dataset}'s held-out test split ({_md(n_test)} "
            "examples): not evaluated on other distributions (other sources, "
            "recording or capture conditions); expect lower accuracy there."
        )
    weakest = _weakest_classes(inputs)
    if weakest:
        shown = ", ".join(f"{_md(name)} (F1 {score:.3f})" for name, score in weakest)
        lines.append(f"- Weakest classes on test: {shown}.")
    return lines if len(lines) > 2 else []


def location_section(inputs: RunInputs) -> list[str]:
    experiment = inputs.experiment
    lines = ["## Where the model is", ""]
    if inputs.export_dir is not None:
        files = sorted(path.name for path in inputs.export_dir.iterdir())
        lines.append(f"- Exported: `models/{experiment}/export/` ({_md(', '.join(files))}).")
    else:
        lines.append(
            f"- Not exported yet (no `models/{experiment}/export/`); the fine-tuned "
            f"weights are in `models/{experiment}/finetune/`."
        )
    lines.append(f"- The run report: `reports/{experiment}/index.html`, beside this card.")
    return lines


def model_card_markdown(inputs: RunInputs, params: Params | None) -> str:
    """The card, section by section; a section without any input is left out."""
    title = f"# Model card: {inputs.experiment}"
    if params is not None:
        title += f" ({params.extract.backbone} on {params.prepare.dataset})"
    sections = [
        model_section(inputs, params),
        making_section(inputs, params),
        metrics_section(inputs, params),
        gains_section(inputs),
        calibration_section(inputs, params),
        use_section(inputs, params),
        location_section(inputs),
    ]
    return "\n\n".join([title, *("\n".join(lines) for lines in sections if lines)]) + "\n"
