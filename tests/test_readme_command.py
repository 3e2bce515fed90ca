"""The README's quick-start command runs as written and keeps the accuracy the README claims."""
import json
import re
import shlex
from pathlib import Path

from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_quick_start_command(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("pip install -e . && onnxcompress optimize"))
    argv = shlex.split(line.split("&& onnxcompress ", 1)[1])
    monkeypatch.chdir(ROOT)
    out = tmp_path / "digits.opt.onnx"
    rep = tmp_path / "report.json"
    argv[argv.index("-o") + 1] = str(out)
    argv[argv.index("--report") + 1] = str(rep)
    assert main(argv + ["--quiet"]) == 0
    data = json.loads(rep.read_text())
    claimed = re.search(r"99\.72 % → ([\d.]+) % test accuracy with `--data-aware`", readme)
    assert claimed, "README no longer states the quick-start accuracy"
    assert 100 * data["fidelity"]["accuracy_after"] >= float(claimed.group(1)) - 0.3
    assert data["model"]["decomposed_ratio"] > 1.8
