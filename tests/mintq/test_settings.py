import json
import os
import subprocess
from pathlib import Path

import pytest
from eth_account import Account

from deploy.processes import api_command, beat_command, worker_command
from mintq.settings import ConfigError, Settings

BASE = {
    "RPC_URL": "http://127.0.0.1:8545",
    "USDC_ADDRESS": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    "TOKEN_ADDRESS": "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
    "PAY_TO": "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc",
}
KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


def test_reads_and_checksums_addresses() -> None:
    settings = Settings.from_env({**BASE, "PRICE": "2500000", "CONFIRMATIONS": "3"})
    assert settings.pay_to == "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
    assert settings.price == 2_500_000
    assert settings.confirmations == 3
    assert settings.minter_private_key is None


@pytest.mark.parametrize("missing", sorted(BASE))
def test_missing_required_value_names_it(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [("PAY_TO", "0x1234"), ("PRICE", "abc"), ("PRICE", "0"), ("CONFIRMATIONS", "-1")],
)
def test_malformed_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})


def test_minter_key_never_shows_in_repr() -> None:
    settings = Settings.from_env({**BASE, "MINTER_PRIVATE_KEY": KEY})
    assert settings.require_minter_key() == KEY
    assert KEY[2:] not in repr(settings)
    assert KEY[2:] not in str(settings)


def test_api_processes_run_without_the_key() -> None:
    with pytest.raises(ConfigError, match="MINTER_PRIVATE_KEY"):
        Settings.from_env(BASE).require_minter_key()


PASSWORD = "correct horse battery staple"
WRONG = "not-the-password-42"


def keystore(tmp_path: Path, password: str = PASSWORD) -> dict[str, str]:
    """The env naming a keystore of KEY (as `Account.encrypt` writes it) and its password."""
    key_path = tmp_path / "minter.json"
    key_path.write_text(json.dumps(Account.encrypt(KEY, PASSWORD, kdf="scrypt", iterations=2)))
    password_path = tmp_path / "password"
    password_path.write_text(password + "\n")
    return {"MINTER_KEYSTORE": str(key_path), "MINTER_KEYSTORE_PASSWORD_FILE": str(password_path)}


def test_the_key_can_come_from_a_keystore(tmp_path: Path) -> None:
    settings = Settings.from_env({**BASE, **keystore(tmp_path)})
    assert settings.require_minter_key() == KEY
    assert KEY[2:] not in repr(settings)
    assert PASSWORD not in repr(settings)


def test_a_wrong_keystore_password_names_the_files_not_the_secrets(tmp_path: Path) -> None:
    settings = Settings.from_env({**BASE, **keystore(tmp_path, password=WRONG)})
    with pytest.raises(ConfigError, match="cannot be decrypted: wrong password") as info:
        settings.require_minter_key()
    shown = str(info.value) + repr(info.value) + repr(settings)
    assert KEY[2:] not in shown
    assert PASSWORD not in shown
    assert WRONG not in shown
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_missing_keystore_is_a_clear_error(tmp_path: Path) -> None:
    env = {**BASE, **keystore(tmp_path), "MINTER_KEYSTORE": str(tmp_path / "gone.json")}
    with pytest.raises(ConfigError, match=r"MINTER_KEYSTORE .*gone\.json cannot be read"):
        Settings.from_env(env).require_minter_key()


def test_a_key_and_a_keystore_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either MINTER_PRIVATE_KEY or MINTER_KEYSTORE") as info:
        Settings.from_env({**BASE, **keystore(tmp_path), "MINTER_PRIVATE_KEY": KEY})
    assert KEY[2:] not in str(info.value)


def test_a_keystore_needs_its_password_file(tmp_path: Path) -> None:
    env = {**BASE, "MINTER_KEYSTORE": keystore(tmp_path)["MINTER_KEYSTORE"]}
    with pytest.raises(ConfigError, match="MINTER_KEYSTORE_PASSWORD_FILE"):
        Settings.from_env(env)


def test_every_bad_value_gets_its_own_line() -> None:
    env = {**BASE, "PRICE": "abc", "CONFIRMATIONS": "-1", "RATE_LIMIT_PER_IP": "fast"}
    del env["PAY_TO"]
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    lines = str(info.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "PAY_TO is not set (see .env.example)",
        "PRICE",
        "CONFIRMATIONS",
        "RATE_LIMIT_PER_IP",
    ]
    assert "(got 'fast')" in lines[-1]


def test_a_bad_secret_is_named_but_never_shown() -> None:
    short_token = "tooshort-secret"
    with pytest.raises(ConfigError, match="ADMIN_TOKEN: must be at least 16") as info:
        Settings.from_env({**BASE, "ADMIN_TOKEN": short_token, "MINTER_PRIVATE_KEY": KEY})
    assert short_token not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_process_environment_is_read_and_a_given_mapping_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PRICE", "7")
    monkeypatch.setenv("MAX_FEE_GWEI", "")  # empty is unset, as in a mapping
    assert Settings.from_env().price == 7
    assert Settings.from_env().max_fee_gwei == Settings.model_fields["max_fee_gwei"].default
    # A mapping given is the whole environment: nothing leaks in from the process's.
    assert Settings.from_env(BASE).price == 1_000_000
    with pytest.raises(ConfigError, match="RPC_URL is not set"):
        Settings.from_env({k: v for k, v in BASE.items() if k != "RPC_URL"})


def test_replace_validates_like_the_environment() -> None:
    settings = Settings.from_env(BASE)
    assert settings.replace(price=5).price == 5
    with pytest.raises(ConfigError, match="PRICE"):
        settings.replace(price=0)


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        pytest.param(api_command(port=0, workers=1), 4, id="api"),  # gunicorn: app failed to load
        pytest.param(worker_command(concurrency=1), 1, id="worker"),
        pytest.param(beat_command(Path("/nonexistent/schedule")), 1, id="beat"),
    ],
)
def test_every_process_stops_on_a_bad_value_with_its_lines(
    command: list[str], exit_code: int
) -> None:
    env = {**os.environ, **BASE, "PRICE": "0", "RATE_LIMIT_PER_IP": "fast"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == exit_code
    assert (
        "mintq: invalid settings:\n"
        "  PRICE: Input should be greater than 0 (got '0')\n"
        "  RATE_LIMIT_PER_IP: must be <requests>/<seconds>, e.g. 60/60 (got 'fast')\n"
    ) in done.stderr
    assert "Traceback" not in done.stderr
