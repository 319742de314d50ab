"""README's "Python API" block runs as written (a user's working folder with photos/ and
more-photos/, a fresh store), and prints rows of the shape `tk infer` writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from toolkit.testing import isolated_env, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_the_python_api_block_of_the_readme_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README's Python API section has no python block"
    make_image_folder(tmp_path / "photos", ["a", "b"], per_class=6, size=48)
    make_image_folder(tmp_path / "more-photos", ["a", "b"], per_class=1, size=48)
    first = sorted((tmp_path / "more-photos" / "a").iterdir())[0]
    snippet = code.group(1).replace("more-photos/a/a_0.png", str(first.relative_to(tmp_path)))
    snippet += "\nprint(json.dumps([r.to_dict() for r in rows]))\n"
    proc = subprocess.run([sys.executable, "-c", "import json\n" + snippet], cwd=tmp_path,
                          env=isolated_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rows = [eval_row(line) for line in lines[:-1]]
    assert len(rows) == 2 and {r["path"].split("/")[-2] for r in rows} == {"a", "b"}
    for r in rows:
        assert set(r) >= {"path", "label", "score", "topk", "error"} and len(r["topk"]) == 2
    opened_rows = json.loads(lines[-1])
    assert len(opened_rows) == 1 and opened_rows[0]["label"] in ("a", "b")


def eval_row(line: str) -> dict:
    """A printed ``row.to_dict()`` (a Python dict repr of plain values) read back."""
    import ast

    return ast.literal_eval(line)
