"""Linear probes of a frozen backbone at every depth: how task-relevant each layer group is.

The backbone runs once, group by group (``run_groups``, the machinery the prefix cache cuts
at), and the pooled output after every group is kept; each depth then gets a closed-form
ridge-regression probe onto one-hot labels, its penalty chosen by exact leave-one-out on the
training examples, so the validation split is only used to score. Every probe keeps which
validation examples it gets right: all depths are scored on the same examples, so two of
them are compared by a paired test (:func:`paired_test`, McNemar's) on the examples where
they disagree. :mod:`tlflax.advisor` turns the probes into a recommendation.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlflax.data.pipeline import map_batches
from tlflax.ridge import fit_ridge

# batch -> pooled activations (B, D_g) after each layer group g, in forward order.
PooledAfterEachGroup = Callable[[nnx.Module, dict[str, jax.Array]], list[jax.Array]]


def features_by_depth(
    backbone: nnx.Module,
    pooled_after_each_group: PooledAfterEachGroup,
    splits: Mapping[str, dict[str, np.ndarray]],
    *,
    batch_size: int,
) -> dict[str, list[np.ndarray]]:
    """Pooled features after every layer group, for each split, in one pass per batch.

    Args:
      backbone: the backbone, in inference mode.
      pooled_after_each_group: (backbone, batch) -> one pooled array per group, e.g.
        :func:`tlflax.vision.pooled_after_each_group` after image preparation.
      splits: split name -> model inputs (one row per example).
      batch_size: examples per call; every split reuses one compilation.

    Returns:
      split name -> one float32 array (N, D_g) per layer group, in forward order.
    """
    graphdef, state = nnx.split(backbone)

    def all_depths(state: nnx.State, batch: dict[str, jax.Array]) -> list[jax.Array]:
        return pooled_after_each_group(nnx.merge(graphdef, state), batch)

    # One output array per batch (map_batches' contract); split back by width afterwards.
    step = jax.jit(lambda state, batch: jnp.concatenate(all_depths(state, batch), axis=1))
    first = next(iter(splits.values()))
    one_example = {key: value[:1] for key, value in first.items()}
    widths = [leaf.shape[-1] for leaf in jax.eval_shape(all_depths, state, one_example)]
    boundaries = np.cumsum(widths)[:-1]
    return {
        name: np.split(
            map_batches(
                functools.partial(step, state),
                arrays,
                batch_size=batch_size,
                description=f"probe {name}",
            ).astype(np.float32),
            boundaries,
            axis=1,
        )
        for name, arrays in splits.items()
    }


def pack_correct(correct: np.ndarray) -> str:
    """Per-example correctness as text: one bit per example, packed and base64-encoded.

    A probe's correctness on every validation example travels in ``advice.json``: packed,
    it costs 1/6 of a character per example (a list of 0/1 would cost 3), and a string keeps
    the dataclasses that hold it hashable and comparable.
    """
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool))).decode("ascii")


def unpack_correct(packed: str, examples: int) -> np.ndarray:
    """The boolean array :func:`pack_correct` packed (``examples`` long: drops the padding)."""
    bits = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    return np.unpackbits(bits, count=examples).astype(bool)


@dataclass(frozen=True)
class ProbeResult:
    """A linear probe of one depth: its validation accuracy, and what chose its penalty."""

    validation_accuracy: float
    leave_one_out_accuracy: float
    relative_penalty: float
    # Which validation examples the probe gets right (pack_correct, in split order): the
    # pairs a paired test between two depths is computed from.
    validation_correct: str
    validation_examples: int


def ridge_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    num_classes: int,
) -> ProbeResult:
    """Ridge regression onto one-hot labels (a least-squares linear classifier,
    :func:`tlflax.ridge.fit_ridge`), scored on validation.

    The penalty is the one of :data:`RELATIVE_PENALTIES` with the best exact leave-one-out
    accuracy on the training examples, so validation only scores.
    """
    fit = fit_ridge(train_features, train_labels, num_classes)
    correct = fit.scores(validation_features).argmax(axis=1) == validation_labels
    return ProbeResult(
        validation_accuracy=float(np.mean(correct)),
        leave_one_out_accuracy=fit.leave_one_out_accuracy,
        relative_penalty=fit.relative_penalty,
        validation_correct=pack_correct(correct),
        validation_examples=len(correct),
    )


@dataclass(frozen=True)
class DepthProbe:
    """The probe of the pooled output after ``groups`` layer groups (the last one named)."""

    groups: int
    group_name: str
    feature_dim: int
    validation_accuracy: float
    leave_one_out_accuracy: float
    relative_penalty: float
    validation_correct: str  # pack_correct of which validation examples it gets right
    validation_examples: int

    def correct(self) -> np.ndarray:
        """Whether the probe gets each validation example right (bool, in split order)."""
        return unpack_correct(self.validation_correct, self.validation_examples)


def group_name(pattern: str) -> str:
    """A layer group's readable name from its regex: '^blocks/3/' -> 'blocks/3'."""
    return pattern.removeprefix("^").removesuffix("/")


def probe_depths(
    train_by_depth: Sequence[np.ndarray],
    train_labels: np.ndarray,
    validation_by_depth: Sequence[np.ndarray],
    validation_labels: np.ndarray,
    *,
    num_classes: int,
    group_patterns: Sequence[str],
) -> tuple[DepthProbe, ...]:
    """A :func:`ridge_probe` per depth; the arrays are those of :func:`features_by_depth`."""
    if not len(train_by_depth) == len(validation_by_depth) == len(group_patterns):
        raise ValueError(
            f"{len(train_by_depth)} train and {len(validation_by_depth)} validation depths "
            f"for {len(group_patterns)} layer groups"
        )
    probes = []
    for depth, (train, validation, pattern) in enumerate(
        zip(train_by_depth, validation_by_depth, group_patterns, strict=True), start=1
    ):
        result = ridge_probe(train, train_labels, validation, validation_labels, num_classes)
        probes.append(DepthProbe(depth, group_name(pattern), train.shape[1], **asdict(result)))
    return tuple(probes)


# --------------------------------------------------------------------------------------------
# Comparing two probes scored on the same validation examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test of two probes scored on the same validation examples.

    Examples both probes get right, or both get wrong, say nothing about which is better;
    only the discordant ones - right by one probe, wrong by the other - do. Under equal
    accuracy each discordant example favours either probe with probability 1/2, so
    ``first_only_correct`` is Binomial(``discordant``, 1/2); ``p_value`` is its two-sided
    mid-p (:func:`mcnemar_mid_p`). Two depths with correlated errors (one gets right a
    subset of what the other does) disagree on few examples, all one way: a small accuracy
    difference is then already significant. Independent errors disagree on many, both ways:
    the same difference is then noise.
    """

    examples: int
    first_only_correct: int
    second_only_correct: int
    p_value: float

    @property
    def discordant(self) -> int:
        """Examples exactly one of the two probes gets right: the only ones that decide."""
        return self.first_only_correct + self.second_only_correct

    @property
    def difference(self) -> float:
        """First probe's accuracy minus the second's (the discordant counts' difference)."""
        return (self.first_only_correct - self.second_only_correct) / max(self.examples, 1)


def mcnemar_mid_p(first_only_correct: int, second_only_correct: int) -> float:
    """Two-sided mid-p of McNemar's exact test on the discordant pairs.

    With ``n`` discordant pairs and ``k`` the smaller of the two counts, X ~ Binomial(n, 1/2):
    ``p = 2 (P(X < k) + P(X = k) / 2)``, at most 1. The exact conditional test
    (``2 P(X <= k)``, scipy's ``binomtest``) counts the observed outcome whole, which makes
    it conservative - with few discordant pairs its real false-positive rate is far below
    the nominal level; the mid-p version stays close to nominal (Fagerland, Lydersen & Laake
    2013, "The McNemar test for binary matched-pairs data", BMC Med. Res. Methodol. 13:91).
    Integer arithmetic keeps it exact for any ``n``.
    """
    discordant = first_only_correct + second_only_correct
    smaller = min(first_only_correct, second_only_correct)
    below, binomial = 0, 1  # sum of C(n, i) for i < k, and C(n, i) for the current i
    for i in range(smaller):
        below += binomial
        binomial = binomial * (discordant - i) // (i + 1)
    return min(1.0, (2 * below + binomial) / 2**discordant)


def paired_test(first_correct: np.ndarray, second_correct: np.ndarray) -> PairedTest:
    """McNemar's test of two probes from their correctness on the same examples.

    Raises:
      ValueError: the two were not scored on the same number of examples.
    """
    first, second = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
    if first.shape != second.shape:
        raise ValueError(f"paired correctness of {first.shape} and {second.shape} examples")
    first_only, second_only = int(np.sum(first & ~second)), int(np.sum(second & ~first))
    return PairedTest(len(first), first_only, second_only, mcnemar_mid_p(first_only, second_only))
