"""Safety: no code runs from data, servers stay on this machine, no secrets, no escapes.

- Loading weights never executes code: a pickle that would run a shell command is refused
  before anything runs, in every PyTorch layout (tests/test_torch_weights.py,
  ``test_pickle_calling_a_foreign_global_is_refused_without_running_it``), and an ``.npz``
  with pickled object arrays is refused (tests/test_weights.py); here, the same for the
  arrays the stages pass to each other (``tlflax.io.read_arrays``).
- The servers the project's configs start listen on 127.0.0.1 unless told otherwise.
- No credentials in the files git tracks (or would track).
- A dataset source cannot read outside its root, through a symlink or ``..``: image folders
  in tests/test_user_data.py (``symlink_outside_root``, ``dotdot_path_outside_root``,
  ``class_folder_outside_root``); text-file sources here.
- Writing a dataset leaves nothing behind in the temporary directory.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tlflax.data.errors import DataError
from tlflax.data.text_file import read_text_file_splits
from tlflax.data.tfds_store import read_image_split, write_image_dataset
from tlflax.io import read_arrays

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ------------------------------------------------------------------ no code from data files


class _RunsShellCommand:
    """Unpickling this runs a shell command: what a malicious file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_arrays_holding_a_pickle_are_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "train.npz"
    payload = np.array([_RunsShellCommand(f"touch {shlex.quote(str(marker))}")], dtype=object)
    np.savez(path, features=payload, label=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="pickled") as error:
        read_arrays(path)
    assert str(error.value).startswith(str(path))
    assert not marker.exists()


# ---------------------------------------------------------------- servers on this machine


def _resolve_defaults(text: str) -> str:
    """``${NAME:-default}`` as Docker Compose reads it with NAME unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def _published_addresses(service: dict) -> list[str]:
    """The host address each published port of a compose service binds (0.0.0.0 if none)."""
    addresses = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # long syntax
            addresses.append(port.get("host_ip", "0.0.0.0"))
            continue
        parts = _resolve_defaults(str(port)).split(":")
        # HOST:PORT:CONTAINER binds HOST; PORT:CONTAINER and CONTAINER bind every interface.
        addresses.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return addresses


COMPOSE_FILES = sorted((ROOT / "infra").glob("*compose*.y*ml"))


def test_compose_files_exist() -> None:
    assert COMPOSE_FILES, "the checks below would pass vacuously"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: path.name)
def test_compose_publishes_ports_on_loopback_only(compose_file: Path) -> None:
    services = yaml.safe_load(compose_file.read_text())["services"]
    published = {name: _published_addresses(service) for name, service in services.items()}
    assert any(published.values()), "a server should be reachable from this machine"
    for name, addresses in published.items():
        assert set(addresses) <= LOOPBACK, f"{compose_file.name}: {name} publishes on {addresses}"


def test_compose_environment_example_keeps_the_loopback_default() -> None:
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "infra/.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["PREFECT_BIND_ADDRESS"] in LOOPBACK


def test_published_address_parsing_sees_an_open_port() -> None:
    # The parser must be able to say no, or the tests above prove nothing.
    service = {"ports": ["4200:4200", "${BIND:-0.0.0.0}:1:1", {"target": 1}, "127.0.0.1:2:2"]}
    assert _published_addresses(service) == ["0.0.0.0", "0.0.0.0", "0.0.0.0", "127.0.0.1"]


def test_prefect_servers_default_to_loopback(monkeypatch) -> None:
    from prefect.settings import Settings

    for name in ("PREFECT_SERVER_API_HOST", "PREFECT_RUNNER_SERVER_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)  # Prefect reads prefect.toml from the working directory
    settings = Settings()
    assert settings.server.api.host in LOOPBACK
    assert settings.runner.server.host in LOOPBACK
    # And stated in the project's own file, whatever a later Prefect's defaults are.
    config = tomllib.loads((ROOT / "prefect.toml").read_text())
    assert config["server"]["api"]["host"] in LOOPBACK
    assert config["runner"]["server"]["host"] in LOOPBACK


def test_prefect_yaml_and_deploy_start_no_open_server() -> None:
    assert "0.0.0.0" not in (ROOT / "prefect.yaml").read_text()
    # `flow.serve` starts a webserver only with webserver=True, on runner.server.host.
    tree = ast.parse((ROOT / "pipelines/deploy.py").read_text())
    serve_calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "serve"
    ]
    assert serve_calls
    for call in serve_calls:
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        webserver = keywords.get("webserver")
        assert webserver is None or (
            isinstance(webserver, ast.Constant) and webserver.value is False
        ), "deploy.py turns on the runner's webserver"


# ------------------------------------------------------------------------- no credentials

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret access key": r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}",
    "private key": r"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----",
    "GitHub token": r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b|\bgithub_pat_[A-Za-z0-9_]{40,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "Prefect Cloud API key": r"\bpnu_[A-Za-z0-9]{36}\b",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{34}\b",
    "password in a URL": r"[a-z+]+://[^/\s:@'\"${}]+:(?!\$\{)[^/\s@'\"]+@",
    "password assignment": (
        r"(?i)(?<![{$])\b[A-Z_]*(PASSWORD|PASSWD|SECRET_KEY|API_KEY|(ACCESS|AUTH|API)_TOKEN)\b"
        r"\s*[=:]\s*(?!\$\{)(?!(change-me|changeme|null|None)\b|<|\"\"|'')"
        r"['\"]?[^\s'\"#]{4,}"
    ),
}
PLACEHOLDER_NOTE = "placeholders (change-me, <...>, ${VARIABLE}) are not secrets"


def _project_files() -> list[Path]:
    # Tracked files and new files git would pick up: a secret is caught before its commit.
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def _find_secrets(text: str) -> list[str]:
    return [
        f"{kind}: {match.group(0)[:40]}"
        for kind, pattern in SECRET_PATTERNS.items()
        for match in re.finditer(pattern, text, flags=re.MULTILINE)
    ]


def test_no_credentials_in_the_repository() -> None:
    files = _project_files()
    assert len(files) > 50
    assert not any(path.name == ".env" for path in files), "an .env file is tracked"
    found = {}
    for path in files:
        content = path.read_bytes()
        if b"\x00" in content[:8192] or len(content) > 5_000_000:
            continue  # binary (images, archives), or generated data
        secrets = _find_secrets(content.decode("utf-8", errors="replace"))
        if secrets:
            found[str(path.relative_to(ROOT))] = secrets
    assert not found, found


@pytest.mark.parametrize(
    "planted",
    [
        "AKIA" + "Q" * 16,
        "aws_secret_access_key = " + "a1B2" * 10,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "ghp_" + "x" * 36,
        "AIza" + "0" * 35,
        "pnu_" + "k" * 36,
        "postgresql://prefect:" + "hunter2" + "@db:5432/prefect",
        "POSTGRES_PASSWORD=" + "s3cr3t-value",
        "api_token: " + "'abcd1234'",
    ],
)
def test_the_scanner_finds_a_planted_secret(planted: str) -> None:
    assert _find_secrets(f"something before\n{planted}\nafter"), planted


@pytest.mark.parametrize(
    "harmless",
    [
        "POSTGRES_PASSWORD=change-me",
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it in infra/.env}",
        "postgresql+asyncpg://${POSTGRES_USER:-prefect}:${POSTGRES_PASSWORD}@postgres:5432/x",
        "credentials from the usual AWS sources (environment, `~/.aws`, instance role)",
    ],
)
def test_the_scanner_lets_placeholders_pass(harmless: str) -> None:
    assert not _find_secrets(harmless), PLACEHOLDER_NOTE


# ------------------------------------------------------------- sources stay inside their root


GOOD_CSV = "text,label\nlovely tea,great\nbitter,other\n"


def _text_source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    root.mkdir()
    (root / "train.csv").write_text(GOOD_CSV)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(GOOD_CSV)
    return root


@pytest.mark.parametrize(
    "link_target",
    [lambda tmp_path: tmp_path / "outside/secret.csv", lambda _: "../outside/secret.csv"],
    ids=["absolute_symlink", "dotdot_symlink"],
)
def test_text_split_file_linking_outside_its_root_is_refused(tmp_path: Path, link_target) -> None:
    root = _text_source(tmp_path)
    (root / "test.csv").symlink_to(link_target(tmp_path))
    with pytest.raises(DataError, match="outside the dataset root") as error:
        read_text_file_splits(root, text_column="text", label_column="label")
    assert str(error.value).startswith(str(root / "test.csv"))


def test_text_split_folder_linking_outside_its_root_is_refused(tmp_path: Path) -> None:
    root = _text_source(tmp_path)
    (root / "test.csv").write_text(GOOD_CSV)
    linked = tmp_path / "linked"
    linked.symlink_to(root)  # the root itself may be a link: what it points to is the root
    splits, _ = read_text_file_splits(linked, text_column="text", label_column="label")
    assert set(splits) == {"train", "test"}
    (root / "validation.csv").symlink_to(tmp_path / "outside/secret.csv")
    with pytest.raises(DataError, match="outside the dataset root"):
        read_text_file_splits(linked, text_column="text", label_column="label")


# ---------------------------------------------------------------- no litter in the temp dir


def test_writing_a_dataset_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    # TFDS 4.9.10 creates an empty /tmp/tmp*tfds folder for every new builder and never
    # removes it (tlflax.data.tfds_store._LocalDatasetInfo); a private temp dir shows it.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    splits = {"train": (images, np.array([0, 1])), "test": (images, np.array([1, 0]))}
    write_image_dataset(tmp_path / "data", "tiny", splits, ["a", "b"])
    write_image_dataset(tmp_path / "data", "tiny", splits, ["a", "b"])  # and a rebuild
    assert list(private_tmp.iterdir()) == []
    read_images, _ = read_image_split(tmp_path / "data", "tiny", "test")
    np.testing.assert_array_equal(read_images, images)
