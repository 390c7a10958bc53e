"""The CLI on bad input: one line naming the value and the fix, exit code 2, no traceback, and
nothing written (no output folder created). Also the library-level checks the CLI relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apart_fast import load_model, ops
from apart_fast.attacks import evaluate
from apart_fast.cli import main

TINY = ["--method", "clean", "--dataset", "synthetic", "--model", "smallcnn", "--width", "4", "--batch-size", "64",
        "--epochs", "1", "--eval-n", "16", "--eval-steps", "1", "--final-eval-steps", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No epoch probe (speed) and a private data cache (error tests must find nothing written)."""
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    monkeypatch.setenv("APART_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run on the 3-channel synthetic data."""
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def fails(argv: list[str], capsys: pytest.CaptureFixture, *needles: str, code: int = 2) -> str:
    """Run the CLI, expect ``code`` and one stderr line holding every needle."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("apart-fast: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize(("flags", "needles"), [
    (["--eps", "0"], ["--eps 0.0", "(0, 1]"]),
    (["--eps", "1.5"], ["--eps 1.5", "(0, 1]"]),
    (["--eval-eps=-8/255"], ["--eval-eps", "(0, 1]"]),
    (["--epochs", "-1"], ["--epochs -1", "positive"]),
    (["--epochs", "0"], ["--epochs 0", "positive"]),
    (["--apart-a-in", "-0.01"], ["--apart-a-in -0.01", ">= 0"]),
    (["--pgd-step", "-0.1"], ["--pgd-step -0.1", ">= 0"]),
    (["--fgsm-step", "-0.1"], ["--fgsm-step -0.1", "positive"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--apart-max-step", "0"], ["--apart-max-step 0.0", "positive"]),
    (["--apart-a-init", "2", "--apart-max-step", "1"], ["--apart-a-init 2.0", "--apart-max-step"]),
    (["--max-faults", "0"], ["--max-faults 0", "positive"]),
    (["--batch-size", "5000"], ["--batch-size 5000", "training examples (1024 less a 16-image validation slice)"]),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/apart_data"], ["--data-dir /nonexistent/apart_data",
                                                                              "does not exist"]),
])
def test_bad_train_settings_exit_2_and_write_nothing(flags, needles, tmp_path, capsys):
    out = tmp_path / "run"
    fails(["train", *TINY, *flags, "--out", str(out)], capsys, *needles)
    assert not out.exists()


def _image_folder(root: Path, test_classes: tuple[str, ...] = ("a", "b"), bad: str | None = None) -> Path:
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("test", test_classes)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(d / f"{i}.png")
    if bad is not None:
        (root / bad).write_bytes(b"this is not a png")
    return root


def test_image_folder_with_missing_class_exits_2(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", test_classes=("a",))
    out = tmp_path / "run"
    fails(["train", *TINY, "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out)], capsys,
          "class folders differ", "b")
    assert not out.exists()


def test_image_folder_with_unreadable_image_names_the_file(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", bad="train/b/broken.png")
    out = tmp_path / "run"
    fails(["train", *TINY, "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out)], capsys,
          "broken.png")
    assert not out.exists()


def test_output_folder_holding_a_run_is_refused_unless_overwrite_or_resume(trained, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    fails(["train", *TINY, "--out", str(trained)], capsys, f"--out {trained} already holds a run", "--overwrite",
          "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before  # untouched
    assert main(["train", "--resume", str(trained)]) == 0  # finished run: resume re-evaluates only
    out = tmp_path / "copy"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert main(["train", *TINY, "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert '"seed": 1' in (out / "config.json").read_text()


def test_resume_needs_a_checkpoint_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nothing"
    fails(["train", "--resume", str(missing)], capsys, f"--resume {missing}", "no checkpoint.pt")
    assert not missing.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_damaged_checkpoint_is_one_line_error(damage, trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    raw = (trained / "checkpoint.pt").read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw = raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:]
    elif damage == "foreign":
        import io

        buf = io.BytesIO()
        torch.save({"model": {}}, buf)  # a plain torch file, not ours
        raw = buf.getvalue()
    else:
        raw = b""
    (run / "checkpoint.pt").write_bytes(raw)
    needle = {"truncate": "truncated", "flip": "corrupted", "foreign": "not an apart_fast checkpoint",
              "empty": "not an apart_fast checkpoint"}[damage]
    fails(["train", "--resume", str(run)], capsys, str(run / "checkpoint.pt"), needle)
    fails(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--dataset", "synthetic", "--steps", "1"], capsys,
          needle)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # nothing else written


def test_eval_refuses_images_with_the_wrong_number_of_channels(trained, capsys):
    fails(["eval", "--checkpoint", str(trained / "model.pt"), "--dataset", "digits", "--steps", "1"], capsys,
          "3-channel", "digits has 10 of 1")


def test_eval_refuses_eps_outside_unit_interval(trained, capsys):
    fails(["eval", "--checkpoint", str(trained / "model.pt"), "--dataset", "synthetic", "--eps", "2"], capsys,
          "--eps 2.0", "(0, 1]")


def test_evaluate_refuses_images_outside_unit_range(trained):
    model = load_model(str(trained / "model.pt"))
    x, y = torch.rand(4, 3, 16, 16) * 2, torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*1/255"):
        evaluate(model, x, y, steps=1)


def test_evaluate_refuses_wrong_channel_count(trained):
    model = load_model(str(trained / "model.pt"))
    with pytest.raises(ValueError, match="channel"):
        evaluate(model, torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), steps=1)


def test_ops_refuse_mismatched_dtypes_and_devices():
    x = torch.rand(2, 3, 4, 4)
    d, a = torch.zeros_like(x), torch.tensor(0.1)
    with pytest.raises(TypeError, match=r"g has dtype torch.float64 but x has torch.float32.*g.to\(x.dtype\)"):
        ops.sign_step(x, d, torch.randn(2, 3, 4, 4, dtype=torch.float64), a, 0.1)
    with pytest.raises(ValueError, match="g is on meta but x is on cpu; move g there"):
        ops.sign_step(x, d, torch.empty(2, 3, 4, 4, device="meta"), a, 0.1)
    with pytest.raises(ValueError, match=r"eps=2.0 is not in \(0, 1\]"):
        ops.pgd_step(x, x, torch.randn_like(x), 0.1, 2.0)
    with pytest.raises(ValueError, match="a_init is on meta"):
        ops.perturb_init(x, torch.zeros_like(x), torch.tensor(0.1, device="meta"), 0.1)


def test_resume_refuses_a_changed_model_or_setting(trained, capsys):
    fails(["train", "--resume", str(trained), "--model", "preact18"], capsys,
          "--model preact18 differs from the run", "(smallcnn)", "--epochs may only grow")
    fails(["train", "--resume", str(trained), "--apart-lr", "0.1"], capsys, "--apart-lr 0.1 differs")
    fails(["train", "--resume", str(trained), "--apart-omega=0.1"], capsys, "--apart-omega-std 0.1 differs")  # abbreviated


def test_given_flags_are_the_ones_argparse_parsed() -> None:
    from apart_fast.cli import _given_flags

    assert _given_flags(["train"]) == set()
    assert _given_flags(["train", "--epoch", "5", "--no-normalize", "--apart-a-in=0.1", "--resume", "x"]) == {
        "epochs", "normalize", "apart_a_in", "resume"}


def test_eval_refuses_a_checkpoint_of_another_model(trained, capsys):
    fails(["eval", "--checkpoint", str(trained / "model.pt"), "--dataset", "synthetic", "--model", "preact18"],
          capsys, "holds a smallcnn model, not preact18")
