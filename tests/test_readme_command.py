"""The README's quick-start command runs as written and keeps the promise the README makes for it."""
import json
import re
import shlex
from pathlib import Path

from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_argv():
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("pip install -e . && onnxcompress optimize"))
    return readme, shlex.split(line.split("&& onnxcompress ", 1)[1])


def test_quick_start_report_folder_ships_with_the_checkout():
    """The command writes its report into a folder of the checkout; the tool refuses a missing output folder, so
    that folder must exist in a clean clone (a tracked file in it), not only in a checkout that ran it before."""
    import subprocess

    _, argv = _quick_start_argv()
    folder = Path(argv[argv.index("--report") + 1]).parent
    tracked = subprocess.run(["git", "ls-files", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0 and tracked.stdout.strip(), f"{folder}/ holds no tracked file"


def test_quick_start_command(tmp_path, monkeypatch):
    readme, argv = _quick_start_argv()
    budget = float(re.search(r"within an accuracy budget \(([\d.]+) point", readme).group(1))
    monkeypatch.chdir(ROOT)
    rep = tmp_path / "report.json"
    argv[argv.index("--report") + 1] = str(rep)
    assert "-o" not in argv  # the README says it writes beside the input; here it goes to tmp instead
    input_bytes = (ROOT / argv[1]).read_bytes()
    assert main(argv + ["-o", str(tmp_path / "digits.opt.onnx"), "--quiet"]) == 0
    assert (ROOT / argv[1]).read_bytes() == input_bytes
    data = json.loads(rep.read_text())
    fid = data["fidelity"]
    assert 100 * (fid["accuracy_before"] - fid["accuracy_after"]) <= budget + 1e-9
    assert 100 * fid["accuracy_before"] >= 99.0  # the README's 99.72 % trained model
    assert data["model"]["bytes_after"] < data["model"]["bytes_before"] / 2  # INT8 at least
    assert not data["warnings"]
