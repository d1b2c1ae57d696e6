"""The committed contract artifacts are exactly what the sources compile to."""

import json
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "contracts" / "artifacts"


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", "contracts/build.js", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_committed_artifacts_are_up_to_date() -> None:
    result = build("--check")
    assert result.returncode == 0, result.stderr


def test_check_names_a_stale_artifact(tmp_path: Path) -> None:
    stale = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, stale)
    artifact_path = stale / "MintToken.json"
    artifact = json.loads(artifact_path.read_text())
    artifact["bytecode"] = artifact["bytecode"][:-2] + "00"
    artifact_path.write_text(json.dumps(artifact, indent=2) + "\n")

    result = build("--check", "--artifacts", str(stale))

    assert result.returncode == 1
    assert "stale artifact" in result.stderr
    assert "MintToken.json" in result.stderr
    assert "MockUSDC.json" not in result.stderr


def test_check_fails_when_an_artifact_is_missing(tmp_path: Path) -> None:
    partial = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, partial)
    (partial / "MockUSDC.json").unlink()

    result = build("--check", "--artifacts", str(partial))

    assert result.returncode == 1
    assert "MockUSDC.json" in result.stderr
