"""recipe.sh: a failed stage stops the recipe with that stage's own error, a rerun skips the stages that finished
and reruns the one that failed, --force reruns everything, and a bad preset is refused. The stages are replaced
by a stand-in `python` on PATH (the real stages run in CI: `bash recipe.sh smoke`)."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *sft.py*) [ -e "$FIXED" ] || { echo "sft.py: error: the stand-in failure" >&2; exit 3; } ;;
esac
"""


def recipe(tmp_path, *args):
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               FIXED=str(tmp_path / "fixed"), VIRTUAL_ENV="stand-in")
    (tmp_path / "calls").write_text("")
    p = subprocess.run(["bash", str(tmp_path / "repo" / "recipe.sh"), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr, (tmp_path / "calls").read_text().splitlines()


def test_a_failed_stage_stops_and_a_rerun_goes_on_from_it(tmp_path):
    (tmp_path / "repo").mkdir()
    shutil.copy(os.path.join(ROOT, "recipe.sh"), tmp_path / "repo")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE)
    (tmp_path / "bin" / "python").chmod(0o755)

    rc, out, err, calls = recipe(tmp_path, "smoke")
    assert rc == 3 and "the stand-in failure" in err               # the stage's own error, and nothing after it
    assert [c.split()[0] for c in calls] == ["gen_data.py", "gen_data.py", "sft.py"]
    rc, out, err, calls = recipe(tmp_path, "smoke")                 # the data is done: only the failed stage reruns
    assert rc == 3 and out.count("skipped") == 2 and [c.split()[0] for c in calls] == ["sft.py"]
    (tmp_path / "fixed").write_text("")
    rc, out, err, calls = recipe(tmp_path, "smoke")                 # fixed: the recipe runs to the end
    assert rc == 0, err
    ran = [c.split()[0] for c in calls]
    assert ran.count("sft.py") == 2 and ran.count("rl.py") == 3 and "gen_data.py" not in ran
    assert "where the time went" in out and "--table results/smoke" in " ".join(calls)
    rc, out, err, calls = recipe(tmp_path, "smoke")                 # all done: only the table and comparisons
    assert rc == 0 and all("--table" in c or "--compare" in c for c in calls)
    rc, out, err, calls = recipe(tmp_path, "smoke", "--force")      # --force reruns every stage
    assert rc == 0 and [c.split()[0] for c in calls][:2] == ["gen_data.py", "gen_data.py"]


def test_bad_arguments_are_refused(tmp_path):
    for args in (["laptop"], ["smoke", "--fast"], []):
        p = subprocess.run(["bash", os.path.join(ROOT, "recipe.sh"), *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and ("usage" in p.stderr or "unknown option" in p.stderr)
