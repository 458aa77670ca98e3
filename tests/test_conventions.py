"""The library's conventions hold across every public module (docs/theory.md#conventions).

* ``gamma`` is the coefficient of L + γ‖θ‖² and is the only decay parameter in ``ms.theory``;
  ``weight_decay`` means torch's coupled λ = 2γ and appears only where a torch optimizer's number is meant.
  Every theory result with a ``gamma`` also carries ``torch_weight_decay`` = 2·gamma.
* One loss convention: every public callable that takes a ``loss_fn`` calls it as ``loss_fn(params, batch)``
  and takes the batch as an argument; ``ms.loss_from_model`` is the adapter from (model, criterion).
* Results are typed objects (dataclasses / NamedTuples), never bare tuples.
"""

import dataclasses
import importlib
import inspect
import pkgutil
import typing

import pytest
import torch
from torch import nn

import mirrorsym as ms

DECAY_ALIASES = {"lam", "lambda_", "wd", "decay", "l2", "reg"}


def public_modules():
    for info in pkgutil.walk_packages(ms.__path__, "mirrorsym."):
        if info.name.startswith(("mirrorsym.experiments", "mirrorsym.cli", "mirrorsym.report")):
            continue  # applications of the library, not its API
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        yield importlib.import_module(info.name)


def public_callables():
    """(qualified name, callable) of every public function, class and public method defined in the API."""
    seen = set()
    for mod in public_modules():
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__ or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj):
                yield f"{mod.__name__}.{name}", obj
                for mname, meth in vars(obj).items():
                    if inspect.isfunction(meth) and (not mname.startswith("_") or mname == "__init__"):
                        yield f"{mod.__name__}.{name}.{mname}", meth


CALLABLES = list(public_callables())


def parameters(obj) -> list[str]:
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return []


def test_the_walk_sees_the_api():
    names = {n for n, _ in CALLABLES}
    for expected in ("mirrorsym.theory.threshold.critical_weight_decay", "mirrorsym.sweep.sweep.Sweep.__init__",
                     "mirrorsym.core.loss.loss_from_model", "mirrorsym.constrain.remove.remove_symmetries",
                     "mirrorsym.theory.noise.critical_learning_rate", "mirrorsym.diagnose.monitor.SymmetryMonitor"):
        assert expected in names
    assert len(CALLABLES) > 150


def test_decay_is_gamma_in_the_theory_and_weight_decay_only_means_torch_lambda():
    for name, obj in CALLABLES:
        params = set(parameters(obj))
        assert not params & DECAY_ALIASES, f"{name} names a decay {params & DECAY_ALIASES}: use gamma or weight_decay"
        if name.startswith("mirrorsym.theory."):
            assert "weight_decay" not in params, f"{name}: the theory speaks of gamma (L + γ‖θ‖²), not weight_decay"


@pytest.mark.parametrize("cls", [ms.theory.CriticalWeightDecay, ms.theory.LyapunovResult, ms.theory.LyapunovCurve,
                                 ms.theory.CriticalLRResult])
def test_theory_results_carry_both_conventions(cls):
    assert isinstance(inspect.getattr_static(cls, "torch_weight_decay"), property)
    fields = {f.name for f in dataclasses.fields(cls)} | {n for n, v in vars(cls).items() if isinstance(v, property)}
    assert "gamma" in fields


def test_gamma_results_are_twice_in_torch_units():
    x = torch.randn(32, 2, dtype=torch.float64)
    loss = ms.loss_from_model(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double(),
                              lambda out, y: ((out - y) ** 2).mean())
    model_params = {"0.weight": torch.randn(3, 2, dtype=torch.float64), "0.bias": torch.zeros(3, dtype=torch.float64),
                    "2.weight": torch.randn(1, 3, dtype=torch.float64), "2.bias": torch.zeros(1, dtype=torch.float64)}
    m = ms.Mirror.sign_flip({"0.weight": (0, [1]), "0.bias": (0, [1]), "2.weight": (1, [1])})
    r = ms.theory.critical_weight_decay(loss, model_params, m, (x, torch.sin(x[:, :1])))
    assert r.gamma > 0 and r.torch_weight_decay == 2 * r.gamma == ms.theory.torch_weight_decay(r.gamma)


def test_every_loss_taking_callable_takes_a_batch():
    takers = [(n, o) for n, o in CALLABLES if "loss_fn" in parameters(o)]
    assert len(takers) >= 8
    for name, obj in takers:
        params = parameters(obj)
        obj = obj.__init__ if inspect.isclass(obj) else obj
        assert {"batch", "data"} & set(params), f"{name} takes loss_fn but no batch/data to call it on"
        hint = typing.get_type_hints(obj).get("loss_fn")
        assert hint == ms.core.LossFn, f"{name}: loss_fn is annotated {hint}, not mirrorsym.core.LossFn"


def _spy():
    calls = []

    def loss_fn(params, batch):
        calls.append(batch)
        x, y = batch
        return ((x @ (params["u"] * params["w"]) - y) ** 2).mean()

    return loss_fn, calls


def test_theory_calls_the_loss_with_the_batch_it_was_given():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    batch = (x, x @ torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64))
    p = {"u": torch.ones(3, dtype=torch.float64), "w": torch.ones(3, dtype=torch.float64)}
    m = ms.Mirror.sign_flip({"u": [2], "w": [2]})
    for fn in (ms.theory.critical_weight_decay, ms.theory.stationarity_residual, ms.theory.hessian_cross_norm,
               ms.theory.projected_curvature):
        loss_fn, calls = _spy()
        fn(loss_fn, p, m, batch)
        assert calls and all(c is batch for c in calls), fn.__name__
    loss_fn, calls = _spy()
    ms.theory.lyapunov_exponent(loss_fn, m.project(p), m, batch, lr=0.1, batch_size=4)
    assert calls and all(isinstance(c, tuple) and len(c) == 2 and c[0].shape[1] == 3 for c in calls)


def test_loss_from_model_is_the_criterion_on_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss = ms.loss_from_model(model, nn.functional.cross_entropy)
    params = dict(model.named_parameters())
    assert torch.equal(loss(params, (x, y)), nn.functional.cross_entropy(model(x), y))
    moved = {k: v + 1.0 for k, v in params.items()}
    with torch.no_grad():
        expected = nn.functional.cross_entropy(torch.func.functional_call(model, moved, (x,)), y)
    assert torch.equal(loss(moved, (x, y)), expected)
    assert torch.equal(loss({"2.bias": params["2.bias"] + 1.0}, (x, y)),  # a partial point keeps the rest
                       nn.functional.cross_entropy(model(x) + 1.0, y))
    with pytest.raises(TypeError, match=r"\(x, \*targets\)"):
        loss(params, x)


def test_the_old_one_argument_loss_is_refused_with_the_convention():
    p = {"u": torch.ones(2, dtype=torch.float64), "w": torch.ones(2, dtype=torch.float64)}
    m = ms.Mirror.sign_flip({"u": [0], "w": [0]})
    with pytest.raises(TypeError, match="loss_from_model"):
        ms.theory.critical_weight_decay(lambda q: (q["u"] * q["w"]).sum() ** 2, p, m)


def test_sweep_takes_a_criterion_and_metrics_take_params_and_batch():
    params = parameters(ms.sweep.Sweep)
    assert params[:4] == ["model_factory", "criterion", "data", "grid"]
    assert "loss_fn" not in params


def _is_bare_tuple(tp) -> bool:
    """A fixed-length tuple of results (tuple[A, B]); tuple[X, ...] is a sequence and fine."""
    if (typing.get_origin(tp) or tp) is not tuple:
        return False
    args = typing.get_args(tp)
    return not (len(args) == 2 and args[1] is Ellipsis)


def exported_functions():
    """The user-facing functions: those in the ``__all__`` of the package and its layer packages."""
    for pkg in (ms, ms.core, ms.detect, ms.diagnose, ms.theory, ms.constrain, ms.sweep):
        for name in getattr(pkg, "__all__", []):
            obj = getattr(pkg, name)
            if inspect.isfunction(obj):
                yield f"{pkg.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for mname, meth in vars(obj).items():
                    if inspect.isfunction(meth) and not mname.startswith("_"):
                        yield f"{pkg.__name__}.{name}.{mname}", meth


def test_results_are_typed_not_bare_tuples():
    bare = []
    for name, obj in exported_functions():
        if name.endswith(".right_inverse"):
            continue  # torch.nn.utils.parametrize's protocol returns a tuple for several originals
        try:
            ret = typing.get_type_hints(obj).get("return")
        except Exception:  # forward references to optional packages
            continue
        if ret is not None and _is_bare_tuple(ret):
            bare.append(name)
    assert not bare, f"public functions returning bare tuples (use a dataclass / NamedTuple): {bare}"
