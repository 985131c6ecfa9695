"""iso_c's running sum of task vectors lives beside each version: stored first, sha256 in the fold state."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import load_file

from app.services import folds
from tests.checkpoints import make_expert
from tests.merging import reference as ref
from tests.merging.test_reference import assert_matches
from tests.workers.test_fold_task import fold_context, versions


def test_iso_c_stream_folds_through_the_worker_with_its_auxiliary_checkpoint(api, tmp_path: Path) -> None:
    r = api.client.post("/v1/streams", json={"name": "iso", "method": "iso_c", "params": {"scale": 0.7}},
                        headers=api.headers())
    assert r.status_code == 201, r.text
    stream_id = r.json()["id"]
    base_path = api.tmp / "base.safetensors"
    from tests.checkpoints import make_base

    base = make_base(base_path)
    assert api.client.put(f"/v1/streams/{stream_id}/base", content=base_path.read_bytes(),
                          headers=api.headers()).status_code == 201
    experts = []
    for i in (1, 2, 3):
        path = tmp_path / f"e{i}.safetensors"
        experts.append(make_expert(base, path, seed=i))
        assert api.client.post(f"/v1/streams/{stream_id}/experts", content=path.read_bytes(),
                               headers=api.headers()).status_code == 202
    ctx, _ = fold_context(api)
    rows = versions(ctx, stream_id)
    state = None
    for t in (1, 2, 3):
        assert folds.fold_version(ctx, rows[t].id) == "succeeded"
        row = versions(ctx, stream_id)[t]
        key = folds.aux_key(stream_id, t)
        assert key == f"streams/{stream_id}/versions/{t}.aux.safetensors"
        aux_file = ctx.store.local_path(key)
        assert aux_file is not None and aux_file.exists()
        assert hashlib.sha256(aux_file.read_bytes()).hexdigest() == row.state["aux_sha256"]
        # the auxiliary checkpoint is Σ τ_i, and the version all-at-once Iso-C of the experts so far
        total = load_file(str(aux_file))
        for name in total:
            expected = sum((e[name].double() - base[name].double()) for e in experts[:t])
            assert (total[name].double() - expected).abs().max() <= 1e-6
        exact, state = ref.iso_c_step(base, experts[t - 1], state, t, scale=0.7)
        assert_matches(load_file(str(ctx.store.local_path(row.object_key))), exact)
    assert list((Path(api.settings.work_dir) / "folds").iterdir()) == []


def test_stream_creation_accepts_and_normalises_processing_steps(api) -> None:
    params = {"alpha": 0.4, "preprocess": [{"dare": {"p": 0.5}}, {"breadcrumbs": {}}, {"topk": {"k": 0.3}}],
              "postprocess": [{"lines": {"alpha": 0.6, "beta": 0.4}}]}
    r = api.client.post("/v1/streams", json={"name": "p", "method": "opcm", "params": params}, headers=api.headers())
    assert r.status_code == 201, r.text
    stored = r.json()["params"]
    assert stored["alpha"] == 0.4
    assert stored["preprocess"] == [{"dare": {"p": 0.5}}, {"breadcrumbs": {"beta": 0.01, "gamma": 0.1}},
                                    {"topk": {"k": 0.3}}]
    assert stored["postprocess"][0]["lines"]["alpha"] == 0.6
    assert stored["postprocess"][0]["lines"]["layer_pattern"]
    for method in ("dop", "iso_c"):
        r = api.client.post("/v1/streams", json={"name": method, "method": method}, headers=api.headers())
        assert r.status_code == 201, r.text


def test_bad_processing_steps_are_422_sentences_and_create_nothing(api) -> None:
    before = api.client.get("/v1/streams", headers=api.headers()).json()
    cases = [
        ({"preprocess": [{"dare": {"p": 1.5}}]}, "preprocess[0].dare parameter 'p'"),
        ({"preprocess": [{"dare": {"q": 1}}]}, "preprocess[0].dare has no parameter 'q'"),
        ({"preprocess": [{"shuffle": {}}]}, "unknown step 'shuffle'"),
        ({"preprocess": {"dare": {}}}, "must be a list of steps"),
        ({"preprocess": [{"dare": {}, "topk": {}}]}, "one key"),
        ({"preprocess": [{"breadcrumbs": {"beta": 0.5, "gamma": 0.6}}]}, "beta + gamma must be below 1"),
        ({"postprocess": [{"lines": {"layer_pattern": "layers"}}]}, "needs a group"),
        ({"postprocess": [{"lines": {"layer_pattern": "(["}}]}, "not a valid regular expression"),
        ({"postprocess": [{"lines": {"alpha": 0.0}}]}, "'alpha'"),
        ({"postprocess": [{"dare": {}}]}, "unknown step 'dare'"),
    ]
    for params, needle in cases:
        r = api.client.post("/v1/streams", json={"name": "bad", "method": "task_arithmetic", "params": params},
                            headers=api.headers())
        assert r.status_code == 422, (params, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.json())
    for method, params, needle in [("dop", {"svd_proj_space": "w"}, "svd_proj_space"),
                                   ("dop", {"num_steps": -1}, "num_steps"), ("iso_c", {"scale": 0}, "scale")]:
        r = api.client.post("/v1/streams", json={"name": "bad", "method": method, "params": params}, headers=api.headers())
        assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text
    assert api.client.get("/v1/streams", headers=api.headers()).json() == before
