"""The loader end to end on CPU: synthetic data (64 px) and, when present, the real Magnetic Tile data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.common.errors import DliError
from dli.data.manifest import FREE, Manifest, Sample, read_dataset
from dli.data.synth import generate
from dli.pipeline.loader import HOST_STAGES, MT_MEAN, MT_STD, Loader, build_loader
from dli.pipeline.planner import DliConfig, EmptyClassWarning, Plan

SIZE = 64
IMAGES = 60


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """60 small MT-like images: 43 defect-free, 17 defects of all five classes."""
    return generate(
        tmp_path_factory.mktemp("data") / "synth", images=IMAGES, seed=3, size_range=((60, 90), (50, 120))
    )


def train_loader(manifest: Manifest, **kwargs: object) -> Loader:
    options: dict[str, object] = {
        "batch_size": 8,
        "image_size": SIZE,
        "train": True,
        "dli": DliConfig(),
        "seed": 0,
    }
    options.update(kwargs)
    return build_loader(manifest, **options)  # type: ignore[arg-type]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        torch.testing.assert_close(x.masks, y.masks, rtol=0, atol=0)
        torch.testing.assert_close(x.class_ids, y.class_ids, rtol=0, atol=0)
        assert (x.plan is None) == (y.plan is None)
        if x.plan is not None:
            assert x.plan.to_dict() == y.plan.to_dict()


def test_training_batches_with_injection(synthetic: Manifest) -> None:
    # The CG changes only the dilated region, which this test can check from the labels alone;
    # the direct solver's windows are checked in test_inject and test_region_boxes.
    loader = train_loader(synthetic, dli=DliConfig(poisson_prob=0.5, poisson_solver="cg"))
    assert loader.num_classes == 5 and len(loader) == IMAGES // 8
    injected = {"poisson": 0, "paste": 0}
    radius = loader.dli.dilate_radius  # type: ignore[union-attr]
    batch_indices = loader.batch_indices()
    for k, (batch, clean) in enumerate(loader.iter_with_clean()):
        n = len(batch)
        assert batch.images.shape == (n, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
        assert batch.masks.shape == (n, 5, SIZE, SIZE) and batch.masks.dtype == torch.float32
        assert batch.class_ids.shape == (n,) and batch.class_ids.dtype == torch.int64
        assert set(torch.unique(batch.masks).tolist()) <= {0.0, 1.0}
        # Normalized with MT statistics; grayscale expanded to three identical channels.
        pixels = batch.images * MT_STD + MT_MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert torch.equal(batch.images[:, 0], batch.images[:, 1]) and torch.equal(
            batch.images[:, 0], batch.images[:, 2]
        )
        plan = batch.plan
        assert plan is not None and plan.batch_indices == tuple(int(i) for i in batch_indices[k])
        assert batch.class_ids.tolist() == list(plan.class_ids_after)
        assert all(c != FREE for c in plan.class_ids_after)  # all-free: every free slot injected
        labelled = batch.masks.flatten(2).any(dim=2)  # (N, C)
        for slot in range(n):
            c = plan.class_ids_after[slot]
            assert not labelled[slot, [k for k in range(5) if k != c]].any(), (
                "label outside the sample's class"
            )
        by_slot = {i.slot: i for i in plan.injections}
        for slot in range(n):
            changed = (pixels[slot, 0] - clean[slot, 0]).abs() > 1e-5
            if slot not in by_slot:
                assert not changed.any(), "an image that received no injection changed"
                continue
            item = by_slot[slot]
            injected[item.method] += 1
            label = batch.masks[slot, item.class_id].bool().numpy()
            assert label.any(), "an injection left an empty label"
            region = (
                label if item.method == "paste" else ndimage.binary_dilation(label, np.ones((5, 5), bool))
            )
            assert radius == 2 and not changed.numpy()[~region].any(), (
                f"{item.method} changed pixels off its region"
            )
            assert changed.numpy()[label].mean() > 0.2
    assert injected["poisson"] > 3 and injected["paste"] > 3


def test_epoch_length_and_last_batch(synthetic: Manifest) -> None:
    assert len(train_loader(synthetic)) == 7
    assert len(train_loader(synthetic, drop_last=False)) == 8
    evaluation = build_loader(synthetic, batch_size=8, image_size=SIZE, train=False)
    assert not evaluation.drop_last and len(evaluation) == 8
    batches = list(evaluation)
    assert [len(b) for b in batches] == [8] * 7 + [4]
    ids = torch.cat([b.class_ids for b in batches]).tolist()
    assert ids == synthetic.class_ids()  # manifest order, no injection
    assert all(b.plan is None for b in batches)
    masks = torch.cat([b.masks for b in batches])
    for n, c in enumerate(ids):
        if c != FREE:
            assert masks[n, c].any()
    defect_free = [n for n, c in enumerate(ids) if c == FREE]
    assert not masks[defect_free].any()


def test_sharding_is_disjoint_covering_and_balanced(synthetic: Manifest) -> None:
    # Training: every step, the shards' batches split one global batch of the epoch's permutation.
    for shards in (1, 3, 7):
        loaders = [
            build_loader(synthetic, batch_size=2, image_size=SIZE, train=True, shard_id=s, num_shards=shards)
            for s in range(shards)
        ]
        assert len({len(loader) for loader in loaders}) == 1, "shards differ in batch count"
        steps = len(loaders[0])
        assert steps == IMAGES // (2 * shards)
        global_batches = loaders[0].global_batches(0)
        permutation = np.concatenate(global_batches)
        assert len(np.unique(permutation)) == len(permutation) == steps * 2 * shards
        for step, global_batch in enumerate(global_batches):
            parts = [loader.batch_indices(0)[step] for loader in loaders]
            assert all(len(p) == 2 for p in parts)
            assert sorted(np.concatenate(parts).tolist()) == sorted(global_batch.tolist())
    # Evaluation: every image exactly once; shards differ by at most one image.
    for shards in (1, 4, 7):
        loaders = [
            build_loader(synthetic, batch_size=4, image_size=SIZE, train=False, shard_id=s, num_shards=shards)
            for s in range(shards)
        ]
        parts = [np.concatenate(loader.batch_indices()) for loader in loaders]
        assert sorted(np.concatenate(parts).tolist()) == list(range(IMAGES))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert [len(loader) for loader in loaders] == [len(loader.batch_indices()) for loader in loaders]
    # What the shards yield is what their orders say.
    loaders = [train_loader(synthetic, batch_size=4, shard_id=s, num_shards=3, dli=None) for s in range(3)]
    yielded = [torch.cat([b.class_ids for b in loader]).tolist() for loader in loaders]
    for loader, ids in zip(loaders, yielded, strict=True):
        expected = [synthetic.samples[i].class_id for batch in loader.batch_indices() for i in batch]
        assert ids == expected


def test_shards_take_their_part_of_the_single_process_plan(synthetic: Manifest) -> None:
    """k shards of batch b see, together, exactly the batch and plan of one process of batch k*b."""
    config = DliConfig(poisson_prob=0.5)
    single = train_loader(synthetic, batch_size=6, dli=config)
    shards = [train_loader(synthetic, batch_size=2, dli=config, shard_id=s, num_shards=3) for s in range(3)]
    for epoch in (0, 1):
        whole = single.plans(epoch)
        parts = [loader.plans(epoch) for loader in shards]
        assert len(whole) == len(parts[0]) > 0
        for step, plan in enumerate(whole):
            for s, shard_plans in enumerate(parts):
                assert_same_plan(shard_plans[step], plan.take(range(s, 6, 3)))
            injected = sum(len(p[step].injections) for p in parts)
            assert injected == len(plan.injections)
    with pytest.raises(DliError, match="drops the last incomplete batch"):
        train_loader(synthetic, batch_size=2, shard_id=0, num_shards=2, drop_last=False)


def assert_same_plan(a: Plan, b: Plan) -> None:
    assert a.to_dict() == b.to_dict()


def test_same_seed_same_batches_and_epochs_differ(synthetic: Manifest) -> None:
    first = list(train_loader(synthetic, seed=5, prefetch=1))
    second = list(train_loader(synthetic, seed=5, prefetch=3))
    assert_same_batches(first, second)
    other_seed = train_loader(synthetic, seed=6)
    assert not np.array_equal(other_seed.global_batches(0), train_loader(synthetic, seed=5).global_batches(0))
    loader = train_loader(synthetic, seed=5)
    loader.set_epoch(1)
    assert not np.array_equal(loader.global_batches(), loader.global_batches(0))
    epoch1 = list(loader)
    assert [b.plan.batch_indices for b in epoch1] == [tuple(map(int, i)) for i in loader.batch_indices(1)]
    assert epoch1[0].plan.batch_indices != first[0].plan.batch_indices


def test_stopping_early_then_iterating_again_and_replay(synthetic: Manifest) -> None:
    loader = train_loader(synthetic, prefetch=3)
    reference = list(train_loader(synthetic, prefetch=3))
    for k, _ in enumerate(loader):
        if k == 1:
            break  # leaves batches in flight; the next iteration must not see them
    assert_same_batches(list(loader), reference)
    iterator = iter(loader)
    next(iterator)
    assert_same_batches(list(loader), reference)  # a second iteration takes over cleanly
    with pytest.raises(RuntimeError, match="iterated again"):
        next(iterator)
    plan = reference[3].plan
    assert plan is not None
    assert_same_batches([loader.replay(plan)], [reference[3]])
    assert loader.plans()[3].to_dict() == plan.to_dict()


def test_the_host_clock_counts_each_assembled_batch_and_every_stage(synthetic: Manifest) -> None:
    loader = train_loader(synthetic)
    assert loader.host_batches == 0 and set(loader.host_seconds.values()) == {0.0}
    batches = list(loader)
    assert loader.host_batches == len(batches) == len(loader)
    assert set(loader.host_seconds) == set(HOST_STAGES)
    assert all(seconds > 0 for seconds in loader.host_seconds.values()), loader.host_seconds
    for k, _ in enumerate(loader):  # a second epoch stopped early adds what it assembled
        if k == 1:
            break
    assert loader.host_batches == len(batches) + 2


def test_training_without_injection_flips_only(synthetic: Manifest) -> None:
    loader = train_loader(synthetic, dli=None)
    batches = list(loader)
    assert all(b.plan is None for b in batches)
    plans = loader.plans()
    assert all(p.injections == () for p in plans)
    flipped = np.concatenate([p.image_matrices[:, 0, 0] < 0 for p in plans])
    assert 0.2 < flipped.mean() < 0.8
    ids = torch.cat([b.class_ids for b in batches]).tolist()
    assert ids == [synthetic.samples[i].class_id for p in plans for i in p.batch_indices]


def test_empty_class_warns_once(synthetic: Manifest) -> None:
    without_fray = synthetic.subset(i for i, s in enumerate(synthetic.samples) if s.class_id != 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = train_loader(without_fray, batch_size=4)
        plans = [b.plan for b in loader]
    relevant = [w for w in caught if issubclass(w.category, EmptyClassWarning)]
    assert len(relevant) == 1 and "fray" in str(relevant[0].message)
    assert all(i.class_id != 3 for p in plans for i in p.injections)  # type: ignore[union-attr]


def test_donors_restrict_the_injection_sources(synthetic: Manifest) -> None:
    """Images left out of `donors` (e.g. defect images with an empty mask) are never injected."""
    defects = [i for i, s in enumerate(synthetic.samples) if s.class_id != FREE]
    # Every second image of each class, so that every class keeps a donor (no EmptyClassWarning).
    by_class: dict[int, list[int]] = {}
    for i in defects:
        by_class.setdefault(synthetic.samples[i].class_id, []).append(i)
    excluded = {i for images in by_class.values() for i in images[1::2]}
    donors = [i for i in defects if i not in excluded]
    plans = [p for epoch in range(3) for p in train_loader(synthetic, donors=donors).plans(epoch)]
    used = {i.source for p in plans for i in p.injections}
    assert used and used <= set(donors)
    everyone = [p for epoch in range(3) for p in train_loader(synthetic).plans(epoch)]
    assert {i.source for p in everyone for i in p.injections} & excluded


def test_arguments_are_validated(synthetic: Manifest) -> None:
    cases = [
        ({"batch_size": 0}, "batch size 0"),
        ({"image_size": 8}, "image size 8"),
        ({"image_size": (64,)}, "image size"),
        ({"shard_id": 2, "num_shards": 2}, "shard id 2"),
        ({"num_shards": 0}, "number of shards 0"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"seed": -1}, "seed -1"),
        ({"prefetch": 0}, "prefetch depth 0"),
        ({"batch_size": 64}, "not one full batch of 64"),
        ({"train": False}, "training only"),
    ]
    for options, message in cases:
        with pytest.raises(DliError, match=message):
            train_loader(synthetic, **options)
    loader = train_loader(synthetic, image_size=(32, 48), dli=None)
    assert next(iter(loader)).images.shape == (8, 3, 32, 48)
    with pytest.raises(DliError, match="epoch -1"):
        loader.set_epoch(-1)


def test_unreadable_files_are_named(synthetic: Manifest, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)
    for replacement, name in [(tmp_path / "gone.jpg", r"gone\.jpg"), (corrupt, r"corrupt\.jpg")]:
        samples = list(synthetic.samples[:8])
        samples[2] = Sample(replacement, None, FREE)
        manifest = Manifest(tuple(samples), synthetic.class_names, synthetic.root)
        loader = build_loader(manifest, batch_size=4, image_size=SIZE, train=False)
        with pytest.raises(DliError, match=name):
            list(loader)
    # Other loaders are unaffected by the failed pipeline.
    assert (
        len(list(build_loader(synthetic.subset(range(8)), batch_size=4, image_size=SIZE, train=False))) == 2
    )


@pytest.mark.realdata
def test_real_magnetic_tile_batches(mt_root: Path) -> None:
    from dli.data.splits import reference_split
    from dli.data.validation import validate

    train, _ = reference_split(mt_root)
    fractions = validate(train).mask_fractions
    donors = [i for i, s in enumerate(train.samples) if s.class_id != FREE and fractions[i] > 0]
    assert len(donors) == len(train) - train.class_ids().count(FREE) - 4  # 4 MT_Uneven masks are empty
    loader = build_loader(
        train, batch_size=8, image_size=128, train=True, dli=DliConfig(), seed=1, donors=donors
    )
    assert len(loader) == len(train) // 8
    for k, (batch, clean) in enumerate(loader.iter_with_clean()):
        plan = batch.plan
        assert plan is not None and batch.images.shape == (8, 3, 128, 128)
        pixels = batch.images[:, 0] * MT_STD + MT_MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        for item in plan.injections:
            assert batch.class_ids[item.slot] == item.class_id
            assert train.samples[item.source].class_id == item.class_id
            assert batch.masks[item.slot, item.class_id].sum() > 0
            assert (pixels[item.slot] - clean[item.slot, 0]).abs().max() > 0.01
        if k == 2:
            break
    assert read_dataset(mt_root).num_classes == 5
