"""The `kvferry generate` command, run as a real process on the default model."""

import subprocess
import sys


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvferry.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_chat_answers_paris(default_model_file):
    result = run_cli("generate", "--chat", "What is the capital of France? Answer in one sentence.",
                     "--temperature", "0", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_reports_a_missing_model_clearly(tmp_path):
    result = run_cli("generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_generate_rejects_bad_sampling_values(default_model_file):
    result = run_cli("generate", "hi", "--temperature", "-1")
    assert result.returncode == 2
    assert "temperature" in result.stderr and "Traceback" not in result.stderr
