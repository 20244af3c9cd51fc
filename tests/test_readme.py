"""The README's promises that can be checked mechanically."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def first_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    install_and_train, install_and_test = first_commands()
    assert install_and_train.endswith("vaelab train")
    assert "pytest" in install_and_test


def test_ci_runs_the_readmes_test_command_word_for_word():
    _, install_and_test = first_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci


def test_the_readmes_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "quick" / "model.safetensors").is_file()


def test_the_readme_is_a_short_product_page():
    assert len((REPO / "README.md").read_text().split()) <= 1500  # the rest lives in docs/
