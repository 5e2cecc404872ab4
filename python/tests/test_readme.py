"""The README's "From Python and Dask" quickstart, run verbatim against a
``credstream-broker --dev``, with AWS credentials minted through moto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import laptop_env, seed_moto, start_broker, start_moto

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def quickstart() -> str:
    with open(README) as f:
        text = f.read()
    section = re.split(r"<!-- python-doc-test: begin.*?-->", text, maxsplit=1, flags=re.DOTALL)[
        1
    ].split("<!-- python-doc-test: end -->", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, "no python block between the python-doc-test markers"
    return "\n".join(blocks)


def test_the_readme_quickstart_runs_verbatim(log_dir: str, tmp_path: Path) -> None:
    moto = start_moto(log_dir)
    try:
        broker = start_broker(log_dir)
    except BaseException:
        moto.proc.stop()
        raise
    try:
        # The quickstart mints without a role, with GetSessionToken, whose
        # answer moto only accepts with auth off; nothing here reads S3.
        seed_moto(moto, auth=False)
        home = tmp_path / "laptop"
        home.mkdir()
        env = {
            "PATH": "/usr/bin:/bin",
            **laptop_env(moto, str(home), None),
            "CREDSTREAM_BROKER": broker.url,
            "CREDSTREAM_PUBLISHER_TOKEN": broker.publisher_token,
        }
        done = subprocess.run(
            [sys.executable, "-c", quickstart()],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "'kind': 'aws'" in done.stdout, done.stdout
        # Sealed by default: the broker cannot read the env's names.
        assert "'names': [], 'sealed': True}, 'sealed': True, 'agents'" in done.stdout, done.stdout
        assert "some-token" not in done.stdout + done.stderr
    finally:
        broker.proc.stop()
        moto.proc.stop()
