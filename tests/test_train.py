"""train.py end to end on small Fashion-MNIST files written by the test."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datagen import make_fashion_mnist, make_striped_fashion_mnist

from training.checkpoint import from_record, load_model, repo_relative
from training.options import explicit_flags, get_args_parser, resolve_args
from training.train import cli

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--arch",
    "resnet18",
    "--dataset",
    "fashion-mnist",
    "--width-mult",
    "0.125",
    "--batch-size",
    "32",
    "--no-progress",
    "--no-download",
]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=192, n_test=64)


def run_train(*args, cwd=ROOT, extra_env=None, module=None):
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, *(module or [str(ROOT / "training" / "train.py")]), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_cli_trains_and_reports_per_exit_accuracy(fmnist, tmp_path):
    res = run_train(
        *SMALL,
        "--data-dir",
        str(fmnist),
        "--epochs",
        "2",
        "--val-split",
        "32",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "r",
    )
    assert res.returncode == 0, res.stderr
    assert "val exit1" in res.stdout and "exit4" in res.stdout and "ensemble" in res.stdout
    assert "test accuracy after the final epoch (2)" in res.stdout
    run = tmp_path / "r"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"train_loss", "train_ce", "train_logit_distill", "val_acc_exit1", "val_acc_ensemble"} <= set(log[0])
    final = json.loads((run / "final.json").read_text())
    assert set(final["final_epoch"]) >= {f"test_acc_exit{i}" for i in range(1, 5)} | {"test_acc_ensemble"}
    assert "val_selected" in final
    # The reported final-epoch test accuracy is the checkpoint's, as evaluate measures it independently.
    from training.evaluate import evaluate_checkpoint

    results, _ = evaluate_checkpoint(run / "checkpoint.pt", "test", download=False)
    assert [final["final_epoch"][f"test_acc_exit{i}"] for i in range(1, 5)] == pytest.approx(
        [e["accuracy"] for e in results["exits"]], abs=1 / 64
    )
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["milestones"] and config["model_config"]["arch"] == "resnet18"
    # The checkpoint rebuilds the model without the CLI.
    model, payload = load_model(run / "checkpoint.pt")
    assert model.num_exits == 4 and payload["dataset"]["classes"][0] == "T-shirt/top"
    assert model(torch.zeros(1, 1, 28, 28)).logits[-1].shape == (1, 10)


def test_training_learns_far_above_chance(tmp_path):
    """Every exit of a small EED ResNet-18 learns a learnable task: striped images whose
    stripe period is the class (chance: 10 %)."""
    data = make_striped_fashion_mnist(tmp_path / "stripes")
    args = [
        *SMALL,
        "--data-dir",
        str(data),
        "--epochs",
        "8",
        "--milestones",
        "6",
        "--lr",
        "0.05",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "learn",
        "--threads",
        "1",
    ]
    assert cli(args) == 0
    final = json.loads((tmp_path / "learn" / "final.json").read_text())["final_epoch"]
    for i in range(1, 5):
        assert final[f"test_acc_exit{i}"] >= 0.5, final


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_continues_exactly(fmnist, tmp_path):
    common = [*SMALL, "--data-dir", str(fmnist), "--milestones", "1", "--output-dir", str(tmp_path), "--seed", "5"]
    assert cli([*common, "--epochs", "2", "--run-name", "straight"]) == 0
    assert cli([*common, "--epochs", "1", "--run-name", "split"]) == 0
    assert cli(["--resume", str(tmp_path / "split"), "--epochs", "2", "--no-progress"]) == 0
    a, b = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    # The thread count the run resolved is recorded (results depend on it), for the resume to keep.
    assert json.loads((tmp_path / "split" / "config.json").read_text())["config"]["threads"] == max(
        1, os.cpu_count() or 1
    )


def test_resume_keeps_the_command_the_log_and_the_epoch_count_honest(fmnist, tmp_path, capsys):
    common = [*SMALL, "--data-dir", str(fmnist), "--output-dir", str(tmp_path), "--subset", "64"]
    assert cli([*common, "--epochs", "1", "--run-name", "r"]) == 0
    run = tmp_path / "r"
    started = json.loads((run / "config.json").read_text())["command"]
    # A run stopped after logging epoch 2 but before its checkpoint: the resume trains epoch 2 again.
    with open(run / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "lr": 0.1}) + "\n" + '{"epoch": 3, "l')  # and a torn line
    assert cli(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    config = json.loads((run / "config.json").read_text())
    # The manifest's provenance copies the command that started the run; resumes are listed beside it.
    assert config["command"] == started and len(config["resumed_with"]) == 1 and "--resume" in config["resumed_with"][0]
    # Fewer epochs than the checkpoint has: the final report would have called epoch 2 "epoch 1".
    assert cli(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 2
    assert "below the 2 epochs this checkpoint has trained" in capsys.readouterr().err
    # Another thread count is allowed (another machine) but no longer continues the run exactly.
    threads = config["config"]["threads"]
    assert cli(["--resume", str(run), "--epochs", "3", "--threads", str(threads + 1), "--no-progress"]) == 0
    assert f"this run trained with --threads {threads}; with --threads {threads + 1}" in capsys.readouterr().err


def test_a_run_stopped_between_its_checkpoint_and_best_pt_reports_the_selected_epoch(fmnist, tmp_path):
    """checkpoint.pt is written before best.pt: a run stopped between the two (simulated: best.pt of the
    improving epoch removed) resumes from that epoch, and its best.pt is restored from the checkpoint."""
    common = [*SMALL, "--data-dir", str(fmnist), "--output-dir", str(tmp_path), "--subset", "64"]
    assert cli([*common, "--epochs", "1", "--val-split", "16", "--run-name", "r"]) == 0
    run = tmp_path / "r"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["best"]["epoch"] == 1  # the first epoch improves
    (run / "best.pt").unlink()
    (run / "final.json").unlink()
    assert cli(["--resume", str(run), "--epochs", "1", "--no-progress"]) == 0  # only the final evaluation
    restored = torch.load(run / "best.pt", weights_only=False)
    assert restored["epoch"] == 1
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in restored["model"].items())
    final = json.loads((run / "final.json").read_text())
    assert final["val_selected"]["epoch"] == 1
    same = {k: v for k, v in final["val_selected"].items() if k.startswith("test_")}
    assert same == {k: v for k, v in final["final_epoch"].items() if k.startswith("test_")}  # the same weights


def test_resume_from_an_earlier_checkpoint_of_a_run_is_refused_not_a_rewind_of_the_run(fmnist, tmp_path, capsys):
    """--resume runs/X/best.pt continued in runs/X from best.pt's epoch: checkpoint.pt (a later epoch)
    was overwritten and the log's later epochs deleted, without a word."""
    common = [*SMALL, "--data-dir", str(fmnist), "--output-dir", str(tmp_path), "--subset", "64"]
    assert cli([*common, "--epochs", "1", "--run-name", "r"]) == 0
    run = tmp_path / "r"
    shutil.copy(run / "checkpoint.pt", run / "early.pt")  # as best.pt is, an earlier epoch's
    assert cli(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    before = (run / "checkpoint.pt").read_bytes(), (run / "log.jsonl").read_text()
    assert cli(["--resume", str(run / "early.pt"), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "early.pt is epoch 1, but" in err and "checkpoint.pt in the same run folder is epoch 2" in err
    assert ((run / "checkpoint.pt").read_bytes(), (run / "log.jsonl").read_text()) == before
    # The way the message gives to branch from it works, and the branch keeps the run's command.
    assert f"cp {run / 'early.pt'} NEW/checkpoint.pt && cp {run / 'config.json'} NEW/, then --resume NEW" in err
    branch = tmp_path / "branch"
    branch.mkdir()
    shutil.copy(run / "early.pt", branch / "checkpoint.pt")
    shutil.copy(run / "config.json", branch)
    assert cli(["--resume", str(branch), "--epochs", "2", "--no-progress"]) == 0
    assert torch.load(branch / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert (run / "checkpoint.pt").read_bytes() == before[0]
    started = json.loads((run / "config.json").read_text())["command"]
    assert json.loads((branch / "config.json").read_text())["command"] == started


def test_resume_continues_an_imagefolder_run_exactly(tmp_path):
    """Random crops and flips draw from torch's generator, which the checkpoint carries: without it a
    resumed run replayed epoch 1's augmentations, and its weights differed from the straight run's."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.png")
    common = [
        "--arch", "resnet18", "--dataset", "imagefolder", "--width-mult", "0.0625", "--batch-size", "8",
        "--workers", "0", "--threads", "1", "--no-progress", "--data-dir", str(tmp_path / "data"),
        "--milestones", "2", "--output-dir", str(tmp_path), "--seed", "3",
    ]  # fmt: skip
    assert cli([*common, "--epochs", "3", "--run-name", "straight"]) == 0
    assert cli([*common, "--epochs", "2", "--run-name", "split"]) == 0
    assert cli(["--resume", str(tmp_path / "split"), "--epochs", "3", "--no-progress"]) == 0
    a, b = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Each loader worker draws its own crops: the count a run trained with is recorded (the default
    # follows the machine's CPUs) and kept by a resume; another count given is warned about.
    without = [a for a in common if a not in ("--workers", "0")]
    assert cli([*without, "--epochs", "1", "--run-name", "default-workers"]) == 0
    recorded = json.loads((tmp_path / "default-workers" / "config.json").read_text())["config"]["workers"]
    assert recorded == min(8, os.cpu_count() or 1)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(["--resume", str(tmp_path / "split"), "--epochs", "4", "--workers", "1", "--no-progress"]) == 0
    assert "this run trained with --workers 0; with --workers 1 its augmentations" in err.getvalue()


def test_resume_refuses_a_mismatched_setting(fmnist, tmp_path, capsys):
    common = [*SMALL, "--data-dir", str(fmnist), "--output-dir", str(tmp_path), "--subset", "64"]
    assert cli([*common, "--epochs", "1", "--run-name", "x"]) == 0
    assert cli(["--resume", str(tmp_path / "x"), "--arch", "vgg19"]) == 2
    assert "differ from the checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli(["--resume", str(tmp_path / "junk.pt")]) == 2
    assert "could not be read" in capsys.readouterr().err
    # A run continues in its own folder: --run-name/--output-dir were ignored and the run overwritten.
    assert cli(["--resume", str(tmp_path / "x"), "--run-name", "branch", "--no-progress"]) == 2
    assert "--run-name 'branch' (checkpoint: 'x')" in capsys.readouterr().err and not (tmp_path / "branch").exists()
    # Other data under --data-dir (allowed to move) was used without a word.
    other = make_fashion_mnist(tmp_path / "other", n_train=100, n_test=40)
    assert cli(["--resume", str(tmp_path / "x"), "--data-dir", str(other), "--subset", "64", "--no-progress"]) == 2
    assert "is not what this run was trained on (test_size 64 -> 40)" in capsys.readouterr().err
    # A cosine schedule restored for 1 epoch would start a second cycle over --epochs 3.
    assert cli([*common, "--epochs", "1", "--lr-schedule", "cosine", "--run-name", "cos"]) == 0
    assert cli(["--resume", str(tmp_path / "cos"), "--epochs", "3", "--no-progress"]) == 2
    assert "would not stretch it but start a second cycle" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet19"], "unknown --arch 'resnet19'; choose one of"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}/none", "--no-download"], "CIFAR-10 not found"),
        (["--method", "kd", "--teacher-exits", "1", "4"], "--teacher-exits selects the EED ensemble teacher"),
        (["--method", "branchynet", "--alpha", "2"], "--alpha has no effect with --method branchynet"),
        (["--lr-schedule", "cosine", "--milestones", "5"], "--milestones belongs to --lr-schedule multistep"),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--epochs", "0"],
            "CUDA is not available" if not torch.cuda.is_available() else "--epochs must be at least 1",
        ),
        (["--dataset", "fashion-mnist", "--teacher-exits", "9", "--subset", "8"], "--teacher-exits [9] do not exist"),
        # DESIGN §1: the ensemble teacher must include the main output (it trained without it).
        (["--dataset", "fashion-mnist", "--teacher-exits", "1", "2", "--subset", "8"], "leaves out the main output"),
        (["--teacher-exits", "4", "4"], "names an exit twice"),
        (["--device", "bogus"], "not a device this code runs on"),  # torch's RuntimeError before
        (["--device", "mps"], "not a device this code runs on"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--width-mult", "inf"], "--width-mult must be a positive finite number"),  # an OverflowError
        (["--temperature", "nan"], "--temperature must be a positive finite number"),  # a NaN loss mid-epoch
        # recorded in config.json as if it had shaped the run
        (["--distill", "mse", "--temperature", "10"], "--distill mse does not use it"),
        (["--method", "branchynet", "--temperature", "2"], "--temperature has no effect with --method branchynet"),
        (["--alpha", "nan"], "--alpha must be a finite number >= 0"),
        (["--lr-gamma", "-1"], "--lr-gamma must be a positive finite factor"),
        (["--milestones", "0", "5"], "--milestones are epochs"),
        (["--workers", "-1"], "--workers must be 0"),
        (["--seed", "-1"], "--seed must be 0 or more"),  # numpy's seed sequences refused it mid-setup
        (["--dataset", "fashion-mnist", "--subset", "8", "--output-dir", "{tmp}/a-file"], "is a file, not a folder"),
        # a folder that cannot be made (here under a file; a read-only mount alike): an OSError traceback
        (["--dataset", "fashion-mnist", "--subset", "8", "--output-dir", "{tmp}/a-file/runs"], "cannot write the run"),
    ],
)
def test_clear_errors(args, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli(["--output-dir", str(tmp_path), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cifar100_default_fails_clearly_without_network(tmp_path):
    # A proxy nobody listens on makes the download fail here even on a machine with network.
    no_net = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    res = run_train("--arch", "resnet18", "--output-dir", str(tmp_path), cwd=tmp_path, extra_env=no_net)
    assert res.returncode == 2
    assert "CIFAR-100 not found" in res.stderr and "--dataset fashion-mnist" in res.stderr
    assert "Traceback" not in res.stderr


def test_ddp_two_cpu_processes(fmnist, tmp_path):
    # The processes' clocks read a second apart when they name the run (a sitecustomize on their path
    # shifts rank 1's): the default run name holds that time, and each rank wrote, and rank 1 read
    # best.pt from, a folder of its own.
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(
        "import os, time\n"
        "_strftime = time.strftime\n"
        "def strftime(fmt, t=None):\n"
        "    t = time.localtime(time.time() + 3600 * int(os.environ.get('RANK', '0'))) if t is None else t\n"
        "    return _strftime(fmt, t)\n"
        "time.strftime = strftime\n"
    )
    runs = tmp_path / "runs"
    res = run_train(
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "training" / "train.py"),
        *SMALL,
        "--data-dir",
        str(fmnist),
        "--subset",
        "128",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--val-split",
        "32",
        "--output-dir",
        str(runs),
        module=["-m", "torch.distributed.run"],
        extra_env={
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(skew), os.environ.get("PYTHONPATH")])),
        },
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    (run,) = runs.iterdir()  # one run, named by rank 0
    final = json.loads((run / "final.json").read_text())
    # Both ranks evaluated the validation-selected epoch together (no hang, one answer).
    assert final["val_selected"]["epoch"] in (1, 2)
    assert "test accuracy of the epoch selected on val" in res.stdout
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "val_acc_exit4" in log[-1]
    # What the two ranks reported together is the saved checkpoint's accuracy: each rank evaluated its
    # shard with rank 0's BatchNorm statistics, not with those its own last batch left.
    from training.evaluate import evaluate_checkpoint

    results, _ = evaluate_checkpoint(run / "checkpoint.pt", "test", download=False)
    assert [final["final_epoch"][f"test_acc_exit{i}"] for i in range(1, 5)] == [e["accuracy"] for e in results["exits"]]


def test_a_new_run_never_overwrites_an_existing_one(fmnist, tmp_path, capsys):
    common = [*SMALL, "--data-dir", str(fmnist), "--output-dir", str(tmp_path), "--subset", "64", "--epochs", "1"]
    assert cli([*common, "--run-name", "r"]) == 0
    assert cli([*common, "--run-name", "r"]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, alpha",
    [
        (["--distill", "kl"], 0.1),  # the authors' code scales the KL term by 0.1 (DESIGN §1)
        ([], 0.1),  # KL is the default l_z
        (["--distill", "mse"], 1.0),
        (["--distill", "kl", "--alpha", "0.5"], 0.5),  # an explicit --alpha wins
        (["--distill", "mse", "--alpha", "0.25"], 0.25),
        (["--method", "kd", "--distill", "kl"], 0.1),
    ],
)
def test_default_alpha_follows_the_distillation_kind(flags, alpha):
    parser = get_args_parser()
    args = resolve_args(parser.parse_args(flags), explicit_flags(parser, flags))
    assert args.alpha == alpha


def test_train_size_trains_on_n_images_and_tests_on_the_whole_test_split(fmnist, tmp_path):
    args = [
        *SMALL,
        "--data-dir",
        str(fmnist),
        "--epochs",
        "1",
        "--train-size",
        "50",
        "--val-split",
        "32",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "small",
    ]
    assert cli(args) == 0
    dataset = json.loads((tmp_path / "small" / "config.json").read_text())["dataset"]
    assert (dataset["train_size"], dataset["val_size"], dataset["test_size"]) == (50, 32, 64)
    assert cli([*args[:-2], "--run-name", "too-big", "--train-size", "180"]) == 2  # 192 - 32 left to train on


def test_run_records_hold_repository_relative_paths(tmp_path):
    assert repo_relative(str(ROOT / "runs" / "x")) == "runs/x"
    assert repo_relative(str(tmp_path / "x")) == str(tmp_path / "x")  # outside the repository: as given
    assert repo_relative(None) is None


def test_recorded_paths_are_read_as_written_from_any_folder(tmp_path, monkeypatch):
    # An in-repository data folder was recorded relative to the repository and read relative to the
    # reader's folder: resume, evaluate and export run elsewhere looked for the data in the wrong place.
    monkeypatch.chdir(tmp_path)
    for path in (ROOT / "data" / "fmnist", tmp_path / "outside"):
        assert from_record(repo_relative(str(path))) == str(path)
    # A relative path outside the repository is recorded as the folder it named when the run began.
    assert repo_relative("elsewhere") == str(tmp_path / "elsewhere")
    assert from_record(repo_relative("elsewhere")) == str(tmp_path / "elsewhere")


def test_help_says_what_every_option_does_and_its_default():
    # argparse prints no line, and so no default, for an option without help text: --epochs, --lr
    # and the rest of the paper's recipe showed as bare names.
    from training.options import get_args_parser

    parser = get_args_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if action.default is not None and not isinstance(action.default, bool):
            shown = f"(default: {action.default})"
            assert shown in text or "default" in action.help, f"{action.option_strings[0]}: {shown} not shown"
