"""Restart safety: a killed rank under torchrun, crashes during a save, damaged checkpoints.

The torchrun tests run tests/restart_job.py (FSDP2, 2 gloo ranks, 12 steps, a
sharded checkpoint every 3) under ``--max-restarts 1``. On the first attempt
one rank SIGKILLs itself; torchrun stops the other and starts a second
attempt, which resumes from ``latest`` and must end with exactly (``torch.equal``)
the final weights of an uninterrupted run: same W, same shards, same
collectives and a bit-identical restored state leave nothing to differ.
Every subprocess is bounded by a timeout, after which its whole process
group is killed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sassha_dist import Sassha, checkpoint
from tests.helpers import make_batches, make_mlp, mse
from tests.restart_runs import assert_same_final, launch


def _torchrun(tmp: Path, name: str, *job_args: str) -> tuple[dict, list[dict], Path]:
    run = launch(tmp, name, *job_args)
    assert run.returncode == 0, run.output[-4000:]
    return run.final(), run.log, run.root


def test_killed_rank_resumes_from_the_last_checkpoint(uninterrupted, tmp_path):
    """Rank 1 dies after step 7 (checkpoints at 3 and 6): the second attempt resumes from 6."""
    final, attempts, root = _torchrun(tmp_path, "killed", "--kill-at", "7")
    assert attempts == [{"attempt": 0, "resumed_from": 0}, {"attempt": 1, "resumed_from": 6}]
    assert_same_final(final, uninterrupted)
    assert checkpoint.latest_checkpoint(root) == root / "step_00000012"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000009", "step_00000012"]


def test_rank_killed_during_a_save_never_publishes_it(uninterrupted, tmp_path):
    """Rank 1 dies inside the step-9 save, after the temporary directory exists: ``latest`` stays on
    step 6, the second attempt resumes from there, and the stale temporary is cleaned up."""
    final, attempts, root = _torchrun(tmp_path, "in-save", "--kill-at", "9", "--kill-in-save")
    assert attempts == [{"attempt": 0, "resumed_from": 0}, {"attempt": 1, "resumed_from": 6}]
    assert_same_final(final, uninterrupted)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000009", "step_00000012"]


# -- single process: crashes during a save, damaged files ------------------------------------------------


def _setup(seed: int = 0):
    model = make_mlp((3, 4, 1), seed=seed)
    optimizer = Sassha(model.parameters(), lr=0.05, rho=0.05, lazy_hessian=2)
    return model, optimizer


def _train(model, optimizer, steps: int) -> None:
    for batch in make_batches(steps, batch=4):
        optimizer.step(lambda batch=batch: mse(model, batch))


def test_crash_during_save_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    checkpoint.save_checkpoint(tmp_path, 2, model, optimizer)
    expected = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, 2)

    def crashing_crc(file):  # dies while the manifest is being computed: the files are all there
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint.files, "crc32", crashing_crc)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 4, model, optimizer)
    monkeypatch.undo()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert not (tmp_path / "step_00000004").exists() and (tmp_path / ".step_00000004.tmp").exists()
    fresh, fresh_opt = _setup(seed=1)
    assert checkpoint.load_latest(tmp_path, fresh, fresh_opt)["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), expected, strict=True))
    # The next save removes the stale temporary and publishes normally.
    checkpoint.save_checkpoint(tmp_path, 4, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_resaving_the_latest_step_replaces_it_and_keep_prunes(tmp_path):
    model, optimizer = _setup()
    for step in (1, 2, 3):
        _train(model, optimizer, 1)
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    _train(model, optimizer, 1)
    checkpoint.save_checkpoint(tmp_path, 3, model, optimizer, keep=2)  # the same step again: replaced
    fresh, fresh_opt = _setup(seed=1)
    checkpoint.load_latest(tmp_path, fresh, fresh_opt)
    assert fresh_opt.counters["global_step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_checkpoint_yet_is_a_fresh_start(tmp_path):
    model, optimizer = _setup()
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint.load_latest(tmp_path / "missing", model, optimizer) is None


def _saved(tmp_path) -> Path:
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    return checkpoint.save_checkpoint(tmp_path, 2, model, optimizer)


def _shard_file(path: Path) -> Path:
    return next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp")


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    "flipped byte": (
        lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 0xFF]) + p.read_bytes()[1:]),
        "corrupt",
    ),
    "missing": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("target", ["shard", "metadata"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_file_is_named_in_the_error(tmp_path, damage, target):
    path = _saved(tmp_path)
    file = _shard_file(path) if target == "shard" else path / ".metadata"
    hurt, word = DAMAGE[damage]
    hurt(file)
    model, optimizer = _setup(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(checkpoint.CorruptCheckpointError, match=word) as info:
        checkpoint.load_latest(tmp_path, model, optimizer)
    assert str(file) in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert len(optimizer.state) == 0


def test_fall_back_loads_the_newest_checkpoint_that_verifies(tmp_path):
    """``fall_back=True``: a damaged newest checkpoint is named in a warning and the one before it is
    loaded, exactly (its weights, state and counters); the next save at a later step replaces the
    damaged one. A dangling ``latest`` falls back to the step directories."""
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    checkpoint.save_checkpoint(tmp_path, 2, model, optimizer)
    at_2 = checkpoint.full_state_dict(model, optimizer)
    _train(model, optimizer, 2)
    newest = checkpoint.save_checkpoint(tmp_path, 4, model, optimizer)
    DAMAGE["flipped byte"][0](_shard_file(newest))

    resumed, resumed_optimizer = _setup(seed=1)
    with pytest.warns(UserWarning, match=rf"{_shard_file(newest)}.*Loading the checkpoint before it"):
        extra = checkpoint.load_latest(tmp_path, resumed, resumed_optimizer, fall_back=True)
    assert extra == {"step": 2}
    loaded = checkpoint.full_state_dict(resumed, resumed_optimizer)
    for name, value in at_2["model"].items():
        assert torch.equal(loaded["model"][name], value), name
    assert loaded["optimizer"]["sassha_counters"] == at_2["optimizer"]["sassha_counters"]
    _train(resumed, resumed_optimizer, 1)
    checkpoint.save_checkpoint(tmp_path, 3, resumed, resumed_optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]

    (tmp_path / "latest").write_text("step_00000009\n")  # points nowhere
    with pytest.warns(UserWarning, match="Trying the step directories"):
        extra = checkpoint.load_latest(tmp_path, *_setup(seed=1), fall_back=True)
    assert extra == {"step": 3}


def test_fall_back_with_every_checkpoint_damaged_says_so(tmp_path):
    path = _saved(tmp_path)
    DAMAGE["missing"][0](_shard_file(path))
    with pytest.warns(UserWarning), pytest.raises(checkpoint.CorruptCheckpointError, match="all are damaged"):
        checkpoint.load_latest(tmp_path, *_setup(seed=1), fall_back=True)


def test_missing_manifest_and_dangling_latest_are_named(tmp_path):
    path = _saved(tmp_path)
    model, optimizer = _setup(seed=1)
    (path / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match=checkpoint.MANIFEST):
        checkpoint.load(path, model, optimizer)
    (tmp_path / "latest").write_text("step_00000099\n")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step_00000099"):
        checkpoint.load_latest(tmp_path, model, optimizer)


def test_truncated_consolidated_export_is_named(tmp_path):
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    file = checkpoint.export_full(tmp_path / "full.pt", model, optimizer)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"full\.pt"):
        checkpoint.import_full(file, *_setup(seed=1))


def test_replace_interrupted_between_its_two_renames_still_loads(tmp_path):
    """Re-saving the latest step moves the old directory aside before renaming the new one in; a crash
    between the two leaves ``latest`` naming a missing directory and the old copy complete beside it."""
    path = _saved(tmp_path)
    path.rename(tmp_path / ".step_00000002.old")
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / ".step_00000002.old"
    model, optimizer = _setup(seed=1)
    assert checkpoint.load_latest(tmp_path, model, optimizer)["step"] == 2
    checkpoint.save_checkpoint(tmp_path, 2, model, optimizer)  # the next save cleans it up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
