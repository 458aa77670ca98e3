"""The detection experiment: its tiny run passes every check, and each check can fail."""

import copy
import json

import pytest
import torch

from mirrorsym.experiments import detection as D
from mirrorsym.experiments import registry
from mirrorsym.experiments.base import Context, to_jsonable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("detection")
    cfg = D.CONFIGS["tiny"]
    results = json.loads(json.dumps(to_jsonable(D.run(cfg, Context(out_dir=out, size="tiny")))))
    return results, cfg, out


def test_registered_first_in_the_report():
    assert list(registry())[0] == "detection"


def test_tiny_run_passes_every_check_and_draws_its_figure(tiny):
    results, cfg, out = tiny
    claims = D.claims(results, cfg)
    assert len(claims) == 2 * len(cfg.models) + 2  # + the RoPE check and the folding check
    assert all(c.passed for c in claims), [c.claim for c in claims if not c.passed]
    assert [p.name for p in D.plot(results, Context(out_dir=out))] == ["detection.png"]


def test_a_wrong_count_fails(tiny):
    results, cfg, _ = tiny
    bad = copy.deepcopy(results)
    bad["models"]["llama"]["counts"].pop("sign_flip:32")  # as before RMSNorm sign flips were detected
    failed = [c for c in D.claims(bad, cfg) if not c.passed]
    assert len(failed) == 1 and failed[0].claim.startswith("llama: the detected groups")


def test_a_group_that_changes_the_outputs_fails(tiny):
    results, cfg, _ = tiny
    bad = copy.deepcopy(results)
    bad["models"]["mlp-tanh"]["groups"][0]["recheck_error"] = 1e-6
    assert not D.claims(bad, cfg)[1].passed
    unmoved = copy.deepcopy(results)
    unmoved["models"]["mlp-tanh"]["groups"][0]["moved"] = False  # an identity element proves nothing
    assert not D.claims(unmoved, cfg)[1].passed


def test_the_rope_check_fails_if_the_rotation_survives_or_is_reported(tiny):
    results, cfg, _ = tiny
    survives = copy.deepcopy(results)
    survives["rope"]["rope_errors"][0] = 1e-15
    reported = copy.deepcopy(results)
    reported["rope"]["qk_rotations_reported"] = ["rotation#3"]
    for bad in (survives, reported):
        assert not D.claims(bad, cfg)[-2].passed


def test_the_folding_check_fails_if_the_function_changes_or_the_kept_gains_rotate(tiny):
    results, cfg, _ = tiny
    assert D.claims(results, cfg)[-1].claim.startswith("folding the norm gains")
    changed = copy.deepcopy(results)
    changed["fold"]["function_change"] = 1e-7
    rotates = copy.deepcopy(results)
    rotates["fold"]["stream_rotations_gains_kept"] = ["rotation#9"]
    for bad in (changed, rotates):
        assert not D.claims(bad, cfg)[-1].passed


def test_recheck_measures_a_real_change():
    """The independent re-check is not blind: a group applied to the wrong model changes its outputs."""
    model, ids = D.EXAMPLES["llama"]()
    twin = D.TinyLlama(rope=False)
    twin.load_state_dict(model.state_dict())
    qk = [g for g in D.find_symmetries(twin, ids).by_kind("rotation") if "blocks.0.q.weight" in g.params]
    assert D.recheck(twin, ids, qk[0], 2, 0)[0] <= 1e-12
    err, moved = D.recheck(model, ids, qk[0], 2, 0)
    assert err > 1e-3 and moved
    assert torch.is_tensor(ids) and not ids.is_floating_point()
