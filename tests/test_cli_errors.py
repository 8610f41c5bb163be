"""Bad input on the command line (issue 15): every case ends in one line, ``flowpert CMD: error: ...``,
with exit status 2, no traceback, and nothing written or changed on disk; Ctrl-C and internal
errors end in one line too (exit 130 and 1); an interrupted ``simulate`` resumes where it stopped.

The cases run in-process (``main([...])``) in one folder holding a tiny trajectory and the inputs the
cases need (empty and damaged files, a file and a folder in the way of outputs, checkpoints of
earlier runs)."""
import json
import os
import tempfile

import numpy as np
import pytest

import openmm_flowpert as fp  # noqa: F401  (torch before openmm)
from openmm_flowpert.cli import main

S = ["--ns", "0.001", "--frame-ps", "0.1", "--equilibration-ps", "0.1"]       # a tiny simulate
DATA = ["--ns", "0.002", "--frame-ps", "0.1", "--equilibration-ps", "0.1"]    # the fixture's trajectory
T = ["--data", "data/ala.dcd", "--epochs", "1", "--no-validate"]             # a tiny train
NET = ["--hidden", "32", "--n-layers", "2", "--n-steps", "4"]                 # the network of ck/flow.pt.ckpt
SAMPLE_CK = dict(md_steps=10)                                                # the run in smp/checkpoint.pt


def _unwritable_folder():
    """A folder in which nobody can create a file (a chmod'ed folder does not stop root)."""
    for d in ("/sys", "/proc"):
        try:
            fd, p = tempfile.mkstemp(dir=d)
        except OSError:
            return d
        os.close(fd)
        os.unlink(p)
    return None


UNWRITABLE = _unwritable_folder()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder the cases run in: data/ala.dcd (20 frames of alanine dipeptide, stored in
    data/ala.nc), files in the way, damaged inputs, a training checkpoint (32 wide) and a sample
    checkpoint (plain MD, 10 steps per iteration)."""
    d = tmp_path_factory.mktemp("cli_errors")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["simulate", "--out", "data/ala.dcd", *DATA]) == 0
        (d / "afile").write_text("not a folder\n")
        (d / "tr").mkdir()
        (d / "empty.dcd").write_bytes(b"")
        (d / "garbage.dcd").write_bytes(np.random.default_rng(0).bytes(3000))
        (d / "weird.foo").write_text("hello\n")
        (d / "empty.pdb").write_text("")
        (d / "e.prmtop").write_text("\n")
        (d / "e.inpcrd").write_text("\n")
        (d / "flow.txt").write_text("")
        (d / "notes.txt").write_text("x")
        # a training run interrupted after its first epoch, of a 32-wide network
        from openmm_flowpert.cli._io import read_trajectory

        x, top = read_trajectory("data/ala.dcd")
        fp.train_flow(x, topology=top.to_openmm(), coordinates="internal", hidden=32, n_layers=2, n_steps=4,
                      epochs=3, checkpoint="ck/flow.pt.ckpt", checkpoint_every=1, minutes=0.0, progress=False)
        assert os.path.isfile("ck/flow.pt.ckpt")
        # a plain-MD sample run (what `flowpert sample --plain-md --md-steps 10` stores)
        from openmm_flowpert.samplers import run_hybrid
        from openmm_flowpert.systems import get_system

        ala = get_system("alanine-dipeptide")
        run_hybrid(ala.system, ala.positions, 300.0, None, n_iterations=2, checkpoint="smp/checkpoint.pt",
                   progress=False, **SAMPLE_CK)
        # a plain replica-exchange sample run (`flowpert sample --plain-md --temperatures 300,330 --md-steps 10`)
        from openmm_flowpert.samplers.replica_exchange import run_replica_exchange

        run_replica_exchange(ala.system, ala.positions, [300.0, 330.0], 1, "rex/replica_exchange.nc", md_steps=10,
                             progress=False)
    finally:
        os.chdir(cwd)
    return d


def _snapshot(root):
    """Every path under ``root`` with, for files, size and mtime (folder mtimes are left out: the
    writability check creates and removes a probe file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
        for n in filenames:
            st = os.stat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


# (id, argv, text the message must contain)
CASES = [
    # -- sample ---------------------------------------------------------------------------------------
    ("sample-iterations-0", ["sample", "--out", "D", "--iterations", "0"], ">= 1"),
    ("sample-iterations-neg", ["sample", "--out", "D", "--iterations", "-3"], ">= 1"),
    ("sample-iterations-text", ["sample", "--out", "D", "--iterations", "many"], "not an integer"),
    ("sample-minutes-0", ["sample", "--out", "D", "--minutes", "0"], "> 0"),
    ("sample-minutes-neg", ["sample", "--out", "D", "--minutes", "-1"], "> 0"),
    ("sample-minutes-nan", ["sample", "--out", "D", "--minutes", "nan"], "not a number"),
    ("sample-ladder-0", ["sample", "--out", "D", "--temperatures", "300:600:0"], "N (the number of temperatures)"),
    ("sample-ladder-2-parts", ["sample", "--out", "D", "--temperatures", "300:600"], "LO:HI:N"),
    ("sample-temperature-neg", ["sample", "--out", "D", "--temperatures", "300,-5"], "> 0 K"),
    ("sample-temperature-text", ["sample", "--out", "D", "--temperature", "warm"], "bad temperatures"),
    ("sample-ladder-reversed", ["sample", "--out", "D", "--temperatures", "600:300:4"], "LO <= HI"),
    ("sample-minutes-with-ladder", ["sample", "--out", "D", "--temperatures", "300,330", "--minutes", "1"],
     "single temperature"),
    ("sample-recycle-plain-md", ["sample", "--out", "D", "--recycle", "--plain-md"], "--recycle needs flow moves"),
    ("sample-recycle-metropolis", ["sample", "--out", "D", "--recycle", "--selection", "metropolis"],
     "--recycle needs --selection weights"),
    ("sample-recycle-ladder", ["sample", "--out", "D", "--recycle", "--temperatures", "300,330"],
     "single temperature"),
    ("sample-device-banana", ["sample", "--out", "D", "--device", "banana"], "unknown torch device"),
    ("sample-device-missing-gpu", ["sample", "--out", "D", "--device", "cuda:99"], "cuda"),
    ("sample-md-steps-neg", ["sample", "--out", "D", "--md-steps", "-5"], ">= 1"),
    ("sample-md-steps-0", ["sample", "--out", "D", "--md-steps", "0"], ">= 1"),
    ("sample-proposals-0", ["sample", "--out", "D", "--proposals", "0"], ">= 1"),
    ("sample-seed-neg", ["sample", "--out", "D", "--seed", "-1"], "from 0 to"),
    ("sample-estimator", ["sample", "--out", "D", "--estimator", "best"], "invalid choice"),
    ("sample-no-out", ["sample", "--iterations", "3"], "required: --out"),
    ("sample-out-is-file", ["sample", "--out", "afile"], "is a file"),
    ("sample-out-under-file", ["sample", "--out", "afile/run"], "not a folder"),
    ("sample-flow-missing", ["sample", "--out", "D", "--flow", "missing.pt"], "does not exist"),
    ("sample-flow-empty", ["sample", "--out", "D", "--flow", "flow.txt"], "is empty"),
    ("sample-flow-not-a-flow", ["sample", "--out", "D", "--flow", "notes.txt", "--iterations", "1"], "flow file"),
    ("sample-no-bundled-flow", ["sample", "--out", "D", "--system", "cln025"], "no bundled flow"),
    ("sample-system-unknown", ["sample", "--out", "D", "--system", "ubiquitin"], "unknown system"),
    ("sample-system-empty-pdb", ["sample", "--out", "D", "--plain-md", "--system", "empty.pdb"], "--system"),
    ("sample-resume-other-settings", ["sample", "--out", "smp", "--plain-md", "--md-steps", "20",
                                      "--iterations", "3"], "--restart"),
    ("sample-ladder-resume-other-settings", ["sample", "--out", "rex", "--plain-md", "--temperatures", "300,340",
                                             "--md-steps", "10", "--iterations", "2"], "--restart"),
    # -- simulate -------------------------------------------------------------------------------------
    ("simulate-ladder-0", ["simulate", "--out", "x/a.dcd", *S, "--temperatures", "300:600:0"], "N (the number"),
    ("simulate-ladder-2-parts", ["simulate", "--out", "x/a.dcd", *S, "--temperatures", "300:600"], "LO:HI:N"),
    ("simulate-frame-ps-0", ["simulate", "--out", "x/a.dcd", *S, "--frame-ps", "0"], "> 0"),
    ("simulate-timestep-0", ["simulate", "--out", "x/a.dcd", *S, "--timestep-fs", "0"], "> 0"),
    ("simulate-friction-neg", ["simulate", "--out", "x/a.dcd", *S, "--friction", "-1"], "> 0"),
    ("simulate-ns-0", ["simulate", "--out", "x/a.dcd", *S, "--ns", "0"], "> 0"),
    ("simulate-ns-neg", ["simulate", "--out", "x/a.dcd", *S, "--ns", "-1"], "> 0"),
    ("simulate-ns-below-a-frame", ["simulate", "--out", "x/a.dcd", *S, "--ns", "0.00001"], "shorter than one frame"),
    ("simulate-frame-below-a-step", ["simulate", "--out", "x/a.dcd", *S, "--frame-ps", "0.0001"],
     "shorter than one --timestep-fs"),
    ("simulate-equilibration-neg", ["simulate", "--out", "x/a.dcd", *S, "--equilibration-ps", "-5"], ">= 0"),
    ("simulate-seed-neg", ["simulate", "--out", "x/a.dcd", *S, "--seed", "-1"], "from 0 to"),
    ("simulate-platform", ["simulate", "--out", "x/a.dcd", *S, "--platform", "Banana"], "unknown OpenMM platform"),
    ("simulate-out-under-file", ["simulate", "--out", "afile/x.dcd", *S], "not a folder"),
    ("simulate-out-is-file-no-ext", ["simulate", "--out", "afile", *S], ".dcd"),
    ("simulate-out-txt", ["simulate", "--out", "sim/x.txt", *S], ".dcd"),
    ("simulate-out-is-folder", ["simulate", "--out", "tr", *S], "is a folder"),
    ("simulate-out-nc", ["simulate", "--out", "sim/x.nc", *S], "storage"),
    ("simulate-out-h5-without-pytables", ["simulate", "--out", "sim/x.h5", *S], "PyTables"),
    ("simulate-system-empty-pdb", ["simulate", "--system", "empty.pdb", "--out", "x/a.dcd", *S], "--system"),
    ("simulate-system-empty-amber", ["simulate", "--system", "e.prmtop:e.inpcrd", "--out", "x/a.dcd", *S],
     "--system"),
    ("simulate-system-missing-amber", ["simulate", "--system", "m.prmtop:m.inpcrd", "--out", "x/a.dcd", *S],
     "does not exist"),
    ("simulate-forcefield-missing", ["simulate", "--system", "data/ala.pdb", "--forcefield", "./no.xml",
                                     "--out", "x/a.dcd", *S], "--forcefield"),
    ("simulate-resume-other-settings", ["simulate", "--out", "data/ala.dcd", *DATA, "--seed", "3"], "--restart"),
    # -- train ----------------------------------------------------------------------------------------
    ("train-batch-0", ["train", *T, "--out", "t.pt", "--batch", "0"], ">= 1"),
    ("train-batch-size-0", ["train", *T, "--out", "t.pt", "--batch-size", "0"], ">= 1"),
    ("train-epochs-0", ["train", *T, "--out", "t.pt", "--epochs", "0"], ">= 1"),
    ("train-epochs-neg", ["train", *T, "--out", "t.pt", "--epochs", "-2"], ">= 1"),
    ("train-stride-0", ["train", *T, "--out", "t.pt", "--stride", "0"], ">= 1"),
    ("train-stride-neg", ["train", *T, "--out", "t.pt", "--stride", "-1"], ">= 1"),
    ("train-stride-too-large", ["train", *T, "--out", "t.pt", "--stride", "100"], "none for training"),
    ("train-seed-neg", ["train", *T, "--out", "t.pt", "--seed", "-1"], "from 0 to"),
    ("train-lr-0", ["train", *T, "--out", "t.pt", "--lr", "0"], "> 0"),
    ("train-ema", ["train", *T, "--out", "t.pt", "--ema", "2"], "[0, 1]"),
    ("train-validation-fraction", ["train", *T, "--out", "t.pt", "--validation-fraction", "1"], "[0, 1)"),
    ("train-minutes-0", ["train", *T, "--out", "t.pt", "--minutes", "0"], "> 0"),
    ("train-temperature-neg", ["train", *T, "--out", "t.pt", "--temperature", "-300"], "> 0"),
    ("train-data-temperatures-count", ["train", *T, "--out", "t.pt", "--data-temperatures", "300", "330"],
     "one temperature (K) per file"),
    ("train-data-temperatures-neg", ["train", *T, "--out", "t.pt", "--data-temperatures", "-300"], "> 0"),
    ("train-reweight-no-temperatures", ["train", *T, "--out", "t.pt", "--reweight", "--system", "alanine-dipeptide"],
     "give --data-temperatures"),
    ("train-reweight-other-system", ["train", *T, "--out", "t.pt", "--reweight", "--data-temperatures", "300",
                                     "--system", "alanine-tetrapeptide"], "has 42 atoms but the trajectory has 22"),
    ("train-rare-share-alone", ["train", *T, "--out", "t.pt", "--rare-share", "0.01"], "go together"),
    ("train-rare-region-alone", ["train", *T, "--out", "t.pt", "--rare-region", "phi:0:2.5"], "go together"),
    ("train-rare-share-1", ["train", *T, "--out", "t.pt", "--rare-region", "phi:0:2.5", "--rare-share", "1"],
     "below 1"),
    ("train-rare-share-0", ["train", *T, "--out", "t.pt", "--rare-region", "phi:0:2.5", "--rare-share", "0"], "> 0"),
    ("train-rare-region-text", ["train", *T, "--out", "t.pt", "--rare-region", "phi:0", "--rare-share", "0.01"],
     "ANGLE:LOW:HIGH"),
    ("train-rare-region-degrees", ["train", *T, "--out", "t.pt", "--rare-region", "phi:0:150", "--rare-share", "0.01"],
     "degrees"),
    ("train-rare-region-atoms", ["train", *T, "--out", "t.pt", "--rare-region", "4-6-8-40:0:1", "--rare-share",
                                 "0.01"], "out of range for 22 atoms"),
    ("train-rare-region-empty", ["train", *T, "--out", "t.pt", "--rare-region", "phi:1.0:1.1", "--rare-share",
                                 "0.01"], "no frame lies in the region"),
    ("train-device", ["train", *T, "--out", "t.pt", "--device", "banana"], "unknown torch device"),
    ("train-out-is-folder", ["train", *T, "--out", "tr"], "is a folder"),
    ("train-out-under-file", ["train", *T, "--out", "afile/x.pt"], "not a folder"),
    ("train-out-txt", ["train", *T, "--out", "flow.txt"], ".pt"),
    ("train-data-empty", ["train", "--data", "empty.dcd", "--out", "t.pt"], "empty"),
    ("train-data-garbage", ["train", "--data", "garbage.dcd", "--top", "data/ala.pdb", "--out", "t.pt"],
     "cannot be read"),
    ("train-data-unknown-format", ["train", "--data", "weird.foo", "--out", "t.pt"], "does not read .foo"),
    ("train-data-missing", ["train", "--data", "missing.dcd", "--out", "t.pt"], "does not exist"),
    ("train-data-folder", ["train", "--data", "tr", "--out", "t.pt"], "not a file"),
    ("train-top-missing", ["train", *T, "--top", "missing.pdb", "--out", "t.pt"], "does not exist"),
    ("train-select-nothing", ["train", *T, "--select", "resname XYZ", "--out", "t.pt"], "matches no atoms"),
    ("train-select-syntax", ["train", *T, "--select", "name ((", "--out", "t.pt"], "selection"),
    ("train-system-mismatch", ["train", "--data", "data/ala.dcd", "--system", "gmm-12d", "--out", "t.pt"],
     "--no-validate"),
    ("train-resume-other-network", ["train", *T, "--out", "ck/flow.pt", "--hidden", "16", "--n-layers", "1"],
     "--restart"),
    ("train-resume-other-seed", ["train", *T, "--out", "ck/flow.pt", *NET, "--seed", "1"], "--restart"),
    # -- demo, chignolin, the command itself ----------------------------------------------------------
    ("demo-seconds-neg", ["demo", "--seconds", "-5", "--out", "demo"], "> 0"),
    ("demo-seconds-0", ["demo", "--seconds", "0", "--out", "demo"], "> 0"),
    ("demo-md-steps-0", ["demo", "--md-steps", "0", "--out", "demo"], ">= 1"),
    ("demo-out-is-file", ["demo", "--seconds", "1", "--out", "afile"], "is a file"),
    ("demo-flow-missing", ["demo", "--seconds", "1", "--flow", "missing.pt", "--out", "demo"], "does not exist"),
    ("demo-gmm-samples", ["demo", "--gmm", "--samples", "1", "--out", "demo"], "at least 10"),
    ("demo-gmm-chains", ["demo", "--gmm", "--chains", "0", "--out", "demo"], ">= 1"),
    ("chignolin-stage", ["chignolin", "bogus", "--out", "chig"], "unknown stage"),
    ("chignolin-epochs-0", ["chignolin", "--epochs", "0", "--out", "chig"], ">= 1"),
    ("chignolin-temperature-neg", ["chignolin", "--temperature", "-1", "--out", "chig"], "> 0"),
    ("chignolin-device", ["chignolin", "--device", "banana", "--out", "chig"], "unknown torch device"),
    ("chignolin-platform", ["chignolin", "--platform", "Banana", "--out", "chig"], "unknown OpenMM platform"),
    ("chignolin-out-is-file", ["chignolin", "--out", "afile"], "is a file"),
    ("chignolin-mixed-precision-cpu", ["chignolin", "--mixed-precision", "--out", "chig"], "--device cuda"),
    ("unknown-command", ["simulat", "--out", "x.dcd"], "invalid choice"),
]
if UNWRITABLE:
    CASES += [
        ("simulate-out-unwritable", ["simulate", "--out", f"{UNWRITABLE}/flowpert/x.dcd", *S], "cannot write"),
        ("train-out-unwritable", ["train", *T, "--out", f"{UNWRITABLE}/x.pt"], "cannot write"),
        ("sample-out-unwritable", ["sample", "--out", f"{UNWRITABLE}/run"], "cannot write"),
    ]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(work, argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.delenv("FLOWPERT_TRACEBACK", raising=False)
    before = _snapshot(work)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    cmd = argv[0] if argv[0] in ("simulate", "train", "sample", "demo", "chignolin") else None
    assert lines[0].startswith(f"flowpert {cmd}: error: " if cmd else "flowpert: error: "), lines[0]
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert _snapshot(work) == before


def test_restart_starts_over(work, capsys, monkeypatch):
    """--restart deletes only this run's checkpoint, and the run then goes through (train: another
    network size on the same --out)."""
    monkeypatch.chdir(work)
    out = os.path.join("ck2", "flow.pt")
    os.makedirs("ck2")
    with open(os.path.join(work, "ck", "flow.pt.ckpt"), "rb") as src, open(out + ".ckpt", "wb") as dst:
        dst.write(src.read())
    assert main(["train", *T, "--out", out, "--hidden", "16", "--n-layers", "1", "--n-steps", "2"]) == 2
    assert main(["train", *T, "--out", out, "--hidden", "16", "--n-layers", "1", "--n-steps", "2",
                 "--restart"]) == 0
    assert fp.PerturbedFlow.load(out).metadata["training"]["hidden"] == 16
    assert not os.path.exists(out + ".ckpt")
    assert os.path.isfile(os.path.join("ck", "flow.pt.ckpt"))  # another run's checkpoint is left alone
    # simulate: a stored run with another seed is refused, then replaced with --restart
    assert main(["simulate", "--out", "rs/a.dcd", *S]) == 0
    assert main(["simulate", "--out", "rs/a.dcd", *S, "--seed", "1"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main(["simulate", "--out", "rs/a.dcd", *S, "--seed", "1", "--restart"]) == 0
    assert "--restart: removed rs/a.nc" in capsys.readouterr().out
    assert json.loads(open("rs/a.json").read())["seed"] == 1


@pytest.mark.parametrize("command", ["simulate", "train", "sample"])
def test_ctrl_c_is_one_line_exit_130(work, command, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(work)
    monkeypatch.delenv("FLOWPERT_TRACEBACK", raising=False)
    module = importlib.import_module(f"openmm_flowpert.cli.{command}")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    argv = {"simulate": ["simulate", "--out", "x/a.dcd", *S], "train": ["train", *T, "--out", "t.pt"],
            "sample": ["sample", "--out", "D"]}[command]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"flowpert {command}: interrupted; run the same command again")
    assert "Traceback" not in err


def test_internal_error_is_one_line_exit_1_and_traceback_on_request(work, capsys, monkeypatch):
    from openmm_flowpert.cli import simulate

    monkeypatch.chdir(work)
    monkeypatch.delenv("FLOWPERT_TRACEBACK", raising=False)

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(simulate, "run", broken)
    capsys.readouterr()
    assert main(["simulate", "--out", "x/a.dcd", *S]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowpert simulate: internal error (RuntimeError: boom")
    assert "FLOWPERT_TRACEBACK=1" in lines[0] and "Traceback" not in err
    monkeypatch.setenv("FLOWPERT_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["simulate", "--out", "x/a.dcd", *S])
    with pytest.raises(ValueError, match="unknown system"):   # bad input too
        main(["sample", "--out", "D", "--system", "ubiquitin"])


def test_version_and_help(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flowpert {version('openmm-flowpert')}"
    for cmd in ("simulate", "train", "sample", "demo", "chignolin"):
        assert main([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text
        for option in ("--seed", "--out"):
            assert option in text
    assert main([]) == 0  # no command: the overview


def test_simulate_interrupted_and_resumed(work, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the run (raised after a few iterations are stored), then the same command again:
    it resumes from the storage and writes the same trajectory as the uninterrupted fixture run."""
    import mdtraj as md

    import openmm_flowpert.moves.replica_rng as rng

    monkeypatch.chdir(tmp_path)
    seed_iteration = rng.seed_replica_exchange

    def interrupt_at_7(seed, iteration):
        if iteration == 7:
            raise KeyboardInterrupt
        seed_iteration(seed, iteration)

    monkeypatch.setattr(rng, "seed_replica_exchange", interrupt_at_7)
    argv = ["simulate", "--out", "run/ala.dcd", *DATA]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again to resume from run/ala.nc" in err and "Traceback" not in err
    assert os.path.isfile("run/ala.nc") and not os.path.exists("run/ala.dcd")
    monkeypatch.setattr(rng, "seed_replica_exchange", seed_iteration)
    assert main(argv) == 0
    assert "resuming from run/ala.nc" in capsys.readouterr().out
    resumed = md.load("run/ala.dcd", top="run/ala.pdb")
    full = md.load(str(work / "data" / "ala.dcd"), top=str(work / "data" / "ala.pdb"))
    assert resumed.n_frames == full.n_frames == 20
    assert json.loads(open("run/ala.json").read())["n_frames"] == 20
    # iterations 1-6 (after 1 of equilibration) were stored before the interruption and are kept as they
    # were; the resumed part continues from the stored state (with fresh Langevin noise, so it is not
    # the uninterrupted run's continuation bit for bit)
    np.testing.assert_allclose(resumed.xyz[:6], full.xyz[:6], atol=1e-5)
    assert np.all(np.isfinite(resumed.xyz))


def test_failed_run_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    """An error after the checks (here: the flow does not fit the system, found when the move is
    built) removes the output folders the command created."""
    from openmm_flowpert.systems import bundled_flow

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--system", "gmm-12d", "--flow", bundled_flow("alanine-dipeptide"),
                 "--out", "new/run", "--iterations", "1"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("flowpert sample: error: atom-count") and "Traceback" not in "".join(lines)
    assert os.listdir(tmp_path) == []
