"""Logging where users look: SymmetryMonitor → TensorBoard / W&B-like writers, its history plot, the
Lightning callback → trainer loggers (CSVLogger's metrics.csv), the Hugging Face Trainer callback →
state.log_history; and the report figures' data (clipped spectra, deduplicated kinds, stacked unit bars)."""

from __future__ import annotations

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mirrorsym as ms
from mirrorsym.diagnose import plots
from mirrorsym.diagnose.monitor import scalars

F64 = torch.float64


def planted_mlp(hidden=8, dead=(1, 5), dups=((2, 6),), seed=0):
    """5 → hidden → 3 tanh MLP with planted dead units and duplicated pairs (exactly)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(F64)
    with torch.no_grad():
        for k in dead:
            net[0].weight[k] = 0
            net[0].bias[k] = 0
            net[2].weight[:, k] = 0
        for a, b in dups:
            net[0].weight[b] = net[0].weight[a]
            net[0].bias[b] = net[0].bias[a]
            net[2].weight[:, b] = net[2].weight[:, a]
    return net


def _train(net, x, y, steps, monitor=None, lr=0.05):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        if monitor is not None:
            monitor.step()


class FakeWriter:
    """Records add_scalar / add_figure calls (the SummaryWriter interface)."""

    def __init__(self):
        self.scalars, self.figures = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_figure(self, tag, fig, step):
        self.figures.append((tag, step, len(fig.axes)))


class FakeRun:
    """A wandb-run-like object: only log(dict)."""

    def __init__(self):
        self.rows = []

    def log(self, row):
        self.rows.append(row)


# -------------------------------------------------------------------------------------- scalars / writers
def test_scalar_names_follow_the_report_and_skip_nan():
    net = planted_mlp()
    x = torch.randn(2, 5, dtype=F64)
    rep = ms.diagnose(net, x)
    values = scalars(rep)
    groups = rep.to_pandas()
    perm = groups[groups["kind"] == "permutation"].iloc[0]
    base = "mirrorsym/" + "".join(perm["group"].split())
    assert values[f"{base}/dead"] == 2 and values[f"{base}/distinct"] == 5 and values[f"{base}/duplicated"] == 1
    assert values[f"{base}/distance"] == pytest.approx(perm["distance"])
    assert not any(k.startswith(base + "/") and k.endswith("rank") for k in values)  # NaN for unit groups
    assert all(math.isfinite(v) for v in values.values()) and all(" " not in k for k in values)


def test_monitor_writes_scalars_and_figures_to_a_writer():
    net = planted_mlp()
    x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    writer = FakeWriter()
    mon = ms.SymmetryMonitor(net, x[:2], every=2, writer=writer, figures=True)
    _train(net, x, y, 5, mon)
    steps = sorted({s for _, _, s in writer.scalars})
    assert steps == [0, 2, 4]
    tags = {t for t, _, _ in writer.scalars}
    assert any(t.endswith("/dead") for t in tags) and any(t.endswith("/distance") for t in tags)
    assert {t for t, _, _ in writer.figures} >= {"mirrorsym/dead_distinct", "mirrorsym/history"}
    run = FakeRun()
    mon2 = ms.SymmetryMonitor(net, x[:2], every=1, writer=run)
    mon2.step()
    assert run.rows and run.rows[0]["mirrorsym/step"] == 0 and any(k.endswith("/dead") for k in run.rows[0])
    with pytest.raises(TypeError, match="add_scalar"):
        ms.SymmetryMonitor(net, x[:2], writer=object())


def test_summary_writer_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    net = planted_mlp()
    x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    with SummaryWriter(tmp_path / "tb") as writer:
        mon = ms.SymmetryMonitor(net, x[:2], every=3, writer=writer)
        _train(net, x, y, 7, mon)
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = acc.Tags()["scalars"]
    dead = next(t for t in tags if t.startswith("mirrorsym/permutation") and t.endswith("/dead"))
    events = acc.Scalars(dead)
    assert [e.step for e in events] == [0, 3, 6] and all(e.value == 2 for e in events)


def test_monitor_plot_draws_every_metric_per_group(tmp_path):
    net = planted_mlp()
    x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    mon = ms.SymmetryMonitor(net, x[:2], every=2)
    with pytest.raises(ValueError, match="no record"):
        mon.plot()
    _train(net, x, y, 5, mon)
    fig = mon.plot()
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert {"dead", "distinct", "distance"} <= set(titles)
    dead_ax = next(ax for ax in fig.axes if ax.get_title() == "dead")
    (line,) = dead_ax.get_lines()  # the sign flip over the permutation's units repeats its counts: drawn once
    assert list(line.get_xdata()) == [0, 2, 4] and list(line.get_ydata()) == [2, 2, 2]
    dist_ax = next(ax for ax in fig.axes if ax.get_title() == "distance")
    n_groups = mon.history["group"].nunique()
    assert len(dist_ax.get_lines()) == n_groups == 2
    styles = {line.get_linestyle() for line in dist_ax.get_lines()}
    assert len(styles) == n_groups  # permutation and sign flip of the same layer: different line styles
    plt.close(fig)
    path = mon.plot(tmp_path / "h" / "history.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- figures
def test_dead_distinct_bars_stack_to_units():
    rep = ms.diagnose(planted_mlp(), torch.randn(2, 5, dtype=F64))
    fig = plots.dead_distinct_figure(rep)
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches]).reshape(3, -1)  # dead, duplicated, distinct
    assert heights[:, 0].tolist() == [2, 1, 5] and heights.sum(0).tolist() == [8]
    bottoms = np.array([p.get_y() for p in ax.patches]).reshape(3, -1)
    assert bottoms[:, 0].tolist() == [0, 2, 3]  # stacked
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dead", "duplicated", "distinct"]
    assert ax.get_ylim()[1] == pytest.approx(8 * 1.08)
    plt.close(fig)


def test_spectra_are_clipped_and_kinds_deduplicated():
    rep = ms.diagnose(planted_mlp(), torch.randn(2, 5, dtype=F64))
    fig = plots.spectra_figure(rep)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # the permutation and the sign flip of layer 0,2 share their canonical units: one line, both kinds
    assert labels == ["0,2: permutation = sign_flip"]
    (line,) = ax.get_lines()
    assert line.get_ydata().min() >= plots.SPECTRUM_FLOOR  # the planted dead units: 0 → drawn at the floor
    low, high = ax.get_ylim()
    assert low == pytest.approx(plots.SPECTRUM_FLOOR / 2) and high == 2.0
    assert "clipped below 1e-12" in ax.get_ylabel()
    plt.close(fig)


def test_cnn_channels_count_once_and_their_kinds_share_a_line():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        cnn[0].weight[2] = 0
        cnn[0].bias[2] = 0
        cnn[4].weight.view(3, 4, 36)[:, 2] = 0
    rep = ms.diagnose(cnn, torch.randn(2, 1, 8, 8))
    assert len(rep.to_pandas()) >= 3  # permutation, rescale and BatchNorm-scale groups of the same 4 channels
    bars = plots.unit_bars(rep)
    assert bars[["units", "dead", "duplicated", "distinct"]].values.tolist() == [[4, 1, 0, 3]]
    fig = plots.dead_distinct_figure(rep)
    assert len(fig.axes[0].patches) == 3  # one stacked bar (three parts)
    plt.close(fig)
    labels = [ln["label"] for ln in plots.spectrum_lines(rep)]
    assert any(label.endswith("permutation = rescale") for label in labels)


def test_rotation_only_report_has_no_unit_bars():
    from mirrorsym.diagnose.report import GROUP_COLUMNS

    row = dict.fromkeys(GROUP_COLUMNS, float("nan")) | {"group": "qk:0", "kind": "rotation", "layer": "attn",
                                                        "units": 4, "num_rank": 2}
    rep = ms.diagnose.DiagnoseReport(groups=pd.DataFrame([row], columns=list(GROUP_COLUMNS)))
    assert plots.unit_bars(rep).empty and plots.dead_distinct_figure(rep) is None


def test_embedding_spectrum_axis_spans_the_data_only():
    rep = ms.diagnose.DiagnoseReport(groups=pd.DataFrame(columns=["group", "layer", "kind"]))
    rep.embedding_spectrum = np.array([0.0, 1e-20, 3e-3, 2.0, 1e-300])  # unsorted, with exact zeros
    rep.meta["rows"] = 3
    fig = plots.embedding_figure(rep)
    ax = fig.axes[0]
    y = ax.get_lines()[0].get_ydata()
    assert y.tolist() == [1.0, 1.5e-3, 1e-12, 1e-12, 1e-12]
    assert ax.get_ylim() == pytest.approx((5e-13, 2.0))
    assert "clipped below 1e-12" in ax.get_ylabel()
    assert any("rank bound" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
    rep.embedding_spectrum = np.array([4.0, 2.0, 1.0])
    fig = plots.embedding_figure(rep)
    assert fig.axes[0].get_ylim()[0] == pytest.approx(0.25 / 2)  # no empty decades below the data
    plt.close(fig)


def test_report_plot_writes_the_pngs(tmp_path):
    rep = ms.diagnose(planted_mlp(), torch.randn(2, 5, dtype=F64), data=torch.randn(20, 5, dtype=F64))
    names = {p.name for p in rep.plot(tmp_path)}
    assert {"dead_distinct.png", "singular_spectra.png", "correlation_heatmap.png", "activity.png"} <= names
    assert plt.get_fignums() == []  # every figure closed


# --------------------------------------------------------------------------------------------- Lightning
def test_lightning_csv_logger_gets_the_mirrorsym_columns(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from mirrorsym.diagnose.lightning import SymmetryMonitorCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = planted_mlp().float()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = ((self(x) - y) ** 2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 5, generator=g), torch.randn(24, 3, generator=g))
    callback = SymmetryMonitorCallback(torch.randn(2, 5), every=2, figures=True)
    loggers = [CSVLogger(tmp_path / "csv")]
    if tb := _has_tensorboard():
        loggers.append(TensorBoardLogger(tmp_path / "tb"))
    trainer = L.Trainer(
        max_steps=6, logger=loggers, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    csv = pd.read_csv(next((tmp_path / "csv").rglob("metrics.csv")))
    dead = [c for c in csv.columns if c.startswith("mirrorsym/permutation") and c.endswith("/dead")]
    assert dead and "loss" in csv.columns
    rows = csv.dropna(subset=dead)
    assert sorted(rows["step"]) == [0, 2, 4, 6] and (rows[dead[0]] == 2).all()
    assert sorted(callback.history["step"].unique()) == [0, 2, 4, 6]
    if tb:  # figures go to the TensorBoard logger (add_figure), scalars too
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.*")).parent)).Reload()
        assert {"mirrorsym/dead_distinct", "mirrorsym/history"} <= set(acc.Tags()["images"])
        assert any(t.startswith("mirrorsym/") for t in acc.Tags()["scalars"])


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ Hugging Face
class _HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = planted_mlp().float()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out} if labels is not None else out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("attach", [True, False])
def test_hf_trainer_log_history_gets_the_metrics(tmp_path, attach):
    transformers = pytest.importorskip("transformers")
    from mirrorsym.diagnose.hf import SymmetryMonitorCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], logging_steps=100,
        save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=0.05, dataloader_num_workers=0,
    )
    callback = SymmetryMonitorCallback(torch.randn(2, 5), every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(
            model=_HFModel(), args=args, train_dataset=_Rows(), callbacks=None if attach else [callback]
        )
        if attach:
            callback.attach(trainer)
        trainer.train()
    entries = [e for e in trainer.state.log_history if any(k.startswith("mirrorsym/") for k in e)]
    assert [e["step"] for e in entries] == [0, 2, 4]
    dead = next(k for k in entries[0] if k.startswith("mirrorsym/permutation") and k.endswith("/dead"))
    assert all(e[dead] == 2 for e in entries)
    assert sorted(callback.history["step"].unique()) == [0, 2, 4]


def test_readme_logging_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Logging\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    env = {"ms": ms, "model": planted_mlp(), "example_inputs": torch.randn(2, 5, dtype=F64)}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102
    assert (tmp_path / "history.png").exists() and any((tmp_path / "runs" / "tb").iterdir())
