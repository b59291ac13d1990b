"""The README's code works: its Python blocks run, its commands parse.

- Every ```python block runs, in order, in one namespace, in a fresh process, with the
  training lengths shrunk (`updates=N` -> a few) so the whole README takes seconds. A block
  right after a `<!-- not run: reason -->` line is skipped (it needs a user's own files).
- Every command in a ```bash block is checked: `fastdiff ...` (also after `torchrun ... -m
  fastdiff` and `python -m fastdiff`) parses with the CLI's own parser, `python -m MOD`
  names an importable module, `make T` a Makefile target.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.apps.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    out = []
    pattern = re.compile(r"(<!-- not run:[^>]*-->\s*\n)?```" + lang + r"\n(.*?)```", re.S)
    for m in pattern.finditer(README):
        if not m.group(1):
            out.append(m.group(2))
    return out


def _commands() -> list[list[str]]:
    cmds = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)               # continuation lines
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                cmds.append(shlex.split(line))
    return cmds


def _env_stripped(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    return argv


def _fastdiff_args(argv: list[str]) -> list[str] | None:
    """The arguments of the fastdiff command inside `argv`, or None if there is none."""
    if argv[0] == "fastdiff":
        return argv[1:]
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in ("fastdiff", "fastdiff.apps.cli",
                                          "fastdiff.apps.distributed"):
            rest = argv[i + 2:]
            if rest and rest[0] == "--timeout-s":
                rest = rest[2:]
            return rest
    return None


def _placeholders(args: list[str]) -> list[str]:
    return ["x" if re.fullmatch(r"<[^>]+>|COMMAND|\.\.\.", a) else a for a in args]


def test_readme_commands_exist():
    cmds = [_env_stripped(c) for c in _commands()]
    assert len(cmds) > 15, "the README's commands were not found"
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    parser = build_parser()
    for argv in cmds:
        fd = _fastdiff_args(argv)
        if fd is not None:
            if fd in (["--help"], []) or fd[-1] == "--help":
                continue
            try:
                parser.parse_args(_placeholders(fd))
            except SystemExit as e:
                pytest.fail(f"README command does not parse ({e}): {' '.join(argv)}")
        if argv[0] == "make":
            for t in argv[1:]:
                if "=" not in t:
                    assert t in targets, f"README: make {t}: no such target"
        if "-m" in argv:
            mod = argv[argv.index("-m") + 1]
            if mod != "pytest":
                assert importlib.util.find_spec(mod) is not None, f"README: -m {mod}"


def _shrunk(code: str) -> str:
    code = re.sub(r"\bupdates=\d+", "updates=3", code)
    code = re.sub(r"\bbatch_size=\d+", "batch_size=32", code)
    return code


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 3, "the README's Python blocks were not found"
    script = "\n".join(["import torch", "torch.set_num_threads(1)"]
                       + [_shrunk(b) for b in blocks])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "FASTDIFF_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
