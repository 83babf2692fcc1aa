"""Every script under benchmarks/ runs end to end at tiny sizes, so that none of them rots.

Each runs as a user runs it (`python benchmarks/NAME.py ...`, a fresh process on the CPU); the
figures are not checked, only that the script finishes and writes what it promises.
`gpu_check.py --tiny` runs throughput.py, step_cost.py, sweep_speed.py, input_pipeline.py and
one epoch of experiments/main.py (the sections of the GPU check), so those need no test here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.multiprocess import ROOT


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.mark.slow(seconds=100)
def test_gpu_check_runs_every_section_on_the_cpu_at_tiny_sizes(tmp_path):
    from benchmarks import gpu_check

    run_script("gpu_check.py", "--tiny", "--out", tmp_path, "--work", tmp_path / "work")
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: s["status"] for name, s in record["sections"].items()} == {
        name: "ok" for name in gpu_check.SECTIONS}
    table = (tmp_path / "gpu_check.md").read_text()
    for row in ("D-SINK step (defaults) / CE step, C = 10", "sweep speed-up, sequential / vmapped",
                "paper preset, one epoch of CIFAR-10-LT r100", "GPU kept busy",
                "train step, fp32"):
        assert row in table, row
    # Only the two results are written to --out (what a device call brings back).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md",
                                                          "work"]
    epoch = record["sections"]["paper_epoch"]["record"]
    assert epoch["images_per_sec"] > 0 and epoch["data"]["num_train"] < 1200  # long-tailed


def test_gpu_check_reports_a_failed_section_and_goes_on(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    fakes = {"sweep": "raise SystemExit(3)", "paper_epoch": "pass"}  # fails; writes no record
    monkeypatch.setattr(gpu_check, "section_commands",
                        lambda name, **_: [[sys.executable, "-c", fakes[name]]])
    monkeypatch.setattr(gpu_check, "write_synthetic_cifar", lambda *args: None)
    status = gpu_check.main(["--tiny", "--sections", "sweep,paper_epoch", "--out",
                             str(tmp_path), "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1
    assert record["sections"]["sweep"]["status"] == "failed: exit status 3"
    assert record["sections"]["paper_epoch"]["status"] == "failed: no record"  # it still ran
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| sweep | failed: exit status 3 |" in table
    # A budget spent before a section starts skips it, and says so.
    gpu_check.main(["--tiny", "--sections", "sweep", "--budget-s", "1", "--out", str(tmp_path),
                    "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["sections"]["sweep"]["status"] == "skipped: no time left in the budget"


@pytest.mark.slow(seconds=30)
def test_accuracy_writes_the_table_and_the_records(tmp_path):
    out = run_script("accuracy.py", "--family=dsink", "--data=digits", "--preset=smoke",
                     "--settings=imbalance=10,noise=sym,noise_rate=0.2", "--seeds=0",
                     f"--root={tmp_path}")
    records = json.loads((tmp_path / "accuracy.json").read_text())
    assert [r["name"] for r in records] == ["baseline", "imbalance_teacher", "noise_teacher",
                                            "student"]
    assert "| student (f_L la, f_N ce) | 1 |" in (tmp_path / "accuracy.md").read_text()
    # Each stage's evaluations over its 2 epochs (smoke evaluates every epoch).
    for r in records:
        assert [p["epoch"] for p in r["curve"]] == [1, 2], r["name"]
        assert r["curve"][-1]["test_accuracy"] == pytest.approx(r["test_accuracy"], abs=1e-6)
    assert "student" in out
    summary = (tmp_path / "accuracy_summary.md").read_text()
    assert ("| imbalance=10,noise=sym,noise_rate=0.2 | smoke: mlp, float32, 2 epochs | "
            "student default | 0 |") in summary
    assert (tmp_path / "accuracy_summary.png").read_bytes()[:4] == b"\x89PNG"
    # The same table from the records alone, as the README's is made.
    run_script("accuracy.py", f"--summarize={tmp_path}/accuracy.json", f"--out={tmp_path}/again")
    assert (tmp_path / "again.md").read_text().endswith(summary.split("\n\n", 2)[-1])
    # A grid of students in one program (the sweep), in the same workdirs: the teachers are
    # reused, every member gets a record, and the member with the default values is the
    # default student, trained again inside the sweep's program to the same predictions.
    out = run_script("accuracy.py", "--family=dsink", "--data=digits", "--preset=smoke",
                     "--settings=imbalance=10,noise=sym,noise_rate=0.2", "--seeds=0",
                     "--sweep=epsilon=1,2", f"--root={tmp_path}")
    assert out.count("reusing the finished stage") == 3
    swept = json.loads((tmp_path / "accuracy.json").read_text())
    members = {r["variant"]: r for r in swept if r["name"] == "student"}
    assert sorted(members) == ["epsilon1", "epsilon2"]
    assert members["epsilon1"]["overrides"] == {"dsink.epsilon": "1"}
    assert members["epsilon2"]["test_accuracy"] == pytest.approx(records[-1]["test_accuracy"],
                                                                 abs=1e-9)
    assert [p["epoch"] for p in members["epsilon1"]["curve"]] == [1, 2]
    assert members["epsilon1"]["dsink"]["epsilon"] == 1
    table = (tmp_path / "accuracy_summary.md").read_text()
    assert "| student default | 0 |" in table and "| student epsilon1 | 0 |" in table
    # What the run's teachers know: restored from their checkpoints, CE and f_L give back the
    # test accuracies they recorded; the class masses are distributions.
    run_script("teacher_diagnostics.py", "--data=digits", "--preset=smoke",
               "--setting=imbalance=10,noise=sym,noise_rate=0.2",
               f"--workdir={tmp_path}/imbalance-10_noise-sym_noise_rate-0.2/seed0",
               f"--out={tmp_path}/diagnostics.json")
    found = json.loads((tmp_path / "diagnostics.json").read_text())
    by_loss = {r["loss"]: r["test_accuracy"] for r in records if r["name"] != "student"}
    assert found["test_accuracy"]["ce"] == pytest.approx(100 * by_loss["ce"], abs=1e-4)
    assert found["test_accuracy"]["la"] == pytest.approx(100 * by_loss["la"], abs=1e-4)
    for name, mass in found["class_mass"].items():
        assert sum(mass) == pytest.approx(1, abs=1e-5) and min(mass) >= 0, name
    assert found["class_mass_l1_to_clean"]["clean"] == 0
    # Arguments that name another run than the workdir's stop before reporting anything.
    with pytest.raises(AssertionError, match="was not trained with --setting/--preset/--seed"):
        run_script("teacher_diagnostics.py", "--data=digits", "--preset=smoke", "--seed=1",
                   "--setting=imbalance=10,noise=sym,noise_rate=0.2",
                   f"--workdir={tmp_path}/imbalance-10_noise-sym_noise_rate-0.2/seed0")


def test_the_summary_tells_a_run_without_augmentation_apart():
    from benchmarks import accuracy
    record = {"protocol": {"preset": "cpu", "model": "resnet8", "dtype": "bfloat16",
                           "epochs": 40}}
    label = "cpu: resnet8, bfloat16, 40 epochs"
    assert accuracy.protocol_label(record) == label
    off = {"data.crop_padding": "0", "data.flip": "False"}  # as `--set` records them
    assert accuracy.protocol_label({**record, "set": off}) == label + ", no augmentation"
    assert accuracy.protocol_label({**record, "set": {"data.crop_padding": "0"}}) == label
    record["protocol"]["augment"] = False  # the protocol's own field wins
    assert accuracy.protocol_label(record) == label + ", no augmentation"
    assert accuracy.protocol_label({**record, "set": {}}) == label + ", no augmentation"


def test_build_cifar_lt_on_a_small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=rng.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(500) % 10, x_test=rng.integers(0, 256, (50, 8, 8, 3),
                                                              dtype=np.uint8),
             y_test=np.arange(50) % 10)
    out = run_script("build_cifar_lt.py", "--data", f"npz:{path}", "--imbalance", "10",
                     "--noise", "sym", "--noise-rate", "0.4", "--json")
    assert "50" in out and "realised" in out.lower()


@pytest.mark.slow(seconds=10)
@pytest.mark.parametrize("name,args", [
    ("allocation.py", ["--sizes", "8x4", "--repeats", "1", "--pot_repeats", "1"]),
    ("potential.py", ["--num-classes", "4", "--dim", "8", "--batch-size", "8", "--num-samples",
                      "64", "--steps", "1", "--repeats", "1"]),
    ("ot_softmax_cost.py", ["--model", "cnn", "--num-classes", "10", "--batch-size", "8",
                            "--solve-steps", "1",
                            "--num-samples", "64", "--repeats", "1", "--steps", "1"]),
])
def test_timing_scripts_run_at_tiny_sizes(name, args):
    assert run_script(name, *args).strip()


def test_the_summary_puts_a_single_model_beside_the_dsink_runs_of_its_setting():
    from benchmarks import accuracy
    protocol = {"preset": "cpu", "model": "resnet8", "dtype": "bfloat16", "epochs": 40}
    base = dict(protocol=protocol, seed=0, variant=None, few_shot_accuracy=0.1)
    setting = "imbalance=100,noise=sym,noise_rate=0.4"
    records = [
        dict(base, name="baseline", loss="ce", setting=setting, test_accuracy=0.30),
        dict(base, name="noise_teacher", loss="gce_la", setting=setting, test_accuracy=0.31),
        dict(base, name="student", loss="dsink", setting=setting, test_accuracy=0.33),
        dict(base, name="select_la", loss="select_la", setting=setting + ",loss=select_la",
             test_accuracy=0.35),
    ]
    groups = accuracy.summary_groups(records)
    assert list(groups) == [(setting, "cpu: resnet8, bfloat16, 40 epochs")]
    assert list(groups[list(groups)[0]]) == ["CE (ce)", "f_N (gce_la)", "student default",
                                             "single model (select_la)"]
    # The student is measured against the single model too: 33 - 35.
    assert "| student default | 0 | 33.0 (10.0) | -2.00 |" in accuracy.summary_table(records)
    # A dsink run's reference stage (its setting names no loss) stays CE.
    assert accuracy.single_model_setting(records[0]) is None


def test_a_variant_that_changes_no_default_is_summarised_as_the_default_student():
    from benchmarks import accuracy
    base = dict(protocol={"preset": "cpu", "model": "resnet8", "dtype": "bfloat16",
                          "epochs": 30}, name="student", loss="dsink", few_shot_accuracy=0.1,
                setting="imbalance=100,noise=sym,noise_rate=0.4")
    records = [dict(base, seed=0, variant="cached", overrides={"dsink.teachers": "cached"},
                    test_accuracy=0.42),
               dict(base, seed=1, variant=None, overrides=None, test_accuracy=0.44),
               dict(base, seed=0, variant="e1", overrides={"dsink.epsilon": "1"},
                    test_accuracy=0.45),
               dict(base, seed=0, variant="e2", overrides={"dsink.epsilon": "2.0"},
                    test_accuracy=0.40),
               dict(base, seed=0, variant="fwd", overrides={"dsink.teachers": "forward"},
                    test_accuracy=0.41),
               dict(base, seed=0, variant="long", overrides={"optim.epochs": "30"},
                    test_accuracy=0.43),
               # Sweep members: one changes epsilon alone (as e1 does), one nothing.
               dict(base, seed=1, variant="alpha2_epsilon1",
                    overrides={"dsink.alpha": "2", "dsink.epsilon": "1"}, test_accuracy=0.46),
               dict(base, seed=2, variant="alpha2_epsilon2",
                    overrides={"dsink.alpha": "2", "dsink.epsilon": "2"}, test_accuracy=0.41),
               dict(base, seed=1, variant="alpha5_epsilon1",
                    overrides={"dsink.alpha": "5", "dsink.epsilon": "1"}, test_accuracy=0.25)]
    columns = accuracy.summary_groups(records)[(base["setting"],
                                                "cpu: resnet8, bfloat16, 30 epochs")]
    # One seed per column: the first of seed 0's two default-equal students is kept.
    assert {c: [r["test_accuracy"] for r in rows] for c, rows in columns.items()} == {
        "student default": [0.42, 0.44, 0.41], "student e1": [0.45, 0.46],
        "student fwd": [0.41], "student long": [0.43], "student alpha5_epsilon1": [0.25]}


def test_the_accuracy_sweep_takes_the_students_own_options_only():
    from benchmarks import accuracy
    assert accuracy.parse_grid("alpha=1,2; epsilon=4") == {"alpha": [1.0, 2.0],
                                                           "epsilon": [4.0]}
    for bad, match in (("seed=0,1", "seed cannot be swept here"),
                       ("learning_rate=0.1", "learning_rate cannot be swept here"),
                       ("beta=1", "cannot sweep 'beta'")):
        with pytest.raises(ValueError, match=match):
            accuracy.parse_grid(bad)


def test_accuracy_jobs_train_workdirs_in_parallel_processes_to_the_same_models(tmp_path):
    common = ("--family=baseline", "--data=digits", "--preset=smoke",
              "--settings=imbalance=10,noise=sym,noise_rate=0.2")
    run_script("accuracy.py", *common, "--seeds=0,1", "--jobs=2", f"--root={tmp_path}/two")
    both = json.loads((tmp_path / "two" / "accuracy.json").read_text())
    assert [r["seed"] for r in both] == [0, 1]  # the runs' order, whichever finished first
    run_script("accuracy.py", *common, "--seeds=1", f"--root={tmp_path}/one")
    alone = json.loads((tmp_path / "one" / "accuracy.json").read_text())
    assert both[1]["params_fingerprint"] == alone[0]["params_fingerprint"]
    assert both[0]["params_fingerprint"] != both[1]["params_fingerprint"]


def test_accuracy_run_all_keeps_the_variants_of_a_workdir_together_and_in_order(monkeypatch,
                                                                               capsys):
    from benchmarks import accuracy

    trained = []
    monkeypatch.setattr(accuracy.pipelines, "run",
                        lambda config, workdir: trained.append(workdir) or {"stages": []})

    class Config:
        family = "dsink"
    runs = [("s", seed, v, {}, Config(), f"root/seed{seed}") for seed in (0, 1) for v in "ab"]
    done = list(accuracy.run_all(runs, jobs=1))
    assert [i for i, _, _ in done] == [0, 1, 2, 3]
    assert trained == ["root/seed0", "root/seed0", "root/seed1", "root/seed1"]
    with pytest.raises(SystemExit):  # --jobs is checked before anything trains
        run_script_args = ["--family=baseline", "--settings=imbalance=10", "--root=x",
                           "--jobs=0"]
        monkeypatch.setattr(sys, "argv", ["accuracy.py", *run_script_args])
        accuracy.main()
    assert "--jobs=0 must be >= 1" in capsys.readouterr().err
