"""The stage cache: keys, forced recomputation, integrity."""

import numpy as np

from polca_study.study.cache import StageCache


def _count(cache, stage, spec, calls):
    def compute():
        calls.append(stage)
        return {"value": len(calls)}

    return cache.get_or_compute(stage, spec, compute)[0]


def test_force_decompose_also_recomputes_the_lca_decomposition(tmp_path):
    calls = []
    for stage in ("decompose", "lca", "basis"):
        _count(StageCache(tmp_path), stage, {"x": 1}, calls)
    assert calls == ["decompose", "lca", "basis"]
    _count(StageCache(tmp_path), "lca", {"x": 1}, calls)  # cached
    assert len(calls) == 3
    forced = StageCache(tmp_path, {"decompose"})
    for stage in ("decompose", "lca", "basis"):
        _count(forced, stage, {"x": 1}, calls)
    assert calls[3:] == ["decompose", "lca"]  # the basis stays cached
    everything = StageCache(tmp_path, {"all"})
    _count(everything, "lca", {"x": 1}, calls)
    assert calls[-1] == "lca" and len(calls) == 6


def test_a_different_spec_is_a_different_entry(tmp_path):
    calls = []
    cache = StageCache(tmp_path)
    assert _count(cache, "train", {"a": 1}, calls) == {"value": 1}
    assert _count(cache, "train", {"a": 2}, calls) == {"value": 2}
    assert _count(cache, "train", {"a": 1}, calls) == {"value": 1}


def test_payloads_round_trip_without_pickle(tmp_path, monkeypatch):
    import pickle

    import numpy as np
    import pandas as pd
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the cache unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)

    result = {
        "snapshots": torch.randn(3, 5),
        "steps": np.arange(3),
        "tags": np.array(["DET", "CAP"], dtype=object),
        "history": pd.DataFrame({"step": [0, 25], "loss": [2.0, 1.5]}),
        "hvps": np.int64(7),
        "exact_second": None,
        "tokenizer": "{}",
    }
    cache = StageCache(tmp_path)
    cache.save("train", "k", {}, result)
    got = cache.load("train", "k")
    assert list(got) == list(result)
    assert torch.equal(got["snapshots"], result["snapshots"]) and got["snapshots"].dtype == torch.float32
    assert np.array_equal(got["steps"], result["steps"]) and got["tags"].tolist() == ["DET", "CAP"]
    pd.testing.assert_frame_equal(got["history"], result["history"])
    assert (got["hvps"], got["exact_second"], got["tokenizer"]) == (7, None, "{}")


def test_an_old_pickled_entry_is_recomputed_not_unpickled(tmp_path):
    import json
    import pickle

    from polca_study.study.cache import stage_key

    key = stage_key("basis", {})
    entry = tmp_path / "basis" / key
    entry.mkdir(parents=True)

    class Boom:  # what a hostile payload would run on unpickling
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    (entry / "payload.pt").write_bytes(pickle.dumps({"x": Boom()}))
    (entry / "meta.json").write_text(json.dumps({"stage": "basis", "key": key, "sha256": "0"}))
    calls = []
    assert StageCache(tmp_path).load("basis", key) is None
    assert _count(StageCache(tmp_path), "basis", {}, calls) == {"value": 1}  # recomputed
    assert not (entry / "payload.pt").exists()  # replaced by the new format


def test_a_computed_stage_continues_as_a_read_one_does(tmp_path):
    """A job that computes a stage and one that reads it go on from the same bytes in the
    same layout: a QR factor is column-major, its stored copy C-ordered, and float32
    products over the two sum in different orders (1e-7 apart: enough to flip clusters)."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20_000, 20, generator=g))
    assert not q.is_contiguous()  # what LAPACK returns
    x = torch.randn(20_000, generator=g)
    cold, _ = StageCache(tmp_path).get_or_compute("basis", {"k": 1}, lambda: {"q": q})
    warm, _ = StageCache(tmp_path).get_or_compute("basis", {"k": 1}, lambda: {"q": None})
    assert cold["q"].stride() == warm["q"].stride()
    assert torch.equal(cold["q"].T @ x, warm["q"].T @ x)


def test_entries_computed_together_ride_on_the_callers_own(tmp_path):
    """The others in a group are computed only with the caller's own entry, only when
    missing; `force` recomputes the caller's own; an entry its compute gives up on (None)
    is not stored."""
    calls = []

    def compute(missing):
        calls.append(missing)
        return [None if i == 2 else {"value": np.full(2, i + 10 * len(calls))} for i in missing]

    specs = [{"own": 0}, {"own": 1}, {"own": 2}]
    cache = StageCache(tmp_path)
    first = cache.get_or_compute_together("decompose", specs, compute)
    assert calls == [[0, 1, 2]] and cache.hits["decompose"] is False
    assert first[0][0]["value"].tolist() == [10, 10] and first[2][0] is None
    assert cache.load("decompose", first[2][1]) is None  # given up on: not stored

    # the second entry's own job: a hit, whatever else is missing
    hit = StageCache(tmp_path)
    (mine, _), *_ = hit.get_or_compute_together("decompose", [specs[1], specs[2]], compute)
    assert calls == [[0, 1, 2]] and hit.hits["decompose"] is True
    assert mine["value"].tolist() == [11, 11]

    # the first's own missing again (forced): it is recomputed, the stored second read
    forced = StageCache(tmp_path, {"decompose"})
    again = forced.get_or_compute_together("decompose", specs, compute)
    assert calls[1] == [0, 2] and again[0][0]["value"].tolist() == [20, 20]
    assert again[1][0]["value"].tolist() == [11, 11]
    assert StageCache(tmp_path).load("decompose", again[0][1])["value"].tolist() == [20, 20]
