"""The README is the newcomer's path: every link and file it names exists, and every command it shows uses
flags that the script's --help lists (a renamed flag would otherwise break the quick start silently)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("gen_data.py", "sft.py", "rl.py", "eval.py", "bench.py")


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def commands(markdown):
    """The shell commands of a Markdown file's ```bash blocks, continuation lines joined, comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.extend(part.strip() for part in re.split(r"&&|\|\||;|\|", line))
    return out


def script_flags(command):
    """(script, [--flags given to it]) for a `python X.py ...` or `torchrun ... X.py ...` command, else None."""
    words = shlex.split(command.replace("$HOST", "host"))
    for i, w in enumerate(words):
        if w in SCRIPTS:
            return w, [a.split("=")[0] for a in words[i + 1:] if a.startswith("--")]
    return None


def test_commands_parser_sees_every_stage():
    # guards the parser above: if it found nothing, the flag test below would pass vacuously
    found = {s for s, _ in filter(None, map(script_flags, commands(read("README.md"))))}
    assert {"gen_data.py", "sft.py", "rl.py", "eval.py"} <= found
    assert script_flags("torchrun --standalone --nproc_per_node=2 rl.py --init-from x") == ("rl.py", ["--init-from"])


@pytest.fixture(scope="module")
def helps():
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    out = {}
    for s, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"{s} --help failed:\n{stderr}"
        out[s] = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", stdout))
    return out


def test_readme_commands_use_real_flags(helps):
    bad = []
    for cmd in commands(read("README.md")):
        parsed = script_flags(cmd)
        if parsed:
            script, flags = parsed
            bad += [f"{script} {f}  (in: {cmd[:80]})" for f in flags if f not in helps[script]]
    assert not bad, "README commands use flags the scripts do not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_links_exist(name):
    text = read(name)
    links = [l.split("#")[0] for l in re.findall(r"\]\(([^)\s]+)\)", text)]
    local = [l for l in links if l and not re.match(r"[a-z]+://", l)]
    missing = [l for l in local if not os.path.exists(os.path.join(ROOT, l))]
    assert not missing, f"{name} links to missing files: {missing}"
    if name == "README.md":
        assert "RESULTS.md" in local


def test_readme_file_paths_and_names_exist():
    text = read("README.md")
    ticked = set(re.findall(r"`([^`\s]+)`", text))
    paths = [t for t in ticked if re.fullmatch(r"[\w.-]+(/[\w.-]+)*(\.(py|md|txt|sh|svg)|/)", t)]
    assert "model.py" in paths and "tests/" in paths
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"README names files that do not exist: {missing}"
    # module.name references (`model.fastest_decode_gemm`) must name something the module defines
    for mod, name in re.findall(r"`(model|tools|rl|sft|eval|gen_data|bench)\.(?!py`)(\w+)(?:\(\))?`", text):
        src = read(mod + ".py")
        assert re.search(rf"^(def|class) {name}\b|^{name}\s*=", src, re.M), f"README names {mod}.{name}, not in {mod}.py"


def test_file_map_line_counts_are_current():
    text = read("README.md")
    rows = re.findall(r"^\| `([\w/.-]+)` \| (\d+) \|", text, re.M)
    assert rows, "no file map rows found"
    for path, n in rows:
        full = os.path.join(ROOT, path)
        files = ([os.path.join(full, f) for f in os.listdir(full) if f.endswith(".py")] if os.path.isdir(full) else [full])
        lines = sum(sum(1 for _ in open(f)) for f in files)
        assert lines == int(n), f"README file map: {path} has {lines} lines, the README says {n}"
    total = sum(int(n) for path, n in rows if path != "tests/")
    assert re.search(rf"Non-test code: {total} lines", text), f"README: the non-test total should read {total}"


TABLE = re.compile(r"<!-- table: (\S+) -->\n(.*?)\n<!-- /table -->", re.S)


def test_readme_tables_are_what_the_committed_results_files_give():
    # a table between <!-- table: results/X --> and <!-- /table --> is eval.py --table results/X, pasted: a results
    # file changed, added or removed without re-pasting (or a hand edit of the table) fails here
    sys.path.insert(0, ROOT)
    import eval as E
    blocks = TABLE.findall(read("README.md"))
    assert blocks, "README.md has no generated results table"
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for directory, pasted in blocks:
        assert any(f.startswith(directory + "/") for f in tracked) or not tracked, f"{directory} is not committed"
        assert pasted.strip() == E.table(os.path.join(ROOT, directory)), \
            f"README table of {directory} differs from: python eval.py --table {directory}"
    committed = {os.path.dirname(f) for f in tracked if f.endswith(".json")}
    assert committed <= {d for d, _ in blocks}, f"results without a README table: {committed - {d for d, _ in blocks}}"
