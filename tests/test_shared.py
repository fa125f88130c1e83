"""Every stage's copy of a shared helper is byte-identical to tests/shared_helpers.py (stages import nothing of ours).

    python tests/test_shared.py --sync     # paste the canonical helpers into every stage that carries them
"""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["prepare.py", "caption.py", "encode.py", "train.py", "eval.py"]
EVERY_STAGE = {"opt", "parse_config", "die"}  # each stage has a typed command line and one-line errors


def top_level(path):
    """{name: (first line, last line, source)} of the module-level functions and constants of a file."""
    text = Path(path).read_text()
    found = {}
    for node in ast.parse(text).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
        for name in names:
            found[name] = (node.lineno, node.end_lineno, ast.get_source_segment(text, node))
    return found


CANONICAL = top_level(Path(__file__).with_name("shared_helpers.py"))


def test_every_copy_is_the_canonical_one():
    carried = {name: [] for name in CANONICAL}
    for stage in STAGES:
        mine = top_level(REPO / stage)
        for name, (_, _, source) in CANONICAL.items():
            if name in mine:
                assert mine[name][2] == source, f"{stage}: {name} differs from tests/shared_helpers.py " \
                                                f"(run `python tests/test_shared.py --sync`)"
                carried[name].append(stage)
        missing = EVERY_STAGE - set(mine)
        assert not missing, f"{stage} lacks {sorted(missing)}"
    assert all(carried.values()), f"helpers no stage carries: {[n for n, s in carried.items() if not s]}"


def sync():
    for stage in STAGES:
        path = REPO / stage
        lines = path.read_text().splitlines(keepends=True)
        mine = top_level(path)
        # From the bottom up, so earlier line numbers stay valid.
        for name, (first, last, _) in sorted(mine.items(), key=lambda kv: -kv[1][0]):
            if name in CANONICAL and mine[name][2] != CANONICAL[name][2]:
                lines[first - 1:last] = [CANONICAL[name][2] + "\n"]
                print(f"{stage}: {name} synced")
        path.write_text("".join(lines))


if __name__ == "__main__" and sys.argv[1:] == ["--sync"]:
    sync()
