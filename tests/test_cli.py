"""The sagd command end to end on CSV and npz files."""
import subprocess
import sys

import numpy as np
import pytest

from sagd.cli import main
from sagd.datasets import load_digits

X, Y = load_digits()


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "digits.csv"
    names = [f"px{i}" for i in range(64)] + ["digit"]
    words = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    with open(path, "w") as f:
        f.write(",".join(names) + "\n")
        for row, label in zip(X[:600], Y[:600]):
            f.write(",".join(f"{v:g}" for v in row) + "," + words[label] + "\n")
    return path


def test_train_predict_info_on_a_csv(tmp_path, csv_file, capsys):
    model = tmp_path / "m.sagd"
    assert main(["train", str(csv_file), "--target", "digit", "--budget", "1MB",
                 "--weights", "int8", "--epochs", "12", "--hidden", "64", "-o", str(model),
                 "-q"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("training accuracy ")[1].split(";")[0])
    assert acc > 0.85 and "saved" in out
    assert main(["predict", str(model), str(csv_file), "--drop-last"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 600 and set(lines) <= {"zero", "one", "two", "three", "four", "five",
                                                "six", "seven", "eight", "nine"}
    assert main(["info", str(model)]) == 0
    info = capsys.readouterr().out
    assert "64 -> 64 -> 10" in info and "int8" in info and "memory plan" in info


def test_train_on_npz_regression(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Xr = rng.standard_normal((500, 5)).astype(np.float32)
    yr = Xr @ np.arange(1, 6, dtype=np.float32)
    data = tmp_path / "r.npz"
    np.savez(data, X=Xr, y=yr)
    model = tmp_path / "r.sagd"
    assert main(["train", str(data), "-o", str(model), "--epochs", "30", "--lr", "0.01",
                 "-q"]) == 0
    assert "R^2" in capsys.readouterr().out
    assert main(["predict", str(model), str(data), "-o", str(tmp_path / "p.csv")]) == 0
    pred = np.loadtxt(tmp_path / "p.csv")
    assert pred.shape == (500,) and np.corrcoef(pred, yr)[0, 1] > 0.9


def test_errors_are_one_clear_line(tmp_path, csv_file, capsys):
    assert main(["train", str(csv_file), "--target", "nope"]) == 2
    assert "no column named 'nope'" in capsys.readouterr().err
    assert main(["train", str(csv_file), "--budget", "1KB", "-q"]) == 1
    assert "is below the" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.sagd")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_module_entry_point_and_demo_on_the_shipped_digits():
    out = subprocess.run([sys.executable, "-m", "sagd", "demo", "--dataset", "digits",
                          "--epochs", "3", "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "of the 16.0 MB budget" in out.stdout


def test_headerless_csv_with_a_text_label_keeps_every_row(tmp_path, capsys):
    rows = [f"{a:.2f},{b:.2f},{'yes' if a > b else 'no'}"
            for a, b in np.random.default_rng(0).random((120, 2))]
    data = tmp_path / "plain.csv"
    data.write_text("\n".join(rows) + "\n")
    model = tmp_path / "m.sagd"
    assert main(["train", str(data), "-o", str(model), "--epochs", "2", "-q"]) == 0
    assert "trained on 120 rows x 2 features" in capsys.readouterr().out
    assert main(["predict", str(model), str(data), "--drop-last"]) == 0
    assert len(capsys.readouterr().out.split()) == 120


def test_quoted_fields_semicolons_and_bad_cells(tmp_path, capsys):
    data = tmp_path / "q.csv"
    data.write_text('"a";"b";"label"\n' + "".join(f'"{i}";"{i % 3}";"c{i % 2}"\n'
                                                  for i in range(40)))
    assert main(["train", str(data), "-o", str(tmp_path / "q.sagd"), "--epochs", "1",
                 "-q"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,x\n3,,y\n")
    assert main(["train", str(bad), "-o", str(tmp_path / "b.sagd")]) == 2
    assert "line 3, column 1 (b) holds '', not a number" in capsys.readouterr().err
    assert main(["train", str(data), "-o", str(tmp_path / "no" / "m.sagd")]) == 2
    err = capsys.readouterr().err
    assert "the folder" in err and "does not exist" in err
