"""ssl_runtime.launch_scripts without launching anything: flags, names, file layout, recipes and
commands, checked against values worked out by hand."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ssl_runtime.errors import UserError
from ssl_runtime.launch_scripts import layout, options, recipes, stages


def parse(*flags: str, mode: str = "full", nproc: int = 1, env: dict | None = None, cwd: Path | None = None):
    return options.parse(mode, nproc, list(flags), env=env or {}, cwd=cwd)


def plan(tmp_path: Path, *flags: str, mode: str = "full", nproc: int = 1, env: dict | None = None):
    return stages.plan(parse(*flags, mode=mode, nproc=nproc, env=env), "py",
                       env={"SSL_TEST_OUTPUT": str(tmp_path / "out"), **(env or {})})


# ------------------------------------------------------------------------------------------------
# flags

def test_flags_take_name_equals_value_and_keep_the_defaults(tmp_path):
    (tmp_path / "data").mkdir()
    o = parse("--batch_size=32", "--data_path=data", "--bin=false", "--dry_run", cwd=tmp_path)
    assert (o.model, o.device, o.batch_size, o.epochs, o.bin, o.dry_run) == ("dino", "auto", "32", "", "False", True)
    assert o.data_path == str(tmp_path / "data")  # made absolute against the caller's folder
    assert (o.node_rank, o.master_port, o.device_id) == ("0", "29680", "0")


def test_environment_supplies_the_rendezvous_and_the_device_id():
    o = parse(env={"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "3000", "ASCEND_DEVICE_ID": "5"})
    assert (o.node_rank, o.master_addr, o.master_port, o.device_id) == ("1", "10.0.0.1", "3000", "5")
    with pytest.raises(UserError, match="ASCEND_DEVICE_ID=npu0 .*is not a device number"):
        parse(env={"ASCEND_DEVICE_ID": "npu0"})


@pytest.mark.parametrize("flag, message", [
    ("--lr=3", "unknown argument '--lr=3'"),
    ("--dry_run=1", "unknown argument '--dry_run=1'"),   # a switch takes no value
    ("--data_path", "unknown argument '--data_path'"),   # a value flag needs one
    ("--epochs=0", "--epochs=0: expected a positive whole number"),
    ("--steps=1.5", "--steps=1.5: expected a positive whole number"),
    ("--node_rank=-1", "--node_rank=-1 (or NODE_RANK): expected 0, 1, ..."),
    ("--bin=yes", "--bin=yes: use True"),
])
def test_bad_flags_are_user_errors(flag, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse(flag)


def test_unknown_flag_message_lists_every_flag():
    with pytest.raises(UserError) as raised:
        parse("--lr=3")
    for name in options.VALUE_FLAGS:
        assert f"--{name}=" in str(raised.value)
    for name in options.SWITCHES:
        assert f"--{name}" in str(raised.value)


def test_help_and_the_ignored_ascend_flag():
    with pytest.raises(options.HelpRequested):
        parse("--epochs=3", "-h")
    assert parse("--model=dino", "--more_path1=/cache/xcit").notes == (options.IGNORED_NOTE["more_path1"],)


def test_the_method_is_chosen_or_named(tmp_path):
    assert parse("--model=moby").notes == ()
    default = parse()
    assert default.model == "dino" and default.notes == (
        "no --model given: running DINO (DINO_ID3436_for_PyTorch); add --model=moby for MoBY "
        "(Transformer-SSL_ID3434_for_PyTorch)",)
    inferred = parse("--cfg=configs/moby_swin_tiny.yaml")
    assert inferred.model == "moby" and inferred.notes == ("--cfg is a MoBY option: running MoBY (add "
                                                           "--model=moby to say so)",)
    with pytest.raises(UserError, match="--cfg is a MoBY option: add --model=moby"):
        parse("--model=dino", "--cfg=configs/moby_swin_tiny.yaml")


def test_checkpoint_rules_per_mode(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert parse(f"--checkpoint={weights}", mode="eval_knn").checkpoint == str(weights)
    assert parse("--checkpoint=w.pth", mode="eval_linear", cwd=tmp_path).checkpoint == str(weights)
    assert parse(mode="eval").checkpoint == ""  # eval_8p.sh: the last full run's, found later
    with pytest.raises(UserError, match="--checkpoint=FILE is required"):
        parse(mode="eval_knn")
    with pytest.raises(UserError, match="evaluation runs on one node"):
        parse(f"--checkpoint={weights}", "--nnodes=2", mode="eval_knn")
    with pytest.raises(UserError, match="training scripts start from scratch"):
        parse(f"--checkpoint={weights}")


# ------------------------------------------------------------------------------------------------
# names and files

def test_case_names_follow_the_ascend_record():
    assert layout.case_name("DINO_ID3436_for_PyTorch", 64, 8, "full") == "DINO_ID3436_for_PyTorch_bs64_8p_acc"
    assert layout.case_name("N", 128, 1, "perf") == "N_bs128_1p_perf"
    assert layout.case_name("N", 32, 8, "eval_linear") == "N_bs32_8p_eval_linear"


def test_layout_of_a_case(tmp_path):
    paths = layout.layout(tmp_path, "3", "C_bs64_1p_acc", "eval")
    assert paths.train_log == tmp_path / "3" / "train_3.log"
    assert paths.eval_log == tmp_path / "3" / "eval_3.log"
    assert paths.loss_file == tmp_path / "3" / "train_C_bs64_1p_acc_loss.txt"
    assert paths.case_file == tmp_path / "3" / "C_bs64_1p_acc.log"
    assert paths.run_dir == tmp_path / "3" / "C_bs64_1p_acc"
    assert layout.output_root({"SSL_TEST_OUTPUT": str(tmp_path)}) == tmp_path
    assert layout.output_root({}) == layout.REPO / "test" / "output"


def test_last_full_checkpoint_is_the_newest_of_that_world(tmp_path):
    def checkpoint(case: str, inside: str, age: int) -> Path:
        path = tmp_path / case / inside
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        return path

    checkpoint("N_bs64_8p_acc", "checkpoint.pth", age=20)
    newer = checkpoint("N_bs32_8p_acc", "checkpoint.pth", age=10)
    checkpoint("N_bs32_1p_acc", "checkpoint.pth", age=0)     # another number of devices
    checkpoint("N_bs32_8p_perf", "checkpoint.pth", age=0)    # not a full run
    assert layout.last_full_checkpoint(tmp_path, "N", 8, "dino") == newer
    checkpoint("N_bs32_8p_acc.20261201-120000", "checkpoint.pth", age=0)  # an earlier run, moved aside
    assert layout.last_full_checkpoint(tmp_path, "N", 8, "dino") == newer
    moby = checkpoint("M_bs64_8p_acc", "moby__x/pretrain/checkpoint.pth", age=5)
    assert layout.last_full_checkpoint(tmp_path, "M", 8, "moby") == moby
    assert layout.last_full_checkpoint(tmp_path, "M", 16, "moby") is None


# ------------------------------------------------------------------------------------------------
# recipes

@pytest.mark.parametrize("model, mode, device, world, nnodes, expected", [
    ("dino", "full", "cpu", 1, 1, (64, 1, None)),
    ("dino", "full", "npu", 8, 1, (64, 100, None)),
    ("dino", "perf", "cuda", 8, 1, (64, 1, 200)),          # the port: 1 epoch cut after 200 steps
    ("moby", "full", "npu", 8, 1, (128, 100, None)),
    ("moby", "full", "npu", 16, 2, (64, 100, None)),       # 16p: the port's 64 images per device
    ("dino", "full", "npu", 16, 2, (64, 100, None)),
    ("moby", "perf", "npu", 1, 1, (128, 100, 150)),        # 150 steps of the YAML's schedule
    ("moby", "perf", "npu", 8, 1, (128, 2, None)),         # two whole epochs
    ("moby", "perf", "cpu", 8, 1, (64, 1, 20)),
])
def test_schedules(model, mode, device, world, nnodes, expected):
    assert recipes.resolve_schedule(model, mode, device, world, nnodes, None, None, None) == expected


def test_given_values_win_over_the_schedule():
    assert recipes.resolve_schedule("moby", "perf", "npu", 8, 1, 16, 5, 7) == (16, 5, 7)


@pytest.mark.parametrize("epochs, subset, freeze, warmup", [(1, 50000, 0, 0), (2, 0, 1, 1), (10, 0, 1, 1),
                                                            (25, 0, 1, 2), (100, 0, 1, 10)])
def test_dino_cpu_recipe_follows_the_runs_length(epochs, subset, freeze, warmup):
    args = recipes.dino_cpu_args(epochs)
    value = dict(zip(args[::2], args[1::2]))
    assert (value["--max_train_images"], value["--freeze_last_layer"], value["--warmup_epochs"]) == (
        str(subset), str(freeze), str(warmup))


@pytest.mark.parametrize("device, nproc, batch", [("npu", 8, 64), ("npu", 16, 32), ("cuda", 1, 512),
                                                  ("npu", 1000, 1), ("cpu", 8, 48)])
def test_moby_linear_batch_keeps_upstreams_global_batch(device, nproc, batch):
    assert recipes.moby_linear_batch(device, 48, nproc) == batch


def test_moby_linear_config_beside_the_pretraining_one():
    assert recipes.moby_linear_cfg("configs/moby_swin_tiny.yaml") == "configs/moby_swin_tiny_linear.yaml"
    assert recipes.moby_linear_cfg("configs/moby_swin_tiny_linear.yaml") == "configs/moby_swin_tiny_linear.yaml"
    assert recipes.moby_linear_cfg("/elsewhere/mine.yaml") == "/elsewhere/mine.yaml"


def test_random_init_command_is_the_evaluation_without_weights():
    dino = ["dino/eval_knn.py", "--pretrained_weights", "w.pth", "--checkpoint_key", "teacher", "--device", "cpu"]
    assert recipes.random_init_command(dino, "dino") == ["dino/eval_knn.py", "--checkpoint_key", "teacher",
                                                         "--device", "cpu"]
    moby = ["moby/eval_knn.py", "--cfg", "c.yaml", "--tag", "knn", "--pretrained", "w.pth", "--opts", "A", "0"]
    assert recipes.random_init_command(moby, "moby") == ["moby/eval_knn.py", "--random-init", "--cfg", "c.yaml",
                                                         "--tag", "random_init", "--opts", "A", "0"]


def test_plan_of_a_moby_npu_run(tmp_path, tiny_imagefolder):
    run = plan(tmp_path, "--model=moby", "--device=npu", "--dry_run", f"--data_path={tiny_imagefolder}", nproc=8)
    run_dir = str(tmp_path / "out" / "0" / "Transformer-SSL_ID3434_for_PyTorch_bs128_8p_acc")
    assert run.commands.pretrain == [
        "moby/main_moby.py", "--cfg", "configs/moby_swin_tiny.yaml", "--batch-size", "128", "--output", run_dir,
        "--tag", "pretrain", "--device", "npu", "--max_epochs", "100", "--bin", "True",
        "--data-path", str(tiny_imagefolder)]
    assert run.commands.evaluation == [
        "moby/main_linear.py", "--cfg", "configs/moby_swin_tiny_linear.yaml", "--output", run_dir, "--tag",
        "linear", "--pretrained", f"{run_dir}/MODEL.NAME/pretrain/checkpoint.pth", "--device", "npu",
        "--batch-size", "64", "--data-path", str(tiny_imagefolder), "--bin", "True"]
    assert run.commands.random_init == []  # accelerator runs have no baseline
    assert run.launcher == ["py", "-m", "ssl_runtime.launch", "--nproc_per_node=8"]


@pytest.mark.parametrize("epochs, warmup", [("2", ["--warmup_epochs", "1"]), ("9", ["--warmup_epochs", "1"]),
                                            ("10", []), ("", [])])
def test_short_dino_accelerator_runs_scale_upstreams_warmup(tmp_path, epochs, warmup):
    """main_dino.py refuses upstream's 10 warm-up epochs in a shorter run: fewer epochs get its ratio."""
    flags = [f"--epochs={epochs}"] if epochs else []
    command = plan(tmp_path, "--device=npu", "--dry_run", *flags).commands.pretrain
    found = command[command.index("--warmup_epochs"):][:2] if "--warmup_epochs" in command else []
    assert found == warmup


def test_plan_of_two_nodes(tmp_path):
    with pytest.raises(UserError, match="2 nodes need the address of node 0"):
        plan(tmp_path, "--device=cpu", "--nnodes=2", nproc=8)
    with pytest.raises(UserError, match=r"NODE_RANK=2 is not in 0\.\.1"):
        plan(tmp_path, "--device=cpu", "--nnodes=2", "--node_rank=2", "--master_addr=h", nproc=8)
    run = plan(tmp_path, "--device=cpu", "--nnodes=2", "--node_rank=1", "--master_addr=h", nproc=8)
    assert run.settings.WORLD == 16 and run.settings.CASE_NAME.endswith("_bs64_16p_acc")
    assert run.launcher[3:] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=h",
                                "--master_port=29680"]
    assert run.eval_launcher == ["py", "-m", "ssl_runtime.launch", "--nproc_per_node=8"]


def test_eval_8p_without_a_full_run_names_the_script_to_run_first(tmp_path):
    with pytest.raises(UserError, match="run train_full_8p.sh first or pass --checkpoint=FILE"):
        plan(tmp_path, "--device=cpu", mode="eval", nproc=8)


def test_exit_status_of_a_killed_stage_is_the_shells():
    assert stages.exit_status(-15) == 143 and stages.exit_status(-9) == 137 and stages.exit_status(3) == 3


def test_dry_run_lists_settings_then_commands(tmp_path, capsys):
    stages.print_dry_run(plan(tmp_path, "--device=cpu", "--dry_run"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("=")[0] for line in lines[:20]] == list(recipes.Settings.__dataclass_fields__)
    assert "STEPS=" in lines and lines[-3].startswith("PRETRAIN: py -m ssl_runtime.launch")
    assert lines[-1].startswith("RANDOM-INIT: ") and sys.executable not in lines[-1]


# ------------------------------------------------------------------------------------------------
# earlier attempts: resume or move aside, never delete

COMMAND = ["-m", "ssl_runtime.launch", "--nproc_per_node=1", "dino/main_dino.py", "--epochs", "3", "--device", "cpu"]


def test_decisions_about_an_earlier_attempt(tmp_path):
    run_dir = tmp_path / "C_bs64_1p_acc"
    assert layout.decide(run_dir, COMMAND, fresh=False).action == "new"
    run_dir.mkdir()
    assert "no launch.json" in layout.decide(run_dir, COMMAND, fresh=False).why  # not ours: kept aside
    layout.write_state(run_dir, COMMAND, ["pretraining"])
    assert layout.decide(run_dir, COMMAND, fresh=False) == layout.Attempt("resume", done=("pretraining",))
    assert layout.decide(run_dir, COMMAND, fresh=True) == layout.Attempt("move_aside", "--fresh was given")
    other = layout.decide(run_dir, [*COMMAND[:5], "4", *COMMAND[6:], "--profile"], fresh=False)
    assert other.action == "move_aside" and other.why == "it was started with other settings (--epochs 3 -> 4; " \
                                                         "--profile added)"
    layout.write_state(run_dir, COMMAND, ["pretraining", "complete"])
    assert layout.decide(run_dir, COMMAND, fresh=False) == layout.Attempt("move_aside", "it finished")
    (run_dir / layout.STATE_FILE).write_text("{not json")
    assert layout.decide(run_dir, COMMAND, fresh=False).action == "move_aside"


def test_flag_changes_name_each_flag():
    assert layout.flag_changes(["p.py", "--a", "1", "--b"], ["q.py", "--a", "1", "--c", "2"]) == [
        "program p.py -> q.py", "--b dropped", "--c added"]
    assert layout.flag_changes(["p.py", "--b"], ["p.py", "--b", "x"]) == ["--b (set) -> x"]


def test_move_aside_renames_with_the_time_of_the_last_change_and_never_overwrites(tmp_path):
    assert layout.move_aside(tmp_path / "absent") is None
    first, second = tmp_path / "train_0.log", tmp_path / "train_0.log"
    first.write_text("one")
    os.utime(first, (0, 1_700_000_000))
    kept_one = layout.move_aside(first)
    second.write_text("two")
    os.utime(second, (0, 1_700_000_000))
    kept_two = layout.move_aside(second)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))
    assert kept_one.name == f"train_0.log.{stamp}" and kept_two.name == f"train_0.log.{stamp}-2"
    assert (kept_one.read_text(), kept_two.read_text()) == ("one", "two") and not first.exists()


def test_resume_point_as_the_logs_count_epochs(tmp_path):
    import torch

    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 2, "epoch_step": 5, "student": {"w": torch.zeros(2)}}, path)
    assert layout.resume_point("dino", path) == (2, 5)  # DINO saves the epoch to resume at
    assert layout.resume_point("moby", path) == (3, 5)  # MoBY the last finished one
    path.write_bytes(b"not a checkpoint")
    assert layout.resume_point("dino", path) is None


# ------------------------------------------------------------------------------------------------
# CPU recipes sized by work

@pytest.mark.parametrize("model, images, batch, epochs", [
    ("dino", 4000, 64, 13),     # 62 batches = 3,968 images an epoch; 50,000 / 3,968 = 12.6
    ("moby", 4000, 64, 7),      # 28,000 / 3,968 = 7.06
    ("dino", 30000, 64, 2),     # 50,000 / 29,952 = 1.67
    ("moby", 20000, 64, 1),     # 28,000 / 19,968 = 1.40
    ("dino", 60000, 64, 1),     # Fashion-MNIST: the recipe's own one epoch
    ("dino", 4000, 512, 14),    # 7 batches of 512 = 3,584 images; 50,000 / 3,584 = 13.95
    ("dino", 48, 64, None),     # not one batch: the program says so
])
def test_epochs_for_work(model, images, batch, epochs):
    assert recipes.epochs_for_work(model, images, batch) == epochs


def test_work_is_the_fashion_mnist_recipes():
    import yaml

    value = dict(zip(recipes.dino_cpu_args(1)[::2], recipes.dino_cpu_args(1)[1::2]))
    assert recipes.CPU_WORK_IMAGES["dino"] == int(value["--max_train_images"]) * 1  # one epoch of its subset
    config = yaml.safe_load((layout.REPO / recipes.MOBY_CFG["cpu"]).read_text())
    assert recipes.CPU_WORK_IMAGES["moby"] == config["DATA"]["MAX_TRAIN_IMAGES"] * config["TRAIN"]["EPOCHS"]


def test_count_images_as_imagefolder_does(tiny_imagefolder):
    (tiny_imagefolder / "train" / "class_0" / "notes.txt").write_text("not an image")
    (tiny_imagefolder / "train" / "class_1" / "UPPER.PNG").write_bytes(b"")
    assert recipes.count_images(tiny_imagefolder / "train") == 3 * 8 + 1


def test_cpu_full_runs_on_other_data_are_sized_by_work(tmp_path, tiny_imagefolder, capsys):
    data = f"--data_path={tiny_imagefolder}"  # 24 training images: 3 batches of 8
    run = plan(tmp_path, "--device=cpu", "--batch_size=8", data, "--dry_run")
    assert run.settings.EPOCHS == 2083  # 50,000 / 24 = 2,083.3
    assert "--epochs=2083: the CPU recipe sees about 50,000 images" in capsys.readouterr().err
    assert recipes.dino_cpu_args(2083) == run.commands.pretrain[9:9 + len(recipes.dino_cpu_args(2083))]
    assert plan(tmp_path, "--device=cpu", "--batch_size=8", "--model=moby", data).settings.EPOCHS == 1167
    # an explicit --epochs wins; performance runs, the default dataset, accelerators and a
    # MoBY config of one's own keep their defaults
    assert plan(tmp_path, "--device=cpu", "--batch_size=8", "--epochs=3", data).settings.EPOCHS == 3
    assert plan(tmp_path, "--device=cpu", "--batch_size=8", data, mode="perf").settings.EPOCHS == 1
    assert plan(tmp_path, "--device=cpu", "--batch_size=8").settings.EPOCHS == 1
    assert plan(tmp_path, "--device=cuda", "--batch_size=8", data, "--dry_run").settings.EPOCHS == 100
    own = plan(tmp_path, "--device=cpu", "--batch_size=8", data, "--cfg=configs/moby_swin_cpu.yaml")
    assert own.settings.EPOCHS == 1


def test_resume_messages(tmp_path):
    import torch

    run = plan(tmp_path, "--device=cpu", "--nnodes=2", "--node_rank=1", "--master_addr=h", nproc=8)
    assert "this node's ranks resume only if they see node 0's checkpoint" in stages.resume_message(run, ())
    run = plan(tmp_path, "--device=cpu", "--model=moby")
    assert "from the start (it stopped before its first checkpoint)" in stages.resume_message(run, ())
    checkpoint = run.paths.run_dir / "moby__x" / "pretrain" / "checkpoint.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"epoch": 0, "epoch_step": 4}, checkpoint)
    assert stages.resume_message(run, ()) == f"resuming from {checkpoint} (epoch 1, batch 4); --fresh to start over"
    assert "pretraining in " in stages.resume_message(run, ("pretraining",))
