"""The cache directory's locks: writers never interleave, training never starts while a cache run is
still writing, and a prune/repair never deletes what a training run reads. Conflicts refuse at once."""

import pytest

from pipeline.store.lock import cache_lock
from pipeline.errors import UserError


def test_two_writers_refuse_with_a_clear_message(tmp_path):
    with cache_lock(tmp_path, "write"):
        with pytest.raises(UserError, match="is busy: another cache run, prune or repair is writing it .*pid \\d+"):
            with cache_lock(tmp_path, "write"):
                pass
    with cache_lock(tmp_path, "write"):  # released: free again
        pass


def test_training_refuses_while_a_cache_run_writes(tmp_path):
    with cache_lock(tmp_path, "write"):
        with pytest.raises(UserError, match="a cache run is writing it"):
            with cache_lock(tmp_path, "read"):
                pass


def test_cache_run_may_add_while_training_reads_but_prune_may_not_delete(tmp_path):
    with cache_lock(tmp_path, "read"), cache_lock(tmp_path, "read"):  # two trainings share the cache
        with cache_lock(tmp_path, "write"):  # adding immutable segments is safe for readers
            pass
        with pytest.raises(UserError, match="a training run is reading it"):
            with cache_lock(tmp_path, "delete"):
                pass


@pytest.mark.e2e
def test_stages_take_the_locks(project):
    from pipeline.cache.stage import run_cache
    from pipeline.train.stage import run_train

    _, cfg = project(max_steps=1)
    with cache_lock(cfg.cache.dir, "write"):
        with pytest.raises(UserError, match="busy"):
            run_cache(cfg, progress=False)
    run_cache(cfg, progress=False)
    with cache_lock(cfg.cache.dir, "write"):
        with pytest.raises(UserError, match="a cache run is writing it"):
            run_train(cfg, progress=False)
    assert run_train(cfg, progress=False)["steps"] == 1


@pytest.mark.e2e
def test_prune_and_repair_refuse_while_training_reads(project):
    from pipeline.cache.stage import run_cache
    from pipeline.cache.maintenance import prune, verify

    _, cfg = project()
    run_cache(cfg, progress=False)
    with cache_lock(cfg.cache.dir, "read"):
        with pytest.raises(UserError, match="a training run is reading it"):
            prune(cfg)
        with pytest.raises(UserError, match="a training run is reading it"):
            verify(cfg, repair=True)
        assert verify(cfg)["damaged"] == []  # a plain verify only reads
