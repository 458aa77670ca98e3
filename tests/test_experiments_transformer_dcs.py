"""Building blocks of the ``transformer`` and ``dcs`` experiments, against independent references."""

import math

import torch

from mirrorsym.experiments import dcs, transformer


# ---------------------------------------------------------------------------------------------- dcs (a)
def _problem():
    cfg = dcs.CONFIGS["tiny"]
    return cfg, dcs.linear_problem(cfg, torch.Generator().manual_seed(0))


def _kkt_violation(p, gamma, s):
    """Max violation of the optimality conditions of F = L + γ‖(I−P)θ‖² + 2γ‖Oᵀθ‖₁ at θ = O s + O⊥ t*(s),
    with t* the exact minimiser in t for that s (a linear solve): the subgradient conditions on s."""
    O, Op, X, y = p["O"], p["O_perp"], p["X"], p["y"]
    n = len(y)
    Z = X @ Op
    t = torch.linalg.solve(Z.T @ Z / n + gamma * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T @ (y - X @ O @ s) / n)
    g = O.T @ dcs.loss_gradient(X, y, O @ s + Op @ t)
    nonzero = s != 0
    on = (g[nonzero] + 2 * gamma * s[nonzero].sign()).abs()
    off = (g[~nonzero].abs() - 2 * gamma).clamp_min(0)
    return torch.cat([on, off]).max().item()


def test_problem_has_the_planted_constraint_coordinates():
    cfg, p = _problem()
    O = p["O"]
    assert torch.allclose(O.T @ O, torch.eye(cfg.k, dtype=O.dtype), atol=1e-12)
    assert torch.allclose(O.T @ p["O_perp"], torch.zeros(cfg.k, cfg.d - cfg.k, dtype=O.dtype), atol=1e-12)


def test_reference_solution_satisfies_the_lasso_optimality_conditions():
    cfg, p = _problem()
    gamma_c = dcs.predicted_threshold(p)
    for gamma in (0.2 * gamma_c, 0.6 * gamma_c, 2 * gamma_c):
        s = dcs.reference_solution(p, gamma)
        assert _kkt_violation(p, gamma, s) < 1e-9


def test_predicted_threshold_separates_zero_from_non_zero():
    cfg, p = _problem()
    gamma_c = dcs.predicted_threshold(p)
    g = dcs.surface_gradient(p, gamma_c).abs().max().item()
    assert math.isclose(g, 2 * gamma_c, rel_tol=1e-9)  # the defining equation
    assert torch.all(dcs.reference_solution(p, 1.02 * gamma_c) == 0)
    assert dcs.reference_solution(p, 0.98 * gamma_c).abs().max() > 0
    # the largest planted |Oᵀθ| is the first direction to leave the surface below the threshold
    below = dcs.reference_solution(p, 0.9 * gamma_c)
    assert torch.count_nonzero(below) == 1 and below[0] != 0


def test_dcs_linear_training_meets_the_constraint_exactly_above_threshold_only():
    cfg, p = _problem()
    gamma_c = dcs.predicted_threshold(p)
    above = dcs.train_linear_constraint(p, 1.5 * gamma_c, cfg)
    below = dcs.train_linear_constraint(p, 0.5 * gamma_c, cfg)
    assert above["s"].norm() <= 1e-12
    ref = dcs.reference_solution(p, 0.5 * gamma_c)
    assert below["s"].norm() > 1e-2
    assert torch.allclose(below["s"], ref, atol=1e-6)
    assert torch.allclose(below["uv"], below["s"], atol=1e-10)  # s = Oᵀθ is carried by u ⊙ v


# ---------------------------------------------------------------------------------------------- transformer
def test_recall_data_has_the_stated_structure():
    cfg = transformer.CONFIGS["tiny"]
    x, y = transformer.make_data(cfg, 200, torch.Generator().manual_seed(0))
    assert x.shape == (200, cfg.pairs + 1, 2)
    keys, values = x[:, :-1, 0], x[:, :-1, 1]
    query = x[:, -1, 0] - cfg.n_keys
    assert torch.all(x[:, -1, 1] == cfg.n_values)  # the query position has the null value
    assert all(len(set(row.tolist())) == cfg.pairs for row in keys)  # distinct keys
    match = keys == query[:, None]
    assert torch.all(match.sum(1) == 1)
    assert torch.equal(values[match], y)


def test_score_matrices_give_the_attention_logits():
    cfg = transformer.CONFIGS["tiny"]
    model = transformer.make_model(cfg, "cpu").double()
    x, _ = transformer.make_data(cfg, 3, torch.Generator().manual_seed(1))
    emb = model.key_embed(x[..., 0]) + model.value_embed(x[..., 1])
    b, t, d = emb.shape
    q = model.q(emb).view(b, t, model.heads, model.d_head).transpose(1, 2)
    k = model.k(emb).view(b, t, model.heads, model.d_head).transpose(1, 2)
    logits = q @ k.transpose(-2, -1)
    via_scores = torch.einsum("bid,hde,bje->bhij", emb, model.score_matrices(), emb)
    assert torch.allclose(logits, via_scores, atol=1e-12)
    assert torch.all(torch.linalg.matrix_rank(model.score_matrices()) <= model.d_head)
