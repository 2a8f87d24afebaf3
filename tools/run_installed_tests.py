"""Run the test suite against the installed sagd, never the source tree.

    python tools/run_installed_tests.py PROJECT_DIR [pytest args...]

Copies PROJECT_DIR/tests (and the pytest settings in pyproject.toml) to a temporary folder
and runs pytest there, after checking that `import sagd` resolves outside PROJECT_DIR.
Used by cibuildwheel's test command and by tools/test_aarch64.sh.
"""
import os
import shutil
import subprocess
import sys
import tempfile


def main():
    project = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="sagd-tests-")
    shutil.copytree(os.path.join(project, "tests"), os.path.join(work, "tests"))
    shutil.copy(os.path.join(project, "pyproject.toml"), work)
    code = ("import os, sagd, sagd._kernels as k; "
            "print('testing', os.path.dirname(sagd.__file__), 'SIMD', k.simd_available())")
    where = subprocess.run([sys.executable, "-c", code], cwd=work, check=True,
                           capture_output=True, text=True).stdout.strip()
    print(where)
    if where.split()[1].startswith(project + os.sep):
        sys.exit(f"sagd is imported from the source tree ({where}); install the wheel first")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"] + sys.argv[2:]
    sys.exit(subprocess.call(cmd, cwd=work))


if __name__ == "__main__":
    main()
