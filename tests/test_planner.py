"""Properties of the DLI planner over many random batches (label level: no pixels, no DALI)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from dli.common.errors import DliError
from dli.data.manifest import FREE, MT_CLASSES
from dli.pipeline.augment import MT_DEFECT_AUGMENT, defect_augments
from dli.pipeline.planner import DliConfig, EmptyClassWarning, Plan, Planner, plan_batch

C = 5
POOL = {c: list(range(100 * c, 100 * c + 4 + c)) for c in range(C)}


def random_batches(count: int, seed: int = 0, max_size: int = 12) -> list[list[int]]:
    """Batches of random sizes and free shares, class ids drawn with MT-like imbalance."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(1, max_size + 1))
        free_share = rng.uniform(0.0, 1.0)
        classes = rng.choice(C, size=n, p=[0.35, 0.25, 0.15, 0.05, 0.2])
        out.append([FREE if rng.random() < free_share else int(c) for c in classes])
    return out


def counts_of(ids: tuple[int, ...] | list[int], classes: list[int]) -> np.ndarray:
    a = np.asarray(ids)
    return np.array([(a == c).sum() for c in classes])


@pytest.mark.parametrize("fill", ["all-free", "until-uniform"])
def test_only_free_slots_change_and_follow_the_argmin_rule(fill: str) -> None:
    config = DliConfig(fill=fill)
    for b, ids in enumerate(random_batches(400)):
        plan = plan_batch(ids, POOL, np.random.default_rng(b), config, C)
        assert plan.class_ids_before == tuple(ids)
        injected = {i.slot: i for i in plan.injections}
        for slot, (before, after) in enumerate(zip(plan.class_ids_before, plan.class_ids_after, strict=True)):
            if slot in injected:
                assert before == FREE and after == injected[slot].class_id
            else:
                assert after == before
        # Replaying the argmin rule step by step: each injected class is a minimum at its turn.
        counts = counts_of(ids, list(range(C)))
        slots = [i.slot for i in plan.injections]
        assert slots == sorted(slots)
        for item in plan.injections:
            assert counts[item.class_id] == counts.min()
            assert item.source in POOL[item.class_id]
            counts[item.class_id] += 1
        np.testing.assert_array_equal(counts, plan.counts())


def test_all_free_fills_every_free_slot_and_levels_the_batch() -> None:
    config = DliConfig(fill="all-free")
    for b, ids in enumerate(random_batches(400, seed=1)):
        plan = plan_batch(ids, POOL, np.random.default_rng(b), config, C)
        free = sum(1 for c in ids if c == FREE)
        assert len(plan.injections) == free
        before, after = plan.counts(after=False), plan.counts()
        low = after.min()
        injected_classes = {i.class_id for i in plan.injections}
        # Water filling: every class that received a defect ends at most one above the minimum.
        assert all(after[c] <= low + 1 for c in injected_classes)
        assert after.max() - low <= max(1, before.max() - low)
        if free >= int((before.max() - before).sum()):  # enough free slots to level the batch
            assert after.max() - low <= 1


def test_until_uniform_stops_exactly_when_uniform() -> None:
    config = DliConfig(fill="until-uniform")
    stopped_early = 0
    for b, ids in enumerate(random_batches(400, seed=2)):
        plan = plan_batch(ids, POOL, np.random.default_rng(b), config, C)
        free = sum(1 for c in ids if c == FREE)
        counts = plan.counts(after=False).copy()
        for item in plan.injections:  # never injects into an already uniform batch
            assert not (counts.min() == counts.max() > 0)
            counts[item.class_id] += 1
        if len(plan.injections) < free:
            stopped_early += 1
            after = plan.counts()
            assert after.min() == after.max() > 0
        reference = plan_batch(ids, POOL, np.random.default_rng(b), DliConfig(fill="all-free"), C)
        # Same draws in the same order: until-uniform is a prefix of all-free.
        assert [i.to_dict() for i in plan.injections] == [
            i.to_dict() for i in reference.injections[: len(plan.injections)]
        ]
    assert stopped_early > 20


def test_until_uniform_on_a_clean_batch_injects_one_defect_per_class() -> None:
    plan = plan_batch([FREE] * 8, POOL, np.random.default_rng(0), DliConfig(fill="until-uniform"), C)
    assert sorted(i.class_id for i in plan.injections) == list(range(C))
    assert plan.class_ids_after[C:] == (FREE,) * 3


def test_ties_are_broken_at_random() -> None:
    chosen = {
        plan_batch([0, 1, FREE], POOL, np.random.default_rng(s), DliConfig(), 2).injections[0].class_id
        for s in range(40)
    }
    assert chosen == {0, 1}
    # A class present in the batch is never chosen while another is absent.
    for s in range(40):
        plan = plan_batch([0, 0, 1, FREE], POOL, np.random.default_rng(s), DliConfig(), 3)
        assert plan.injections[0].class_id == 2


def test_method_frequency_follows_poisson_prob() -> None:
    for prob in (0.0, 0.3, 1.0):
        methods = [
            i.method
            for b, ids in enumerate(random_batches(300, seed=3))
            for i in plan_batch(
                ids, POOL, np.random.default_rng(b), DliConfig(poisson_prob=prob), C
            ).injections
        ]
        share = methods.count("poisson") / len(methods)
        assert len(methods) > 500
        if prob in (0.0, 1.0):
            assert share == prob
        else:
            assert abs(share - prob) < 0.05


def test_sources_are_distinct_within_a_batch_while_the_class_has_unused_images() -> None:
    pool = {0: [10, 11, 12], 1: [20]}
    plan = plan_batch([FREE] * 8, pool, np.random.default_rng(0), DliConfig(), 2)
    by_class: dict[int, list[int]] = {0: [], 1: []}
    for item in plan.injections:
        by_class[item.class_id].append(item.source)
    assert sorted(by_class[0][:3]) == [10, 11, 12]
    assert set(by_class[1]) == {20}
    # Over many batches every source of a class is used, roughly uniformly.
    sources = [
        i.source
        for s in range(300)
        for i in plan_batch([0, FREE], {0: [1, 2, 3, 4]}, np.random.default_rng(s), DliConfig(), 1).injections
    ]
    frequencies = np.bincount(sources, minlength=5)[1:] / len(sources)
    assert np.all(np.abs(frequencies - 0.25) < 0.08)


def test_same_seed_same_plan_and_json_round_trip() -> None:
    augment = defect_augments(MT_CLASSES)
    for b, ids in enumerate(random_batches(50, seed=4)):
        plans = [
            plan_batch(
                ids, POOL, np.random.default_rng([7, b]), DliConfig(), C, size=(64, 96), augment=augment
            )
            for _ in range(2)
        ]
        assert plans[0].to_dict() == plans[1].to_dict()
        json.dumps(plans[0].to_dict())
    different = {
        json.dumps(plan_batch([FREE] * 6, POOL, np.random.default_rng(s), DliConfig(), C).to_dict())
        for s in range(5)
    }
    assert len(different) == 5


def test_empty_classes_are_left_out_with_one_warning() -> None:
    pool = {0: [1, 2], 1: [], 2: [3]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planner = Planner(pool, 3, DliConfig(), (32, 32), defect_augments(["a", "b", "c"]), ("a", "b", "c"))
        plans = [planner.plan([FREE] * 6, np.random.default_rng(s)) for s in range(20)]
    relevant = [w for w in caught if issubclass(w.category, EmptyClassWarning)]
    assert len(relevant) == 1 and "b" in str(relevant[0].message)
    assert planner.empty_classes == (1,)
    for plan in plans:
        assert all(i.class_id in (0, 2) for i in plan.injections)
        assert len(plan.injections) == 6
        after = plan.counts()
        assert abs(int(after[0]) - int(after[2])) <= 1


def test_nothing_to_inject() -> None:
    config = DliConfig()
    no_free = plan_batch([0, 1, 2, 2], POOL, np.random.default_rng(0), config, C)
    assert no_free.injections == () and no_free.class_ids_after == no_free.class_ids_before
    no_sources = plan_batch([FREE, FREE, 0], {0: [], 1: []}, np.random.default_rng(0), config, 2)
    assert no_sources.injections == () and no_sources.class_ids_after == (FREE, FREE, 0)


def test_augmentation_matrices_follow_the_class_table() -> None:
    augment = defect_augments(MT_CLASSES)
    assert augment[2] is MT_DEFECT_AUGMENT["crack"]
    for b, ids in enumerate(random_batches(200, seed=5)):
        plan = plan_batch(ids, POOL, np.random.default_rng(b), DliConfig(), C, size=(64, 64), augment=augment)
        for item in plan.injections:
            determinant = float(np.linalg.det(item.source_matrix[:, :2]))
            if MT_CLASSES[item.class_id] == "crack":  # no flip, so never a mirror
                assert determinant > 0
            if MT_CLASSES[item.class_id] in ("break", "fray", "uneven"):  # flips only
                assert abs(abs(determinant) - 1.0) < 1e-6


def test_plan_log_line_and_validation() -> None:
    plan = plan_batch([FREE, 0, FREE], POOL, np.random.default_rng(0), DliConfig(poisson_prob=1.0), 2)
    line = plan.as_log_line(("hole", "crack"))
    assert "counts 1/0 -> " in line and "2/2 free slots injected" in line and " P" in line
    assert isinstance(plan, Plan) and len(plan) == 3
    with pytest.raises(ValueError, match="outside"):
        plan_batch([0, 7], POOL, np.random.default_rng(0), DliConfig(), 2)
    with pytest.raises(DliError, match=r"poisson_prob 1\.5"):
        DliConfig(poisson_prob=1.5)
    with pytest.raises(DliError, match="fill 'most'"):
        DliConfig(fill="most")  # type: ignore[arg-type]
    with pytest.raises(DliError, match="dilate_radius -1"):
        DliConfig(dilate_radius=-1)


def test_take_keeps_the_chosen_slots_and_renumbers_their_injections() -> None:
    rng = np.random.default_rng(4)
    class_ids = [FREE, 0, FREE, FREE, 1, FREE]
    pool = {0: [10, 11], 1: [20], 2: [30]}
    plan = plan_batch(class_ids, pool, rng, DliConfig(), 3, batch_indices=[5, 6, 7, 8, 9, 4])
    part = plan.take([0, 3, 4])
    assert part.batch_indices == (5, 8, 9)
    assert part.class_ids_before == (FREE, FREE, 1)
    assert part.class_ids_after == tuple(plan.class_ids_after[p] for p in (0, 3, 4))
    kept = [i for i in plan.injections if i.slot in (0, 3)]
    assert [i.slot for i in part.injections] == [{0: 0, 3: 1}[i.slot] for i in kept]
    assert [(i.class_id, i.source, i.method) for i in part.injections] == [
        (i.class_id, i.source, i.method) for i in kept
    ]
    np.testing.assert_array_equal(part.image_matrices, plan.image_matrices[[0, 3, 4]])
    assert plan.take(range(len(plan))).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="ascending"):
        plan.take([3, 0])
    with pytest.raises(ValueError, match="outside"):
        plan.take([2, 6])
