import pytest

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
