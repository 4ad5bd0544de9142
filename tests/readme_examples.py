"""The README's Python examples (each fenced block after a `<!-- readme-example: NAME -->` marker), run by the
tests as a user would run them."""

import pathlib
import subprocess
import sys

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_example(name: str) -> str:
    return README.split(f"<!-- readme-example: {name} -->\n```python\n", 1)[1].split("```", 1)[0]


def run_against_gateway(name: str, gateway_address: str, tmp_path: pathlib.Path,
                        api_key: str | None = None) -> subprocess.CompletedProcess:
    """Runs example `name` with its client pointed at `gateway_address` (and `api_key`, for a gateway that
    wants one); the caller checks the output."""
    code = readme_example(name).replace("127.0.0.1:8000", gateway_address)
    if api_key is not None:
        code = code.replace('api_key="none"', f'api_key="{api_key}"')
    (tmp_path / "example.py").write_text(code)
    return subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
