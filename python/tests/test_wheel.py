"""Wheel hygiene: the wheel installs into a fresh venv that has nothing
but pip, pulls in nothing else, and its commands run."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel = os.environ["CREDSTREAM_TEST_WHEEL"]
    path = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=True).create(path)
    python = str(path / "bin" / "python")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            "--no-index",
            wheel,
        ],
        check=True,
    )
    return path


def run(*argv: str) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_commands_are_installed_and_print_their_version(bare_venv: Path) -> None:
    import credstream

    version = credstream.__version__
    assert run(str(bare_venv / "bin" / "credstream"), "--version") == f"credstream {version}"
    assert (
        run(str(bare_venv / "bin" / "credstream-agent"), "--version")
        == f"credstream-agent {version}"
    )


def test_the_module_imports_and_nothing_else_was_installed(bare_venv: Path) -> None:
    python = str(bare_venv / "bin" / "python")
    out = run(
        python,
        "-c",
        "import credstream, credstream._credstream as n; "
        "print(credstream.__version__, n.NativePublisher.__name__)",
    )
    assert out.split()[1] == "NativePublisher"
    listed = run(python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check")
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    # What `python -m venv` itself installs (setuptools too before 3.12).
    assert names - {"pip", "setuptools"} == {"credstream"}, names
    # credstream.dask needs distributed, which is not a dependency.
    failed = subprocess.run(
        [python, "-c", "import credstream.dask"], capture_output=True, text=True, check=False
    )
    assert failed.returncode != 0
    assert "distributed" in failed.stderr


def test_the_wheel_is_typed() -> None:
    import credstream

    package = os.path.dirname(credstream.__file__)
    # The typed modules carry their own annotations; the native module has
    # its stub.
    for name in ("py.typed", "_credstream.pyi", "__init__.py", "dask.py"):
        assert os.path.isfile(os.path.join(package, name)), name
    # No stub beside a typed module (it would shadow it for type checkers).
    for name in ("__init__.pyi", "dask.pyi"):
        assert not os.path.exists(os.path.join(package, name)), name
    assert sys.prefix in package
