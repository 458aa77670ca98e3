"""Sweep optimizers, schedules and clipping against torch.optim on the same minibatches (float64)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.sweep import engine, rng

sys.path.insert(0, str(Path(__file__).parent))
import test_sweep as T  # noqa: E402

STEPS = 24


def torch_loop(config, X, Y):
    """Written from torch's documentation only: optimizer, scheduler, clip_grad_norm_; the sweep's
    documented minibatches. Returns the loss and the parameter projections after every step."""
    model = T.tanh_mlp(config["seed"])
    params = list(model.parameters())
    kind = config.get("optimizer", "sgd")
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=config["lr"], momentum=config.get("momentum", 0.0),
                              weight_decay=config.get("weight_decay", 0.0), nesterov=config.get("nesterov", False))
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        opt = cls(params, lr=config["lr"], betas=(config.get("beta1", 0.9), config.get("beta2", 0.999)),
                  eps=config.get("eps", 1e-8), weight_decay=config.get("weight_decay", 0.0))
    schedule = config.get("lr_schedule", "constant")
    if schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config["lr_step_size"],
                                                gamma=config.get("lr_gamma", 0.1))
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["steps"],
                                                           eta_min=config.get("lr_min", 0.0))
    else:
        sched = None
    hist = {k: [] for k in T.METRICS}

    def record():
        with torch.no_grad():
            hist["loss"].append(nn.functional.mse_loss(model(X), Y).item())
            flat = torch.cat([p.reshape(-1) for p in params])
            for j in range(3):
                hist[f"proj{j}"].append((flat @ T.PROBES[j]).item())

    record()
    for t in range(config["steps"]):
        idx = rng.batch_indices(config["seed"], t, T.N, config["batch_size"])
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx]), Y[idx]).backward()
        if config.get("clip_grad_norm", 0.0) > 0:
            torch.nn.utils.clip_grad_norm_(params, config["clip_grad_norm"])
        opt.step()
        if sched is not None:
            sched.step()
        record()
    return hist


BASE = {"batch_size": 8, "steps": STEPS, "seed": 5}
GRIDS = {  # each knob away from its default at least once
    "sgd momentum": [{**BASE, "lr": 0.1, "momentum": [0.0, 0.9], "weight_decay": [0.0, 0.03]}],
    "sgd nesterov": [{**BASE, "lr": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}],
    "adam": [{**BASE, "optimizer": "adam", "lr": 0.02},
             {**BASE, "optimizer": "adam", "lr": 0.02, "weight_decay": 0.05, "beta1": 0.5, "eps": 1e-3}],
    "adamw": [{**BASE, "optimizer": "adamw", "lr": 0.02, "weight_decay": 0.1},
              {**BASE, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.1, "beta2": 0.9}],
}
SCHEDULES = [{}, {"lr_schedule": "step", "lr_step_size": 7, "lr_gamma": 0.5},
             {"lr_schedule": "cosine", "lr_min": 1e-3}]
CLIPS = [{}, {"clip_grad_norm": 0.05}]
_REFERENCES: dict[str, dict] = {}


def reference(config):
    """torch_loop of a config, computed once per test session (shared by the eager and traced tests)."""
    key = repr(sorted(config.items()))
    if key not in _REFERENCES:
        _REFERENCES[key] = torch_loop(config, *T.make_data())
    return _REFERENCES[key]


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("optimizer", list(GRIDS))
def test_engine_equals_torch_optimizers_schedulers_and_clipping(tmp_path, optimizer, trace, monkeypatch):
    """Every optimizer × schedule × clipping, float64, the whole trajectory: equal to round-off."""
    monkeypatch.setattr(engine, "TRACE_MIN_STEPS", 0 if trace else 10**9)
    grid = [{**g, **s, **c} for g in GRIDS[optimizer] for s in SCHEDULES for c in CLIPS]
    grid.append({**GRIDS[optimizer][0], "clip_grad_norm": 1e9})  # in a clipping chunk, never clipped
    sweep = T.make_sweep(grid)
    df = sweep.run(tmp_path, chunk_size=64, progress=False, device="cpu")
    assert len(df) == len(sweep) and (df["status"] == "ok").all()
    worst = 0.0
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        ref = reference(config)
        for name in T.METRICS:
            got, want = np.asarray(row[f"history_{name}"]), np.asarray(ref[name])
            worst = max(worst, float(np.max(np.abs(got - want) / (1 + np.abs(want)))))
    assert worst < 1e-12, worst
    # the settings act: schedules and clipping move the final loss
    assert len(set(np.round(df["loss"], 12))) > len(df) // 2


def test_train_plain_is_the_torch_loop():
    """The correctness reference of the benchmark equals the independent torch loop (no options)."""
    sweep = T.make_sweep({"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "lr_schedule": "cosine",
                          "clip_grad_norm": 0.1, "batch_size": 8, "steps": 12, "seed": 3})
    ref = ms.sweep.train_plain(sweep.problem, sweep.configs[0])
    mine = torch_loop(sweep.configs[0], *T.make_data())
    for name in T.METRICS:
        np.testing.assert_allclose(ref[f"history_{name}"], mine[name], rtol=0, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_options_with_every_optimizer_match_train_plain(tmp_path, optimizer):
    """noise and decay_to_offset_sigma compose with every optimizer as train_plain documents."""
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    grid = {"optimizer": optimizer, "lr": 0.01, "weight_decay": 0.05, "batch_size": 8, "steps": 10,
            "seed": 1, "clip_grad_norm": 0.5, "lr_schedule": "cosine", **extra}
    grid = [{**grid, "noise": 0.3}, {**grid, "decay_to_offset_sigma": 0.7}]
    sweep = T.make_sweep(grid)
    df = sweep.run(tmp_path, progress=False)
    for config, (_, row) in zip(sweep.configs, df.iterrows(), strict=True):
        ref = ms.sweep.train_plain(sweep.problem, config)
        for name in T.METRICS:
            np.testing.assert_allclose(row[f"history_{name}"], ref[f"history_{name}"], rtol=1e-12, atol=1e-12)


def test_schedules_are_torchs():
    """η_t of the engine's host-side schedule = the lr torch's schedulers set before each step."""
    configs = ms.sweep.expand_grid([{"lr": 0.3, "batch_size": 1, "steps": 40, "lr_schedule": "step",
                                     "lr_step_size": 6, "lr_gamma": 0.3},
                                    {"lr": 0.3, "batch_size": 1, "steps": 40, "lr_schedule": "cosine",
                                     "lr_min": 0.01}])
    for k, config in enumerate(configs):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config["lr"])
        sched = ms.sweep.reference.make_scheduler(opt, config)
        want = []
        for _ in range(config["steps"]):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        got = np.concatenate([engine.lr_schedule(configs, a, b - a)[:, k] for a, b in [(0, 13), (13, 40)]])
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("grid, match", [
    ({"optimizer": "adam", "momentum": 0.9}, "SGD setting"),
    ({"optimizer": "adamw", "nesterov": True}, "SGD setting"),
    ({"beta1": 0.8}, "Adam/AdamW setting"),
    ({"nesterov": True}, "needs momentum > 0"),
    ({"lr_schedule": "step"}, "lr_step_size >= 1"),
    ({"lr_step_size": 5}, "lr_schedule='step'"),
    ({"lr_min": 0.01}, "lr_schedule='cosine'"),
    ({"optimizer": "rmsprop"}, "must be one of"),
    ({"lr_schedule": "linear"}, "must be one of"),
    ({"clip_grad_norm": -1.0}, "must be >= 0"),
])
def test_settings_without_effect_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        T.make_sweep({**T.GOOD, **grid})


def test_mixed_optimizers_run_as_separate_chunks(tmp_path):
    grid = [{"lr": 0.05, "momentum": 0.9, "batch_size": 8, "steps": 6},
            {"optimizer": "adam", "lr": 0.01, "batch_size": 8, "steps": 6},
            {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "batch_size": 8, "steps": 6},
            {"lr": 0.05, "batch_size": 8, "steps": 6, "clip_grad_norm": 1.0}]
    sweep = T.make_sweep(grid)
    assert len(ms.sweep.plan_chunks(sweep.configs, 16)) == 4
    df = sweep.run(tmp_path, progress=False)
    assert (df["status"] == "ok").all() and df["optimizer"].tolist() == ["sgd", "adam", "adamw", "sgd"]
    assert all(math.isfinite(v) for v in df["loss"])
