"""The module pools' checkpoint files: one complete set per tag, stale sets of another
expert-parallel size removed when the tag is saved again, damaged sets refused."""
import pytest
import torch

from mom_ds.train import pool_files


def save_set(tag, ep_size, value):
    for e in range(ep_size):
        weights = {f"chunks.0.ffn_modules.{e}.fc.weight": torch.full((2, 2), value + e)}
        optimizer = {name: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}
                     for name in weights}
        pool_files.write(tag, e, ep_size, weights, optimizer)


def test_a_set_reads_back_by_global_name(tmp_path):
    save_set(tmp_path, 2, 10.0)
    weights, states = pool_files.read(tmp_path)
    assert sorted(weights) == ["chunks.0.ffn_modules.0.fc.weight",
                               "chunks.0.ffn_modules.1.fc.weight"]
    assert float(weights["chunks.0.ffn_modules.1.fc.weight"][0, 0]) == 11.0
    assert float(states["chunks.0.ffn_modules.0.fc.weight"]["step"]) == 3.0
    assert not list(tmp_path.glob("*.tmp"))


def test_saving_a_tag_again_at_another_size_removes_the_old_set(tmp_path):
    """A save of step N that was never published (killed before `latest` moved) leaves its
    files; the resumed run, at another E, saves step N again."""
    save_set(tmp_path, 4, 0.0)
    save_set(tmp_path, 2, 20.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "module_pools_ep000_of_002.pt", "module_pools_ep001_of_002.pt"]
    weights, _ = pool_files.read(tmp_path)
    assert float(weights["chunks.0.ffn_modules.0.fc.weight"][0, 0]) == 20.0


def test_an_incomplete_set_is_refused(tmp_path):
    save_set(tmp_path, 2, 0.0)
    (tmp_path / pool_files.file_name(1, 2)).unlink()
    with pytest.raises(FileNotFoundError, match="not one complete set"):
        pool_files.read(tmp_path)


def test_a_checkpoint_without_pool_files_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="mom-convert fp32"):
        pool_files.read(tmp_path)
    assert pool_files.read_weights(tmp_path) == {}
