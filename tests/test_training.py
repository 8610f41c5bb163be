"""Training in parts (config, data, trainer, validation), the transform registry and the typed flow
metadata: one set of defaults for train_flow and ``flowpert train``, trainer state round trips,
transforms rebuilt from their spec, sizes and noise backend recorded in flow files."""
import dataclasses
import inspect
import json
import warnings

import pytest
import torch

import openmm_flowpert as fp
from openmm_flowpert.flow import TRANSFORMS, Affine, get_transform, register_transform, transform_from_state
from openmm_flowpert.flow.metadata import FlowMetadata
from openmm_flowpert.testsystems import GaussianMixtureTarget, TorsionChain
from openmm_flowpert.training import DEFAULTS, FlowTrainer, TrainingConfig, prepare_data
from openmm_flowpert.training.data import ladder_log_weights, repeat_to_share, reweight_ladder

SMALL = dict(epochs=2, hidden=16, n_layers=2, n_steps=4, lr=2e-3, ema=0.995, progress=False, seed=3)


@pytest.fixture(scope="module")
def chain():
    return TorsionChain(5)


@pytest.fixture(scope="module")
def chain_x(chain):
    return chain.sample_training(400, seed=0)


def _train_parser():
    import argparse

    from openmm_flowpert.cli import train

    p = argparse.ArgumentParser()
    train.add_parser(p.add_subparsers())
    return p


def test_one_set_of_defaults_for_library_and_cli():
    sig = inspect.signature(fp.train_flow).parameters
    cli = _train_parser().parse_args(["train", "--data", "d.dcd", "--out", "f.pt"])
    for f in dataclasses.fields(TrainingConfig):
        assert sig[f.name].default == getattr(DEFAULTS, f.name), f.name
        assert getattr(cli, f.name) == getattr(DEFAULTS, f.name), f.name
    # the defaults the command line used before (the README recipe, the bundled flow)
    assert (DEFAULTS.hidden, DEFAULTS.n_layers, DEFAULTS.batch_size, DEFAULTS.lr, DEFAULTS.ema, DEFAULTS.n_steps,
            DEFAULTS.epochs, DEFAULTS.patience) == (256, 3, 256, 1e-3, 0.999, 20, 300, None)


def test_cli_spellings_old_and_new():
    p = _train_parser()
    new = p.parse_args(["train", "--data", "d", "--out", "f", "--n-layers", "2", "--batch-size", "64",
                        "--n-steps", "4", "--minutes", "1.5"])
    old = p.parse_args(["train", "--data", "d", "--out", "f", "--layers", "2", "--batch", "64", "--steps", "4",
                        "--minutes", "1.5"])
    for name in ("n_layers", "batch_size", "n_steps", "minutes"):
        assert getattr(new, name) == getattr(old, name)
    assert (new.n_layers, new.batch_size, new.n_steps, new.minutes) == (2, 64, 4, 1.5)
    helptext = p._subparsers._group_actions[0].choices["train"].format_help()
    assert "--layers" not in helptext and "--n-layers" in helptext and "(default: 0.999)" in helptext
    # a boolean field is a switch (argparse's type=bool would read "--linear False" as True)
    assert p.parse_args(["train", "--data", "d", "--out", "f", "--linear"]).linear is True
    assert p.parse_args(["train", "--data", "d", "--out", "f", "--no-linear"]).linear is False
    assert new.linear is None and "--no-linear" in helptext  # None: on for internal coordinates (see below)
    assert new.linear_torsions is False
    assert p.parse_args(["train", "--data", "d", "--out", "f", "--linear-torsions"]).linear_torsions is True


def test_config_checks_and_minutes_alias(chain, chain_x):
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="former name"):
        fp.train_flow(chain_x, topology=chain.topology, minutes=1.0, max_minutes=1.0, **SMALL)
    with pytest.raises(ValueError, match="unknown transform"):
        fp.train_flow(chain_x, coordinates="polar", **SMALL)
    with pytest.raises(ValueError, match="molecular flows"):  # before any training
        fp.train_flow(GaussianMixtureTarget(dim=4).sample(100, seed=0), energy=lambda x: x, **SMALL)


def test_trainer_state_dict_resumes_bit_for_bit(chain, chain_x):
    """An epoch-by-epoch run and a run restarted from state_dict() after epoch 1 end identical."""
    def parts():
        cfg = TrainingConfig(**{k: v for k, v in SMALL.items() if k != "progress"})
        gen = torch.Generator().manual_seed(cfg.seed)
        data = prepare_data(chain_x, coordinates="internal", topology=chain.topology, validation_fraction=0.1,
                            generator=gen)
        return FlowTrainer(data, cfg, gen)

    full = parts()
    full.fit(progress=False)
    first = parts()
    first.record(1, first.validation_loss(first.train_epoch()))
    state = first.state_dict()
    resumed = parts()
    resumed.load_state_dict(state)
    resumed.fit(progress=False)
    assert resumed.epoch == full.epoch == 2 and resumed.best == full.best
    for a, b in zip(full.best_velocity().state_dict().values(), resumed.best_velocity().state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another run"):
        parts().load_state_dict(dict(state, seed=99))


@pytest.mark.parametrize("coordinates", sorted(TRANSFORMS))
def test_registered_transforms_rebuild_from_spec(chain, chain_x, coordinates):
    x = torch.as_tensor(chain_x, dtype=torch.float64).reshape(len(chain_x), -1)
    x = fp.noise.project_mean_free(x, 5)
    t = get_transform(coordinates).from_samples(x, 5, True, topology=chain.topology)
    spec = json.loads(json.dumps(t.spec()))  # what a flow file stores
    again = transform_from_state(spec, t.state_dict())
    y, ld = t.inverse(x[:8])
    y2, ld2 = again.inverse(x[:8])
    assert torch.equal(y, y2) and torch.equal(ld, ld2)
    assert torch.equal(t(y)[0], again(y)[0])
    assert set(t.flow_layout(y.shape[1], t.cnf_particles())) >= {"coordinates", "x_dim", "mean_free"}


def test_flow_records_sizes_transform_and_backend(chain, chain_x):
    flow = fp.train_flow(chain_x, topology=chain.topology, n_freq=3, **SMALL)
    m = flow.info
    # the defaults for molecules: internal coordinates, a linear map of the bonds and angles (not the torsions)
    assert m.velocity == {"kind": "VelocityMLP", "dim": 9, "hidden": 16, "n_layers": 2, "n_freq": 3, "n_cond": 0,
                          "linear": True, "linear_exclude": [5, 8]}
    assert m.transform == {"name": "internal-cdf", "config": {"n_atoms": 5}}
    assert (m.training["linear"], m.training["linear_torsions"]) == (True, False)
    assert m.noise_backend == fp.noise.backend() and m.training["epochs"] == 2
    assert FlowMetadata.from_json(m.to_json()) == m and m.to_json() == flow.metadata


def test_linear_map_default_per_transform(chain, chain_x):
    """``linear=None`` (the default) is on for a molecule in internal coordinates and off for
    mean-free Cartesians and abstract targets, whose flows have no torsions; an explicit value wins."""
    assert "linear" not in fp.train_flow(chain_x, coordinates="cartesian", **SMALL).info.velocity
    assert "linear" not in fp.train_flow(chain_x.reshape(len(chain_x), -1), remove_com=False,
                                         **SMALL).info.velocity
    off = fp.train_flow(chain_x, topology=chain.topology, linear=False, **SMALL)
    assert "linear" not in off.info.velocity and off.info.training["linear"] is False


@pytest.mark.parametrize("coordinates", ["internal-cdf", "internal-torus"])
def test_linear_map_without_torsions(chain, chain_x, coordinates):
    """``linear_torsions=False``: the transform's torsions (every third coordinate from the sixth,
    on the line or on the circle) are excluded from the linear map, recorded in the flow file; the
    linear map of the trained flow couples the bonds and angles only."""
    flow = fp.train_flow(chain_x, topology=chain.topology, coordinates=coordinates, linear=True,
                         linear_torsions=False, **SMALL)
    assert flow.info.velocity["linear_exclude"] == [5, 8]
    assert flow.info.training["linear_torsions"] is False
    velocity, _ = flow.parts()
    a = velocity.lin_weight.detach().abs().sum(0)  # (D, D + m)
    assert a[[5, 8]].max() == 0 and a.max() > 0
    assert torch.equal(velocity.lin_mask[[5, 8]], torch.zeros(2, a.shape[1], dtype=velocity.lin_mask.dtype))


def test_old_metadata_still_loads_and_rescripts(chain, chain_x, tmp_path):
    """A file without the new entries: its transform comes from "coordinates", the sizes from the
    weights; rescripted() then records them. The recorded sizes are what rescripted() uses."""
    flow = fp.train_flow(chain_x, coordinates="cartesian", **SMALL)
    old = {k: v for k, v in flow.metadata.items() if k not in ("velocity", "transform", "noise_backend")}
    legacy = fp.PerturbedFlow(flow.module, old)
    legacy.save(tmp_path / "old.pt")
    loaded = fp.PerturbedFlow.load(tmp_path / "old.pt")
    assert loaded.info.transform == {"name": "cartesian", "config": {"n_particles": 5}}
    assert loaded.info.velocity is None and loaded.info.noise_backend is None
    new = loaded.rescripted()
    assert new.metadata["velocity"] == flow.metadata["velocity"] and new.metadata["transform"] == flow.metadata[
        "transform"]
    a, b = flow.propose(8, fp.Noise(1)), new.propose(8, fp.Noise(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.log_q, b.log_q)
    wrong = fp.PerturbedFlow(flow.module, dict(flow.metadata, velocity=dict(flow.metadata["velocity"], n_freq=7)))
    with pytest.raises(ValueError, match="not a VelocityMLP"):
        wrong.rescripted()


def test_load_warns_when_the_noise_backend_differs(chain, chain_x, tmp_path):
    flow = fp.train_flow(chain_x, coordinates="cartesian", **SMALL)
    other = "torch" if fp.noise.backend() == "native" else "native"
    fp.PerturbedFlow(flow.module, dict(flow.metadata, noise_backend=other)).save(tmp_path / "other.pt")
    with pytest.warns(UserWarning, match="noise backend") as rec:
        fp.PerturbedFlow.load(tmp_path / "other.pt")
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    flow.save(tmp_path / "same.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.PerturbedFlow.load(tmp_path / "same.pt")


def test_a_new_transform_plugs_in_without_new_branches(chain_x):
    """A registered transform is fitted by train_flow(coordinates=name), compiled, saved and
    re-compiled with no change to PerturbedFlow or the training code."""

    @register_transform
    class HalfScale(Affine):
        name = "test-half-scale"

        @classmethod
        def from_samples(cls, x, n_atoms, mean_free, topology=None):
            return cls(x.mean(0), 0.5 * (x - x.mean(0)).std(0).clamp_min(1e-6), n_particles=0)

    try:
        flow = fp.train_flow(chain_x, coordinates="test-half-scale", remove_com=False, **SMALL)
        assert flow.metadata["transform"]["name"] == "test-half-scale" and flow.d == 15
        new = flow.rescripted()
        assert new.metadata["transform"] == flow.metadata["transform"]
        assert torch.equal(new.sample(4, seed=1), flow.sample(4, seed=1))
    finally:
        TRANSFORMS.pop("test-half-scale")


def test_training_checkpoint_refuses_other_settings(tmp_path):
    """A training checkpoint resumes only the run it belongs to: another learning rate (a different
    schedule) is refused with one line naming the setting, other training samples too; another
    wall-clock budget is not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    kw = dict(epochs=2, hidden=8, n_layers=1, n_steps=2, progress=False, seed=0)
    ck = str(tmp_path / "t.ckpt")
    fp.train_flow(x, checkpoint=ck, checkpoint_every=1, **kw)
    fp.train_flow(x, checkpoint=ck, checkpoint_every=1, minutes=5.0, **kw)      # a stopping rule: same run
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 there, 0.002 now\)"):
        fp.train_flow(x, checkpoint=ck, lr=2e-3, **kw)
    y = x.clone()
    y[7, 1] += 1e-9                                   # other samples of the same shape: another run
    with pytest.raises(ValueError, match=r"does not fit this run \(the training state belongs to other training "
                                         r"samples \(300 frames, sha1 [0-9a-f]{12}; this run: 300 frames"):
        fp.train_flow(y, checkpoint=ck, **kw)


def test_repeat_to_share_adds_whole_copies_of_the_region_frames():
    """3 of 1,000 frames in the region, share 0.01: the whole number of extra copies whose share is
    nearest (2 copies: 9 / 1006), each copy with its frame's temperature; a region already above the
    share is left alone; no region frame, a share outside (0, 1) or a mask of the wrong length is refused."""
    import numpy as np

    x = np.arange(1000.0)[:, None]
    mask = x[:, 0] < 3
    temps = np.where(mask, 330.0, 300.0)
    y, t, info = repeat_to_share(x, mask, 0.01, temps)
    assert info == dict(frames=1000, region_frames=3, copies=2, share=9 / 1006)
    shares = [3 * (1 + k) / (1000 + 3 * k) for k in range(6)]
    assert min(range(6), key=lambda k: abs(shares[k] - 0.01)) == 2
    np.testing.assert_array_equal(y[:1000], x)
    np.testing.assert_array_equal(y[1000:, 0], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(t[1000:], 330.0)
    assert len(t) == len(y) == 1006
    y, t, info = repeat_to_share(x, mask, 0.001)
    assert info["copies"] == 0 and len(y) == 1000 and t is None
    with pytest.warns(UserWarning, match="repeated 141 more times"):   # few frames, a large share
        assert repeat_to_share(x, mask, 0.3)[2]["copies"] == 141
    with pytest.raises(ValueError, match="no frame lies in the region"):
        repeat_to_share(x, np.zeros(1000, bool), 0.01)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"share must be in \(0, 1\)"):
            repeat_to_share(x, mask, bad)
    with pytest.raises(ValueError, match="one per frame"):
        repeat_to_share(x, mask[:10], 0.01)


def _harmonic_ladder(seed: int, d: int = 6, n: int = 4000):
    """Reduced energies of a d-dimensional harmonic well drawn exactly at four temperatures: U / kT_k
    is Gamma(d / 2) at every T_k, so <U / kT> = d / 2 at any T."""
    import numpy as np

    temps = np.repeat([300.0, 360.0, 430.0, 520.0], n)
    return temps, np.random.default_rng(seed).gamma(d / 2, 1.0, size=temps.size)


@pytest.mark.parametrize("target", [300.0, 450.0])
def test_ladder_weights_recover_the_mean_energy_at_a_temperature(target):
    """Frames pooled from a 300-520 K ladder and weighted to 300 K (on the ladder) or 450 K (between
    two rungs) give the exact <U / kT> = 3 of a 6-dimensional harmonic well within 4 delta-method SE
    (z over seeds 0-5: 1.47, -1.16, 0.70, 1.17, 0.83, 0.12 at 300 K; 0.53, -1.47, -0.26, 0.38, 0.51,
    -0.03 at 450 K). Negative control: the same weights with the rungs' free energies left at zero (one
    iteration) are off by -17 to -25 SE on the same draws."""
    import numpy as np

    temps, g = _harmonic_ladder(seed=0)
    u = g * temps / target                                 # each frame's U / kT at the target

    def z(max_iterations):
        w = np.exp(ladder_log_weights(u, temps, target, max_iterations=max_iterations))
        mean = np.sum(w * u)
        return (mean - 3.0) / np.sqrt(np.sum(w ** 2 * (u - mean) ** 2))

    assert abs(z(10000)) < 4
    assert z(1) < -4


def test_ladder_weights_agree_with_pymbar():
    """The weights are MBAR's: pymbar (an independent implementation) gives the same to 1e-8 relative."""
    import numpy as np

    pymbar = pytest.importorskip("pymbar")
    temps, g = _harmonic_ladder(seed=1, n=500)
    u = g * temps / 300.0
    ladder = np.unique(temps)
    mbar = pymbar.MBAR(u[None, :] * 300.0 / ladder[:, None], np.bincount(np.unique(temps, return_inverse=True)[1]))
    w = np.exp(ladder_log_weights(u, temps, 300.0))
    np.testing.assert_allclose(w, mbar.W_nk[:, 0], rtol=1e-8, atol=1e-14)


def test_reweight_ladder_draws_frames_in_proportion_to_their_weights():
    """Systematic resampling: a frame of weight w appears floor or ceil of n_frames * w times; the drawn
    set's mean energy is the weighted mean within that rounding; each rung's share and the Kish size are reported; wrong
    shapes, non-finite energies and zero counts are refused with the fix."""
    import numpy as np

    temps, g = _harmonic_ladder(seed=2, n=300)
    u = g * temps / 300.0
    x = np.arange(u.size)[:, None, None] * np.ones((1, 2, 3))
    y, info = reweight_ladder(x, temps, u, 300.0, n_frames=5000, seed=4)
    w = np.exp(ladder_log_weights(u, temps, 300.0))
    counts = np.bincount(y[:, 0, 0].astype(int), minlength=u.size)
    assert y.shape == (5000, 2, 3) and np.all(np.abs(counts - 5000 * w) < 1 + 1e-9)
    mean = np.sum(w * u)   # each count is off by < 1, so the drawn mean by < sum |u - mean| / n_frames
    assert abs(u[y[:, 0, 0].astype(int)].mean() - mean) < np.sum(np.abs(u - mean)) / 5000
    assert info["frames"] == 1200 and info["distinct"] == np.count_nonzero(counts)
    assert abs(info["kish_frames"] - 1 / np.sum(w ** 2)) < 1e-9
    assert abs(sum(info["share"].values()) - 1) < 1e-12 and info["share"][300.0] > info["share"][520.0]
    with pytest.raises(ValueError, match="one per frame"):
        reweight_ladder(x[:10], temps, u, 300.0)
    with pytest.raises(ValueError, match="one of each per frame"):
        ladder_log_weights(u[:10], temps, 300.0)
    with pytest.raises(ValueError, match="non-finite energy; remove them"):
        ladder_log_weights(np.where(np.arange(u.size) == 3, np.inf, u), temps, 300.0)
    with pytest.raises(ValueError, match="positive count"):
        reweight_ladder(x, temps, u, 300.0, n_frames=0)
