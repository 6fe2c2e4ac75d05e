"""How the head on frozen features is fitted and what it reads, compared on validation.

    python -m pipelines.head_probe --params experiments/audio/params.yaml --taps 2 --taps 1 2 3 4
    python -m pipelines.head_probe --taps 2 --moments 2 --set prepare.clip_padding=repeat

For each seed, the job's data is drawn as ``prepare`` draws it (into a temporary folder,
nothing in the workspace is touched), the frozen backbone's pooled output after every layer
group is computed once, and for each list of taps and each pooling the head is fitted twice
on the training split: by gradient steps (``train_head`` as the params file sets it, head
``linear``) and in closed form (``head: ridge``). ``--moments 1`` also scores the first half of
each pooled vector alone: for musicnn, whose ``pool`` puts the means over time before the
standard deviations, that is the time average without the spread.

Prints validation accuracy (what chooses) and test accuracy (what is reported), mean over
the seeds, and writes them to ``--output`` as JSON::

    {"seeds": [0, 1, 2], "rows": [{"taps": [2], "pooling": "mean+std", "head": "ridge",
      "validation_accuracy": [..per seed..], "test_accuracy": [..]}, ...]}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from pipelines.stages.common import EXIT_BAD_INPUT
from tlflax.api import backbone_for, prepare_dataset
from tlflax.config import Params, ParamsError, parse_params
from tlflax.io import write_json
from tlflax.probes import features_by_depth
from tlflax.taps import joined_numpy
from tlflax.train import create_head, head_forward, train_head


def _with_seed(raw: dict, seed: int) -> Params:
    sections = {
        key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()
    }
    for section in sections.values():
        if isinstance(section, dict) and "seed" in section:
            section["seed"] = seed
    return parse_params(sections)


def _accuracy(head, features: np.ndarray, labels: np.ndarray) -> float:
    logits = np.asarray(head_forward(head, {"features": features}, False, None))
    return float(np.mean(logits.argmax(axis=1) == labels))


def _poolings(by_depth: list[np.ndarray], moments: int) -> dict[str, list[np.ndarray]]:
    """The pooled outputs as stored, and with ``moments`` 1 their first halves alone."""
    if moments == 2:
        return {"pooled": by_depth}
    return {"pooled": by_depth, "first half": [d[:, : d.shape[1] // 2] for d in by_depth]}


def compare(raw: dict, seeds: Sequence[int], taps_lists: Sequence[Sequence[int]], moments: int):
    rows: dict[tuple, dict[str, list[float]]] = {}
    for seed in seeds:
        params = _with_seed(raw, seed)
        with tempfile.TemporaryDirectory() as folder:
            task = prepare_dataset(params, Path(folder))
            splits = {split: task.read_inputs(split) for split in ("train", "validation", "test")}
            num_classes = len(task.class_names())
            by_split = features_by_depth(
                backbone_for(params),
                task.pooled_after_each_group,
                splits,
                batch_size=params.extract.batch_size,
            )
        labels = {split: splits[split]["label"] for split in splits}
        heads = {"gradient": params.train_head.model_copy(update={"head": "linear"})}
        heads["ridge"] = params.train_head.model_copy(update={"head": "ridge"})
        # The same for every list of taps: sliced once per seed.
        poolings = {split: _poolings(by_split[split], moments) for split in by_split}
        for taps in taps_lists:
            for pooling in poolings["train"]:
                data = {
                    split: {
                        "features": joined_numpy(poolings[split][pooling], taps),
                        "label": labels[split],
                    }
                    for split in labels
                }
                for name, cfg in heads.items():
                    head = create_head(data["train"]["features"].shape[1], num_classes, cfg)
                    train_head(head, data["train"], data["validation"], cfg)
                    row = rows.setdefault(
                        (tuple(taps), pooling, name), {"validation": [], "test": []}
                    )
                    for split in ("validation", "test"):
                        row[split].append(
                            _accuracy(head, data[split]["features"], data[split]["label"])
                        )
        print(f"seed {seed} done", flush=True)
    return rows


def with_settings(raw: dict, settings: Sequence[str]) -> dict:
    """``raw`` with each ``section.key=value`` of ``settings`` set (the value read as YAML).

    Raises:
      ValueError: a setting without ``=``, or whose section is not a mapping of ``raw``.
    """
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for setting in settings:
        name, equals, value = setting.partition("=")
        section, dot, key = name.partition(".")
        if not (equals and dot and key) or not isinstance(raw.get(section), dict):
            raise ValueError(
                f"--set {setting!r}: expected section.key=value with a section of the "
                "params file, e.g. prepare.clip_padding=repeat"
            )
        raw[section][key] = yaml.safe_load(value)
    return raw


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="experiments/audio/params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--taps", type=int, nargs="+", action="append", required=True)
    parser.add_argument("--moments", type=int, choices=(1, 2), default=1)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params value for this comparison, as dvc exp run -S does",
    )
    args = parser.parse_args(argv)
    try:
        raw = with_settings(yaml.safe_load(Path(args.params).read_text()), args.set)
        parse_params(raw)  # a misspelt key stops here, named, before any data is drawn
    except (ValueError, ParamsError) as error:
        print(f"head_probe: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    rows = compare(raw, args.seeds, args.taps, args.moments)
    print("| taps | pooling | head | validation (mean) | test (mean) |\n|---|---|---|---|---|")
    for (taps, pooling, head), scores in rows.items():
        print(
            f"| {list(taps)} | {pooling} | {head} | {np.mean(scores['validation']):.4f} "
            f"| {np.mean(scores['test']):.4f} |"
        )
    if args.output:
        write_json(
            args.output,
            {
                "seeds": args.seeds,
                "rows": [
                    {
                        "taps": list(taps),
                        "pooling": pooling,
                        "head": head,
                        "validation_accuracy": scores["validation"],
                        "test_accuracy": scores["test"],
                    }
                    for (taps, pooling, head), scores in rows.items()
                ],
            },
        )


if __name__ == "__main__":
    main()
