"""ONNX export: parity with PyTorch per exit and per stage chain, manifest, checksums, atomicity."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from datagen import make_fashion_mnist

from serving.manifest import Manifest, ManifestError, load_manifest
from training import onnx_checks
from training.checkpoint import save_checkpoint
from training.data import DATASETS, FASHION_MNIST_CLASSES
from training.export import ExportError, export_checkpoint, main
from training.flops import exit_costs
from training.models import create_model

WIDTH = 0.125


def make_checkpoint(path, arch="resnet18", dataset="fashion-mnist", val_split=32, seed=3, data_dir=None):
    """A checkpoint in train.py's format, without training: random weights, BN statistics
    gathered on noise so activations (and logits) have a trained network's scale."""
    spec = DATASETS[dataset]
    torch.manual_seed(seed)
    model = create_model(arch, spec.num_classes, spec.channels, WIDTH)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, spec.channels, spec.image_size, spec.image_size))
    model.eval()
    classes = FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else [f"c{i}" for i in range(spec.num_classes)]
    payload = {
        "model_config": model.config.to_dict(),
        "config": {
            "arch": arch,
            "method": "eed",
            "epochs": 1,
            "val_split": val_split,
            "seed": 0,
            "data_dir": str(data_dir) if data_dir else None,
            "width_mult": WIDTH,
        },
        "dataset": {
            "name": dataset,
            "classes": list(classes),
            "channels": spec.channels,
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "exit_costs": [asdict(c) for c in exit_costs(model, (spec.channels, spec.image_size, spec.image_size))],
        "epoch": 1,
        "model": model.state_dict(),
        "git_revision": None,
    }
    save_checkpoint(payload, path)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny graphs: threads only contend with each other (and with whatever else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=160, n_test=64)


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory, fmnist):
    """resnet18 exported with evaluation on the small data set (val split of 32 images)."""
    root = tmp_path_factory.mktemp("resnet")
    model = make_checkpoint(root / "ckpt.pt", data_dir=fmnist)
    manifest = export_checkpoint(root / "ckpt.pt", root / "model", download=False, log=lambda *_: None)
    return model, manifest, root / "model"


@pytest.fixture(scope="module")
def vgg_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg")
    model = make_checkpoint(root / "ckpt.pt", arch="vgg19")
    manifest = export_checkpoint(root / "ckpt.pt", root / "model", skip_eval=True, log=lambda *_: None)
    return model, manifest, root / "model"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which", ["resnet_export", "vgg_export"])
def test_every_exit_and_stage_chain_match_pytorch(which, request):
    model, manifest, folder = request.getfixturevalue(which)
    k = model.num_exits
    assert [e.exit for e in manifest.exits] == list(range(1, k + 1))
    rng = np.random.default_rng(99)
    for batch in (1, 7):
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        with torch.no_grad():
            reference = [model.forward_exit(torch.from_numpy(x), i).numpy() for i in range(1, k + 1)]
        features = x
        for spec, ref in zip(manifest.exits, reference):
            full = _session(folder / spec.path).run(["logits"], {"image": x})[0]
            assert full.shape == (batch, 10)
            assert np.abs(full - ref).max() <= 1e-4
            stage = _session(folder / spec.stage)
            name = "image" if spec.exit == 1 else "features_in"
            out = stage.run(None, {name: features})
            assert np.abs(out[0] - ref).max() <= 1e-4, f"stage chain to exit {spec.exit} differs from its full path"
            if spec.exit < k:
                features = out[1]
            else:
                assert len(out) == 1  # the last stage has no features to hand on


@pytest.mark.parametrize("which", ["resnet_export", "vgg_export"])
def test_graphs_are_clean_and_self_contained(which, request):
    model, manifest, folder = request.getfixturevalue(which)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, "manifest.json"])  # no external data
    for spec in manifest.exits:
        for file, kind in ((spec.path, "exit"), (spec.stage, "stage")):
            proto = onnx.load(str(folder / file))
            onnx.checker.check_model(proto, full_check=True)
            assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 20
            inputs = [(v.name, v.type.tensor_type.shape.dim[0].dim_param) for v in proto.graph.input]
            outputs = [(v.name, v.type.tensor_type.shape.dim[0].dim_param) for v in proto.graph.output]
            first = "image" if kind == "exit" or spec.exit == 1 else "features_in"
            assert inputs == [(first, "batch")]
            last = kind == "exit" or spec.exit == model.num_exits
            assert outputs == [("logits", "batch")] + ([] if last else [("features_out", "batch")])
            meta = {p.key: p.value for p in proto.metadata_props}
            assert meta["graph"] == kind and meta["exit"] == str(spec.exit)
            assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_onnx_accuracy_equals_pytorch_accuracy_on_the_same_checkpoint(resnet_export, fmnist):
    """The manifest's accuracies (ONNX Runtime on the exported graphs) are the checkpoint's own
    (PyTorch), per exit and for the calibrated policies: same images, same answers."""
    from training.evaluate import evaluate_checkpoint

    _, manifest, folder = resnet_export
    results, _ = evaluate_checkpoint(folder.parent / "ckpt.pt", "test", download=False)
    n = manifest.evaluation.images
    assert results["images"] == n == 64
    for spec, torch_exit in zip(manifest.exits, results["exits"]):
        # A logit within float noise of another may flip one image; no more.
        assert abs(spec.accuracy - torch_exit["accuracy"]) <= 1 / n, spec.exit
    torch_policies = {p["name"]: p for p in results["cascade"]["calibration"]["policies"] if p["thresholds"]}
    assert torch_policies and set(torch_policies) == set(manifest.thresholds.policies)
    val_images = manifest.thresholds.images
    for name, policy in manifest.thresholds.policies.items():
        theirs = torch_policies[name]
        # Thresholds are validation confidences (quantiles) or grid values: equal up to float noise.
        assert policy.thresholds == pytest.approx(theirs["thresholds"], abs=1e-4), name
        for split, ours, images in (("val", policy.val, val_images), ("test", policy.test, n)):
            assert abs(ours.accuracy - theirs[split]["accuracy"]) <= 1 / images, (name, split)
            assert ours.exit_fractions == pytest.approx(theirs[split]["exit_fractions"], abs=1 / images), (name, split)


def test_manifest_round_trips_and_records_evaluation(resnet_export):
    model, manifest, folder = resnet_export
    raw = json.loads((folder / "manifest.json").read_text())
    again = Manifest.model_validate(raw)
    assert again == manifest and again.model_dump(mode="json") == raw
    loaded = load_manifest(folder, verify=True)
    assert loaded.classes == FASHION_MNIST_CLASSES and loaded.arch == "resnet18" and loaded.dataset == "fashion-mnist"
    assert (loaded.input.channels, loaded.input.height, loaded.input.width) == (1, 28, 28)
    assert loaded.input.mean == [0.286] and loaded.input.resize == "resize" and loaded.input.background == 0
    costs = exit_costs(model, (1, 28, 28))
    for spec, cost in zip(loaded.exits, costs):
        assert spec.gflops == pytest.approx(cost.gflops) and spec.params == cost.params
        assert spec.stage_gflops == pytest.approx(cost.stage_gflops)
        assert spec.accuracy == pytest.approx(manifest_accuracy_from_spot_check(loaded, spec.exit), abs=1e-9)
    assert loaded.exits[0].stage_gflops == pytest.approx(loaded.exits[0].gflops)  # stage 1 is exit 1's path
    ev = loaded.evaluation
    assert ev.split == "test" and ev.images == 64 and ev.backend.startswith("onnxruntime")
    assert ev.spot_check.images == 64 and len(ev.spot_check.accuracy) == model.num_exits
    th = loaded.thresholds
    assert th.calibrated_on == "val" and th.images == 32 and th.policies
    for policy in th.policies.values():
        assert len(policy.thresholds) == model.num_exits - 1 and policy.test is not None
    chain = np.cumsum([e.stage_gflops for e in loaded.exits])
    assert [e.cascade_gflops for e in loaded.exits] == pytest.approx(chain.tolist())
    prov = loaded.provenance
    assert len(prov.checkpoint_sha256) == 64 and prov.epochs == 1 and prov.dataset == "fashion-mnist"
    assert prov.parity.full_path <= 1e-4 and prov.parity.batch_sizes == [1, 7]
    assert prov.opset == 20 and prov.command.startswith("python -m training.export") and prov.git_revision


def test_tampered_file_fails_checksum(resnet_export, tmp_path):
    _, _, folder = resnet_export
    copy = shutil.copytree(folder, tmp_path / "copy")
    data = bytearray((copy / "stage2.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "stage2.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="checksum mismatch.*stage2.onnx"):
        load_manifest(copy, verify=True)
    (copy / "exit1.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(copy, verify=True)


class _OffByALittle:
    """An ONNX Runtime session whose logits drift by 1e-3: parity must catch it."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        out = self.session.run(names, feeds)
        return [out[0] + 1e-3, *out[1:]]


def _fmnist_checkpoint(model, path):
    """``model`` saved as train.py saves a Fashion-MNIST run, with nothing else of a run."""
    dataset = {
        "name": "fashion-mnist",
        "classes": FASHION_MNIST_CLASSES,
        "channels": 1,
        "image_size": 28,
        "mean": [0.286],
        "std": [0.353],
    }
    payload = {"model_config": model.config.to_dict(), "config": {}, "epoch": 1, "model": model.state_dict()}
    save_checkpoint({**payload, "dataset": dataset}, path)
    return path


def test_parity_failure_stops_export_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, WIDTH, with_exits=False)  # one exit: two graphs, fast
    ckpt = _fmnist_checkpoint(model, tmp_path / "ckpt.pt")
    real_session = onnx_checks.ort_session
    monkeypatch.setattr(onnx_checks, "ort_session", lambda path: _OffByALittle(real_session(path)))
    out = tmp_path / "exported" / "m"
    with pytest.raises(ExportError, match=r"exit 1 .*differs from PyTorch by 0\.001"):
        export_checkpoint(ckpt, out, skip_eval=True, log=lambda *_: None)
    assert not out.exists() and list((tmp_path / "exported").iterdir()) == []  # no partial folder either
    monkeypatch.undo()
    # The same export without the drift succeeds, refuses to overwrite, and replaces with --force.
    assert main([str(ckpt), "--out", str(out), "--skip-eval"]) == 0
    manifest = load_manifest(out)
    assert manifest.num_exits == 1 and manifest.thresholds is None and manifest.evaluation.split is None
    # policy=NAME would answer 422 for any name: the export says so where it can still be fixed
    printed = capsys.readouterr().out
    assert "no calibrated cascade policies" in printed and "one exit, so there is nothing to cascade" in printed
    assert "--skip-eval" not in printed  # exporting without it would calibrate nothing either
    assert main([str(ckpt), "--out", str(out), "--skip-eval"]) == 2
    assert main([str(ckpt), "--out", str(out), "--skip-eval", "--force", "--name", "renamed"]) == 0
    assert load_manifest(out).name == "renamed"
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["m"]
    # --force replaces an earlier export, never the run (--out set to the checkpoint's folder deleted
    # checkpoints, config and logs) nor a folder that is not an export
    assert main([str(ckpt), "--out", str(tmp_path), "--skip-eval", "--force"]) == 2
    assert "holds the checkpoint being exported" in capsys.readouterr().err and ckpt.is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main([str(ckpt), "--out", str(tmp_path / "notes"), "--skip-eval", "--force"]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_cli_calibrates_the_policies_it_is_asked_for(tmp_path, fmnist):
    # The export CLI takes the evaluation CLI's calibration flags: these targets and no others.
    make_checkpoint(tmp_path / "ckpt.pt", data_dir=fmnist)
    out = tmp_path / "m"
    flags = ["--budget-fractions", "0.8", "--budget-gflops", "0.01", "--accuracy-drops", "--target-accuracy", "0.2"]
    assert main([str(tmp_path / "ckpt.pt"), "--out", str(out), "--no-download", *flags]) == 0
    thresholds = load_manifest(out).thresholds
    assert thresholds is not None
    named = set(thresholds.policies) | {t.name for t in thresholds.not_calibrated}
    assert named == {"budget_0.8x_main", "budget_0.01_gflops", "accuracy_0.2"}


def test_clear_errors(tmp_path, capsys):
    # A name that cannot be a URL path segment (/v2/models/NAME/infer), before any work.
    assert main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m"), "--name", "a/b c"]) == 2
    assert "cannot name a model in a URL" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m"), "--name", ".."]) == 2
    assert "not dots alone" in capsys.readouterr().err
    # --samples needs the test images that --skip-eval leaves unloaded (it wrote none, silently).
    assert main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m"), "--samples", "3", "--skip-eval"]) == 2
    assert "--samples writes test images" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "could not be read" in capsys.readouterr().err
    # two targets named alike (%g): the later policy replaced the earlier without a word
    assert (
        main([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "m"), "--budget-gflops", "0.0250000001", "0.025"]) == 2
    )
    assert "would both be named budget_0.025_gflops" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_export(resnet_export, tmp_path, capsys):
    """A --out whose folder cannot be made (a path through a file; a read-only mount alike) ended in an
    OSError traceback after the data had loaded."""
    root = resnet_export[2].parent
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "m"
    assert main([str(root / "ckpt.pt"), "--out", str(out), "--skip-eval"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: its folder {out.parent} cannot be created" in err and "Traceback" not in err, err


def manifest_accuracy_from_spot_check(manifest, exit_number):
    """With 64 test images the spot check (every image) must equal the exit's accuracy."""
    assert manifest.evaluation.spot_check.stride == 1
    return manifest.evaluation.spot_check.accuracy[exit_number - 1]


def test_the_summary_says_why_a_model_has_no_policies(vgg_export, capsys):
    from training.export import print_summary

    _, manifest, _ = vgg_export  # several exits, exported with --skip-eval
    print_summary(manifest)
    assert (
        "exported with --skip-eval; calibrate them with python -m training.calibrate FOLDER" in capsys.readouterr().out
    )


def test_calibrate_rewrites_an_exported_folders_policies_from_its_own_graphs(resnet_export, tmp_path, capsys):
    """An export calibrated under an older rule (or for other targets) is re-measured on its graphs,
    without the checkpoint: the figures match what export measures now, the graphs are untouched."""
    from serving import cascade
    from training.calibrate import main as calibrate

    _, exported, folder = resnet_export
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    path = copy / "manifest.json"
    stale = json.loads(path.read_text())
    stale["thresholds"]["rule"] = "an older rule"
    name = next(iter(stale["thresholds"]["policies"]))
    stale["thresholds"]["policies"][name]["test"]["accuracy"] = 0.5
    path.write_text(json.dumps(stale))
    graphs = {f: (copy / f).read_bytes() for f in exported.files}

    assert calibrate([str(copy)]) == 0
    redone = load_manifest(copy, verify=True)
    assert redone.thresholds.rule == cascade.RULE
    assert redone.thresholds.policies == exported.thresholds.policies  # the same data, the same rule
    assert redone.evaluation == exported.evaluation and redone.exits == exported.exits
    assert redone.provenance.recalibrated["command"] == f"python -m training.calibrate {copy}"
    assert {f: (copy / f).read_bytes() for f in exported.files} == graphs
    assert f"cascade {name}:" in capsys.readouterr().out

    # new targets replace the policies; one that cannot be met is said, with its reason
    capsys.readouterr()
    assert calibrate([str(copy), "--budget-fractions", "0.6", "--accuracy-drops", "--target-accuracy", "1"]) == 0
    assert list(load_manifest(copy).thresholds.policies) == ["budget_0.6x_main"]
    assert "  not calibrated: accuracy_1: " in capsys.readouterr().out
    # values out of range (a percentage for a fraction) are refused before any work
    for flag, value in (("--budget-fractions", "60"), ("--target-accuracy", "93"), ("--accuracy-drops", "-1")):
        assert calibrate([str(copy), flag, value]) == 2
        assert f"{flag} {value}: give values" in capsys.readouterr().err
    assert calibrate([str(tmp_path / "nowhere")]) == 2
    assert "pass a folder written by python -m training.export" in capsys.readouterr().err
    # Figures of the whole split are not replaced by a quick look's without --force (it was silent).
    before = path.read_bytes()
    assert calibrate([str(copy), "--subset", "16"]) == 2
    err = capsys.readouterr().err
    assert "measured on the whole test split" in err and "add --force" in err and path.read_bytes() == before, err
    assert calibrate([str(copy), "--subset", "16", "--force"]) == 0
    assert load_manifest(copy).evaluation.subset == 16
    assert calibrate([str(copy), "--subset", "8"]) == 0  # a subset's figures for another subset's: no harm
    # a folder whose graphs changed is refused before anything is measured, and left as it was
    (copy / exported.exits[0].path).write_bytes(b"not the graph")
    before = path.read_bytes()
    assert calibrate([str(copy)]) == 2
    assert "checksum" in capsys.readouterr().err and path.read_bytes() == before


def test_parity_is_relative_to_the_logits_scale(tmp_path, capsys):
    """float32's error grows with the logits: a correct graph of a model with large logits (deep
    models, unnormalised heads) passes, and the absolute part alone still refuses it — as it refused
    a correct PyramidNet-110 whose logits reached 230."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, WIDTH, with_exits=False)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e5)  # logits ~1e5: float32's last bits alone are ~1e-2
    ckpt = _fmnist_checkpoint(model, tmp_path / "ckpt.pt")
    assert main([str(ckpt), "--out", str(tmp_path / "abs"), "--skip-eval", "--rtol", "0"]) == 2
    assert "x max |logit|" in capsys.readouterr().err and not (tmp_path / "abs").exists()
    assert main([str(ckpt), "--out", str(tmp_path / "rel"), "--skip-eval"]) == 0
    parity = load_manifest(tmp_path / "rel").provenance.parity
    assert parity.rtol == onnx_checks.DEFAULT_RTOL and parity.full_path > parity.atol
    # An older export, written back (training.calibrate), gains no field older servers refuse.
    shipped = load_manifest(Path(__file__).resolve().parents[1] / "exported" / "fmnist-resnet18-eed")
    assert shipped.provenance.parity.rtol is None
    assert "rtol" not in shipped.model_dump(mode="json")["provenance"]["parity"]


def test_the_summary_says_when_a_policy_costs_more_than_the_main_exit_for_no_gain(capsys):
    """A cascade evaluates every head on its way: on a weak model it can cost more than the main
    exit alone at no more accuracy — the export says so beside its figures."""
    from pathlib import Path

    from training.export import print_summary

    manifest = load_manifest(Path(__file__).resolve().parents[1] / "exported" / "fmnist-resnet18-eed")
    print_summary(manifest)
    assert "note:" not in capsys.readouterr().out  # the shipped policies all save
    policy = manifest.thresholds.policies["budget_0.75x_main"]
    main_exit = manifest.exits[-1]
    policy.test.mean_gflops, policy.test.accuracy = main_exit.gflops * 1.2, main_exit.accuracy
    print_summary(manifest)
    out = capsys.readouterr().out
    assert f"note: the main exit alone (exit={main_exit.exit}) is as accurate for less" in out


def test_a_failed_final_rename_puts_the_earlier_export_back(tmp_path):
    """--force moves the earlier export aside before the new one is renamed into place: when that
    rename fails, the earlier export must be where it was, not in a hidden folder."""
    from training.export import _replace

    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(OSError):
        _replace(tmp_path / "never-written", out)  # the rename's source is missing: a real OSError
    assert (out / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("opset", [17, 22, 23])
def test_opsets_the_gpu_image_cannot_run_are_refused_before_any_work(opset, tmp_path, capsys):
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"), "--opset", str(opset)]) == 2
    assert "outside what this exporter supports (18..21)" in capsys.readouterr().err
