"""The stage cache: keys, forced recomputation, integrity."""

from polca_study.cache import StageCache


def _count(cache, stage, spec, calls):
    def compute():
        calls.append(stage)
        return {"value": len(calls)}

    return cache.get_or_compute(stage, spec, compute)[0]


def test_force_decompose_also_recomputes_the_lca_decomposition(tmp_path):
    calls = []
    for stage in ("decompose", "trajectories", "basis"):
        _count(StageCache(tmp_path), stage, {"x": 1}, calls)
    assert calls == ["decompose", "trajectories", "basis"]
    _count(StageCache(tmp_path), "trajectories", {"x": 1}, calls)  # cached
    assert len(calls) == 3
    forced = StageCache(tmp_path, {"decompose"})
    for stage in ("decompose", "trajectories", "basis"):
        _count(forced, stage, {"x": 1}, calls)
    assert calls[3:] == ["decompose", "trajectories"]  # the basis stays cached
    everything = StageCache(tmp_path, {"all"})
    _count(everything, "trajectories", {"x": 1}, calls)
    assert calls[-1] == "trajectories" and len(calls) == 6


def test_a_different_spec_is_a_different_entry(tmp_path):
    calls = []
    cache = StageCache(tmp_path)
    assert _count(cache, "train", {"a": 1}, calls) == {"value": 1}
    assert _count(cache, "train", {"a": 2}, calls) == {"value": 2}
    assert _count(cache, "train", {"a": 1}, calls) == {"value": 1}
