"""Invariant 3 under DDP: every rank selects the identical mask and keeps frozen elements exact."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.mask import ParameterMask

SCRIPT = Path(__file__).parent / "scripts" / "ddp_unlearn.py"


@pytest.mark.slow
def test_two_process_cpu_ddp_unlearning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["mask_sha256"] == ranks[1]["mask_sha256"]
    assert ranks[0]["bn_buffers_sha256"] == ranks[1]["bn_buffers_sha256"]
    assert ranks[0]["head_rows_sha256"] == ranks[1]["head_rows_sha256"] and ranks[0]["calibrated"]
    assert ranks[0]["scored_samples"] == ranks[1]["scored_samples"] == 137  # shards summed: the whole forget set
    for r in ranks:
        assert r["frozen_exact"] and r["bn_buffers_exact"] and r["selected_moved"]
        assert r["forget_acc"] <= 0.05


def test_a_rank_with_a_different_mask_fails_loudly(trained_model):
    callback = SelectiveUnlearning()
    callback.mask = ParameterMask.full(trained_model)
    other = ParameterMask.empty(trained_model).sha256()
    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=SimpleNamespace(broadcast=lambda obj, src=0: other))
    with pytest.raises(RuntimeError, match="rank 1 selected a different mask .* than rank 0"):
        callback._check_same_mask_on_all_ranks(trainer)
    same = SimpleNamespace(world_size=2, global_rank=1, strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    callback._check_same_mask_on_all_ranks(same)
