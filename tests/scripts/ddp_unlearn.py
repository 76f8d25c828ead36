"""Run SelectiveUnlearning under DDP (2 CPU processes, gloo) and write what each rank saw.

    python tests/scripts/ddp_unlearn.py OUT_DIR [DEVICES]

Lightning re-launches this script once per extra rank; every rank writes OUT_DIR/rank<k>.json.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.data import load_digits_datasets
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import SmallCNN


def _unselected_statistics_exact(model, original, mask) -> bool:
    """Running statistics of unselected BatchNorm channels (and every ``num_batches_tracked``) bit-exact."""
    for name, buf in model.named_buffers():
        selected = mask.masks.get(name.rsplit(".", 1)[0] + ".weight")
        if selected is None or buf.dim() == 0:
            same = torch.equal(buf, original[name])
        else:
            same = torch.equal(buf[~selected], original[name][~selected])
        if not same:
            return False
    return True


def main(out: Path, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    train, test = load_digits_datasets(seed=0)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=32)
    model = SmallCNN(optimizer="adamw", weight_decay=0.05)  # weight decay: frozen weights would move without restore
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the dampen reset (BatchNorm statistics re-estimated on every rank) and the head calibration at the end: every
    # rank must hold the same statistics and refit rows
    callback = SelectiveUnlearning(method="grad_x_act", ratio=0.2, objective="random_label", reset="dampen",
                                   calibrate="head", calibrate_epochs=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    elapsed = time.perf_counter() - start
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "mask_sha256": callback.mask.sha256(),
        "mask_fraction": callback.mask.fraction,
        "scored_samples": callback.scores.num_samples,
        "frozen_exact": frozen_elements_equal(model, original, callback.mask),
        "bn_buffers_exact": _unselected_statistics_exact(model, original, callback.mask),
        # the reset re-estimates the selected channels' statistics on the full retain data on every rank
        "bn_buffers_sha256": hashlib.sha256(b"".join(
            b.numpy().tobytes() for n, b in model.named_buffers() if "running" in n)).hexdigest(),
        "selected_moved": any(
            not torch.equal(p.detach(), original[n]) for n, p in model.named_parameters() if callback.mask.masks[n].any()
        ),
        "head_rows_sha256": hashlib.sha256(torch.cat([model.fc2.weight[3], model.fc2.bias[3:4]]).detach()
                                           .numpy().tobytes()).hexdigest(),
        "calibrated": "calibration" in callback.timings,
        "forget_acc": callback.history[-1]["forget_acc"],
        "remaining_acc": callback.history[-1]["remaining_acc"],
        "fit_seconds": elapsed,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
