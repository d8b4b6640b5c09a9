"""class_error: the error of the matched queries' classes over all matched objects, not a mean over batches (an
image without objects has no matched query, so no error: not 100 %), also over two processes."""
import multiprocessing
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import engine
from models.criterion import HybridCriterion, SetCriterion
from models.matcher import HungarianMatcher

NUM_CLASSES, QUERIES = 3, 4
RIGHT, WRONG = 0, 1  # FixedModel's queries all predict class 0


class FixedModel(nn.Module):
    """Every query predicts class 0 and the same box; one parameter (the logits' shift) for the optimizer."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, samples):
        logits = torch.full((samples.shape[0], QUERIES, NUM_CLASSES), -5.0)
        logits[..., RIGHT] = 5.0
        boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).expand(samples.shape[0], QUERIES, 4)
        return {"pred_logits": logits + self.shift, "pred_boxes": boxes + 0 * self.shift}


def criterion():
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2, 5, 2), {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2},
                        ["labels", "boxes"])


def batch(*labels_per_image):
    """(images [B, 3, 8, 8], targets) with the given labels per image (an empty tuple: no object)."""
    targets = [{"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] *
                len(labels)).reshape(-1, 4), "image_id": torch.tensor(i), "orig_size": torch.tensor([8, 8])}
               for i, labels in enumerate(labels_per_image)]
    return torch.zeros(len(targets), 3, 8, 8), targets


def train_epoch(batches):
    """train_one_epoch of FixedModel over `batches`: (stats, the scalars of every iteration, console output)."""
    model = FixedModel()
    scalars = []
    stats = engine.train_one_epoch(model, criterion(), batches, torch.optim.SGD(model.parameters(), lr=0.0), "cpu",
                                   0, print_freq=1, after_iteration=lambda i, logger, s: scalars.append(dict(s)))
    return stats, scalars


# one wrong object of 1, then 3 right ones, then an image without objects: 1 error in 4 matched objects
MIXED = [batch((WRONG,)), batch((RIGHT, RIGHT), (RIGHT,)), batch(())]


def test_a_batch_without_objects_counts_for_nothing():
    """The criterion gives upstream's 100 for a batch without objects (accuracy 0 of no target; its loss dict is
    compared with upstream's); the engine weighs it by its matched objects: none."""
    outputs = FixedModel()(torch.zeros(2, 3, 8, 8))
    empty = batch((), ())[1]
    losses = criterion()(outputs, empty)
    assert losses["class_error"].item() == 100.0
    weighted = engine.weigh_class_errors(losses, empty, outputs)
    assert engine.class_errors(weighted) == {} and "class_error" not in weighted and engine.MATCHED not in weighted
    hybrid = HybridCriterion(criterion(), k_one2many=2)(
        {**outputs, "pred_logits_one2many": outputs["pred_logits"], "pred_boxes_one2many": outputs["pred_boxes"]},
        empty)
    weighted = engine.weigh_class_errors(hybrid, empty, outputs)
    assert engine.class_errors(weighted) == {} and not any(k.startswith("class_error") for k in weighted)
    # a batch with objects: the error of its matched queries, as before
    assert criterion()(outputs, batch((WRONG,), (RIGHT,))[1])["class_error"].item() == pytest.approx(50.0)


def test_an_epoch_of_images_without_objects_logs_no_class_error(capsys):
    stats, scalars = train_epoch([batch(()), batch((), ())])
    assert "class_error" not in stats and "class_error_unscaled" not in stats
    assert all("class_error" not in s for s in scalars)
    assert "loss" in stats
    output = capsys.readouterr().out
    assert "cls_err -" in output and "cls_err 100" not in output and "class_error - (no objects)" in output


def test_the_epoch_class_error_is_weighted_by_the_matched_objects(capsys):
    stats, scalars = train_epoch(MIXED)
    # each step with objects logs its own error, as before; the empty one none
    assert [s.get("class_error") for s in scalars] == [100.0, 0.0, None]
    assert scalars[0]["class_error_unscaled"] == 100.0
    # 1 wrong of 4 matched objects (a mean over batches would give (100 + 0 + 100) / 3 or (100 + 0) / 2)
    assert stats["class_error"] == pytest.approx(25.0)
    assert stats["class_error_unscaled"] == pytest.approx(25.0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch 0 [")]
    assert [line.split("cls_err ")[1].split()[0] for line in lines] == ["100.0", "0.0", "0.0"]  # the last value


def test_the_evaluation_class_error_is_weighted_by_the_matched_objects(monkeypatch):
    class NoCocoEvaluation:
        def __init__(self, *args, **kwargs):
            self.coco_eval = {"bbox": types.SimpleNamespace(stats=np.zeros(12))}

        def update(self, results):
            pass

        synchronize_between_processes = accumulate = summarize = lambda self, *args: None

    class PostProcess:
        topk = 100

        def __call__(self, outputs, sizes):
            return [{} for _ in sizes]

    monkeypatch.setattr(engine, "CocoEvaluator", NoCocoEvaluation)
    stats, _ = engine.evaluate(FixedModel(), criterion(), {"bbox": PostProcess()}, MIXED, None, "cpu", table=False)
    assert stats["class_error"] == pytest.approx(25.0) and stats["class_error_unscaled"] == pytest.approx(25.0)
    stats, _ = engine.evaluate(FixedModel(), criterion(), {"bbox": PostProcess()}, [batch(())], None, "cpu")
    assert "class_error" not in stats


def errors_of(loss_dict, targets, outputs):
    """class_errors of one process (reduce_dict returns its dict unchanged), and the dict it leaves."""
    weighted = engine.weigh_class_errors(loss_dict, targets, outputs)
    return engine.class_errors(weighted), weighted


def test_class_errors_pops_the_errors_and_weighs_them():
    outputs = FixedModel()(torch.zeros(2, 3, 8, 8))
    loss_dict = {"loss_ce": torch.tensor(1.0), "class_error": torch.tensor(50.0),
                 "class_error_one2many": torch.tensor(25.0)}
    errors, left = errors_of(loss_dict, batch((RIGHT,), (WRONG, RIGHT, RIGHT))[1], outputs)
    assert errors == {"class_error": (50.0, 4), "class_error_one2many": (25.0, 4)}
    assert left.keys() == {"loss_ce"}
    # an image with more objects than queries has only QUERIES of them matched
    errors, _ = errors_of({"class_error": torch.tensor(10.0)}, batch((RIGHT,) * (QUERIES + 3))[1], outputs)
    assert errors == {"class_error": (10.0, QUERIES)}
    assert errors_of({}, batch(())[1], outputs)[0] == {}


# --------------------------------------------------------------------------- two processes

# rank 0: 1 wrong object, then an image without objects; rank 1: 3 right objects, then 2 with 1 wrong.
# Steps: 1 error in 4 objects (25 %), 1 in 2 (50 %); the epoch: 2 in 6. The mean of the processes' means:
# (100 + 0) / 2 = 50 and (100 (empty) + 50) / 2 = 75, an epoch of 62.5.
RANK_BATCHES = [[((WRONG,),), ((),)], [((RIGHT, RIGHT), (RIGHT,)), ((WRONG,), (RIGHT,))]]


def _worker(rank, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        stats, scalars = train_epoch([batch(*images) for images in RANK_BATCHES[rank]])
        results[rank] = (stats["class_error"], [s.get("class_error") for s in scalars])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="starts its workers by fork")
def test_two_processes_weigh_the_class_error_by_all_their_objects(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the workers need no fresh imports of torch and the project (tens of seconds on a small machine)
        mp.start_processes(_worker, args=(str(tmp_path / "init"), results), nprocs=2, start_method="fork")
        results = dict(results)
    for rank in range(2):
        epoch, steps = results[rank]
        assert steps == [pytest.approx(25.0), pytest.approx(50.0)], rank  # the same on both processes
        assert epoch == pytest.approx(100 * 2 / 6), rank
