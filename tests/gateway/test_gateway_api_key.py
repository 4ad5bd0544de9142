"""Where the gateway's API key comes from (--api-key, --api-key-file, $GATEWAY_API_KEY), which source wins, and
that the key stays out of the config's repr and the logs."""

import logging
import pathlib

import httpx
import pytest

from gateway.config import API_KEY_ENV, GatewayConfig, build_parser, config_from_args

FILE_KEY = "key-from-file"


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture
def paths(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """What {name} stands for in the argv tables below."""
    (tmp_path / "key").write_text(FILE_KEY + "\n")  # as `echo KEY > file` and Kubernetes secrets write it
    (tmp_path / "empty").write_text("\n")
    return {"file": tmp_path / "key", "empty": tmp_path / "empty", "missing": tmp_path / "missing",
            "dir": tmp_path}


def argv_with(flags: list[str], paths: dict[str, pathlib.Path]) -> list[str]:
    return ["--llm", "a:1", *(flag.format(**paths) for flag in flags)]


@pytest.mark.parametrize("flags, env, key", [
    ([], None, None),
    (["--api-key", "key-from-flag"], None, "key-from-flag"),
    (["--api-key-file", "{file}"], None, FILE_KEY),
    ([], "key-from-env", "key-from-env"),
    ([], "key-from-env\n", "key-from-env"),
    (["--api-key", "key-from-flag"], "key-from-env", "key-from-flag"),
    (["--api-key-file", "{file}"], "key-from-env", FILE_KEY),
])
def test_each_source_gives_the_key_and_flags_beat_the_environment(flags, env, key, paths, monkeypatch):
    if env is not None:
        monkeypatch.setenv(API_KEY_ENV, env)
    assert config_from_args(argv_with(flags, paths)).api_key == key


@pytest.mark.parametrize("flags, env, words", [
    (["--api-key", "k", "--api-key-file", "{file}"], None, "--api-key-file: not allowed with argument --api-key"),
    (["--api-key-file", "{missing}"], None, "--api-key-file {missing}: cannot read the API key (No such file"),
    (["--api-key-file", "{dir}"], None, "--api-key-file {dir}: cannot read the API key (Is a directory"),
    (["--api-key-file", "{empty}"], None, "--api-key-file {empty}: the API key is empty"),
    (["--api-key", ""], None, "--api-key: the API key is empty"),
    (["--api-key", "  "], None, "--api-key: the API key is empty"),
    ([], "", f"{API_KEY_ENV}: the API key is empty"),
    ([], " \n", f"{API_KEY_ENV}: the API key is empty"),
])
def test_bad_key_sources_stop_the_gateway_with_a_message(flags, env, words, paths, monkeypatch, capsys):
    if env is not None:
        monkeypatch.setenv(API_KEY_ENV, env)
    with pytest.raises(SystemExit) as exit_:
        config_from_args(argv_with(flags, paths))
    assert exit_.value.code == 2 and words.format(**paths) in capsys.readouterr().err


def test_an_empty_key_is_refused_outside_the_cli_too():
    with pytest.raises(ValueError, match="api_key is empty"):
        GatewayConfig(llm_targets=("a:1",), api_key=" ")


def test_repr_hides_the_key():
    config = GatewayConfig(llm_targets=("a:1",), api_key="s3cret-value")
    assert "s3cret-value" not in repr(config) and "s3cret-value" not in str(config)
    assert "llm_targets=('a:1',)" in repr(config)


def test_help_explains_every_source():
    text = " ".join(build_parser().format_help().split())
    assert "[--api-key KEY | --api-key-file PATH]" in text
    assert "`ps`" in text and API_KEY_ENV in text and "trailing newline" in text


async def test_a_key_from_a_file_guards_the_api(start_gateway, backend, fake, paths, caplog):
    config = config_from_args(["--llm", backend.target, "--api-key-file", str(paths["file"])])
    with caplog.at_level(logging.DEBUG):
        async with start_gateway(*config.llm_targets, api_key=config.api_key) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                assert (await http.get("/v1/models")).status_code == 401
                wrong = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
                assert wrong.status_code == 401
                right = await http.get("/v1/models", headers={"Authorization": f"Bearer {FILE_KEY}"})
                assert right.status_code == 200 and right.json()["data"][0]["id"] == fake.MODEL
    assert caplog.records and not any(FILE_KEY in record.getMessage() for record in caplog.records)
