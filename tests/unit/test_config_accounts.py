"""Several accounts in one configuration (issue 14): inheritance, names, key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from prxmail.config import (
    DEFAULT_ACCOUNT_NAME,
    load_accounts,
    load_config,
    parse_accounts,
    parse_config,
)
from prxmail.errors import ConfigError

MAIN = """\
[channels_config.email]
imap_host = "mail.example.com"
smtp_host = "mail.example.com"
username = "support@example.com"
password = "support-password"
from_address = "support@example.com"
allowed_senders = ["alice@example.com"]
max_concurrent_handlers = 2
exec = "support-bot"
"""
ACCOUNTS = "$.channels_config.email.accounts"
ENV = {"HOME": "/home/u"}


def accounts(*lines: str) -> tuple[object, ...]:
    return parse_accounts(MAIN + "\n".join(lines) + "\n", environ=ENV)


def problems_of(*lines: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_accounts(MAIN + "\n".join(lines) + "\n", environ=ENV)
    assert "support-password" not in str(info.value)
    assert "sales-password" not in str(info.value)
    return info.value.problems


SALES = (
    "[channels_config.email.accounts.sales]",
    'username = "sales@example.com"',
    'password = "sales-password"',
    'from_address = "sales@example.com"',
    'exec = "sales-bot --fast"',
)


def test_the_email_table_alone_is_one_account_named_default() -> None:
    (only,) = parse_accounts(MAIN, environ=ENV)
    assert only.name == DEFAULT_ACCOUNT_NAME == "default"
    assert only == parse_config(MAIN, environ=ENV)


def test_the_email_table_may_name_its_account() -> None:
    (only,) = accounts('name = "support"')
    assert only.name == "support"
    assert parse_config(MAIN + 'name = "support"\n', environ=ENV).name == "support"


def test_an_account_inherits_every_key_it_does_not_set() -> None:
    main, sales = accounts(*SALES, "max_concurrent_handlers = 7")
    assert (main.name, sales.name) == ("default", "sales")
    assert sales.imap_host == sales.smtp_host == "mail.example.com"
    assert sales.allowed_senders == ("alice@example.com",)
    assert sales.username == "sales@example.com"
    assert sales.password is not None
    assert sales.password.reveal() == "sales-password"
    assert sales.exec_command == ("sales-bot", "--fast")
    assert sales.max_concurrent_handlers == 7
    # The main account keeps its own values.
    assert main.max_concurrent_handlers == 2
    assert main.exec_command == ("support-bot",)
    assert main.state_dir == sales.state_dir


def test_accounts_come_in_file_order() -> None:
    lines = [*SALES]
    for name in ("zeta", "alpha"):
        lines += [
            f"[channels_config.email.accounts.{name}]",
            f'username = "{name}@example.com"',
        ]
    assert [c.name for c in accounts(*lines)] == ["default", "sales", "zeta", "alpha"]


def test_load_config_keeps_returning_the_email_tables_account(tmp_path: Path) -> None:
    file = tmp_path / "prx.toml"
    file.write_text(MAIN + "\n".join(SALES) + "\n")
    config = load_config(file, environ=ENV)
    assert config.username == "support@example.com"
    main, sales = load_accounts(file, environ=ENV)
    assert main == config
    assert sales.username == "sales@example.com"


def test_an_accounts_bad_key_names_the_accounts_path() -> None:
    problems = problems_of(*SALES, 'imap_port = "abc"')
    assert problems == (
        f"expected an integer from 1 to 65535, got 'abc' @ {ACCOUNTS}.sales.imap_port",
    )


def test_an_unknown_key_in_an_account_names_the_accounts_path() -> None:
    (problem,) = problems_of(*SALES, "imap_prot = 143")
    assert (
        problem
        == f"unknown key 'imap_prot' (did you mean 'imap_port'?) @ {ACCOUNTS}.sales.imap_prot"
    )


def test_a_bad_inherited_key_is_reported_once_at_the_email_table() -> None:
    text = MAIN.replace("max_concurrent_handlers = 2", "max_concurrent_handlers = 0")
    with pytest.raises(ConfigError) as info:
        parse_accounts(text + "\n".join(SALES) + "\n", environ=ENV)
    assert info.value.problems == (
        "expected an integer from 1 to 1000, got 0"
        " @ $.channels_config.email.max_concurrent_handlers",
    )


def test_a_problem_of_the_combination_is_the_accounts() -> None:
    # The email table is fine alone; the account's own retry start breaks the inherited max.
    problems = problems_of(
        "smtp_retry_max_secs = 60",
        *SALES,
        "smtp_retry_initial_secs = 120",
    )
    assert problems == (
        f"must be at least smtp_retry_initial_secs (120) @ {ACCOUNTS}.sales.smtp_retry_max_secs",
    )


def test_an_accounts_password_source_replaces_the_inherited_one() -> None:
    main, sales = parse_accounts(
        MAIN + "\n".join(SALES[:2]) + '\npassword_env = "SALES_PW"\n',
        environ={**ENV, "SALES_PW": "sales-password"},
    )
    assert main.password is not None
    assert main.password.reveal() == "support-password"
    assert sales.password is not None
    assert sales.password.reveal() == "sales-password"


def test_a_missing_password_names_the_account_table() -> None:
    problems = problems_of(
        "[channels_config.email.accounts.sales]",
        'username = "sales@example.com"',
        'password_env = "SALES_PASSWORD"',
    )
    assert problems == (
        f"environment variable SALES_PASSWORD is not set or empty @ {ACCOUNTS}.sales.password_env",
    )
    problems = problems_of(
        "[channels_config.email.accounts.sales]",
        'username = "sales@example.com"',
        'password_env = "SALES_PASSWORD"',
        'password = "sales-password"',
    )
    assert problems == (
        f"set only one of password, password_env (they all give the password) @ {ACCOUNTS}.sales",
    )


@pytest.mark.parametrize("name", ["Sales", "sales.eu", "a" * 65, "s ales", "ü"])
def test_account_names_are_checked(name: str) -> None:
    (problem,) = problems_of(
        f'[channels_config.email.accounts."{name}"]',
        'username = "sales@example.com"',
    )
    assert problem.startswith("expected an account name of 1 to 64 characters")
    assert problem.endswith(f"@ {ACCOUNTS}.{name}")


def test_account_names_may_use_the_whole_alphabet() -> None:
    name = "a-z_0-9" + "x" * 57
    assert (
        accounts(f"[channels_config.email.accounts.{name}]", 'username = "x@example.com"')[1].name
        == name
    )


def test_the_email_tables_name_is_checked() -> None:
    (problem,) = problems_of('name = "Support Desk"')
    assert problem.startswith("expected an account name")
    assert problem.endswith("@ $.channels_config.email.name")


def test_account_names_are_unique() -> None:
    (problem,) = problems_of(
        'name = "sales"',
        *SALES,
    )
    assert "'sales' is already the email table's own account" in problem
    assert problem.endswith(f"@ {ACCOUNTS}.sales")
    # The default name counts as taken too.
    (problem,) = problems_of(
        "[channels_config.email.accounts.default]", 'username = "x@example.com"'
    )
    assert problem.endswith(f"@ {ACCOUNTS}.default")


def test_an_account_cannot_rename_itself_or_nest() -> None:
    problems = problems_of(
        *SALES,
        'name = "other"',
        "[channels_config.email.accounts.sales.accounts.deeper]",
        'username = "x@example.com"',
    )
    assert problems == (
        f"an account's name is its table's name: remove name @ {ACCOUNTS}.sales.name",
        f"an account's name is not nested: remove accounts @ {ACCOUNTS}.sales.accounts",
    )


@pytest.mark.parametrize(
    ("key", "value"), [("state_dir", '"/srv/other"'), ("log_format", '"json"')]
)
def test_process_wide_keys_cannot_differ_per_account(key: str, value: str) -> None:
    (problem,) = problems_of(*SALES, f"{key} = {value}")
    assert problem.startswith(f"{key} cannot differ per account")
    assert "[channels_config.email]" in problem
    assert problem.endswith(f"@ {ACCOUNTS}.sales.{key}")


def test_a_process_wide_key_may_repeat_the_email_tables_value() -> None:
    main, sales = parse_accounts(
        MAIN + 'state_dir = "/srv/prx"\n' + "\n".join(SALES) + '\nstate_dir = "/srv/prx"\n',
        environ=ENV,
    )
    assert main.state_dir == sales.state_dir == Path("/srv/prx")


def test_two_accounts_on_one_login_are_refused() -> None:
    (problem,) = problems_of("[channels_config.email.accounts.copy]", 'imap_folder = "Other"')
    assert (
        "accounts 'default' and 'copy' log in as support@example.com on mail.example.com:993"
        in problem
    )
    assert problem.endswith(f"@ {ACCOUNTS}.copy.username")


@pytest.mark.parametrize("value", ['"sales"', "[1]", "3"])
def test_accounts_must_be_tables(value: str) -> None:
    (problem,) = problems_of(f"accounts = {value}")
    assert problem.startswith("expected tables [channels_config.email.accounts.NAME]")
    assert problem.endswith(f"@ {ACCOUNTS}")
    (problem,) = problems_of("[channels_config.email.accounts]", f"sales = {value}")
    assert problem.startswith("expected a table")
    assert problem.endswith(f"@ {ACCOUNTS}.sales")


def test_problems_of_every_account_come_together() -> None:
    problems = problems_of(
        'imap_port = "x"',
        *SALES,
        "smtp_port = 0",
        "[channels_config.email.accounts.ops]",
        'username = "ops@example.com"',
        'first_start = "later"',
    )
    assert problems == (
        "expected an integer from 1 to 65535, got 'x' @ $.channels_config.email.imap_port",
        f"expected an integer from 1 to 65535, got 0 @ {ACCOUNTS}.sales.smtp_port",
        f"expected one of 'unseen', 'new', got 'later' @ {ACCOUNTS}.ops.first_start",
    )


def test_health_listen_belongs_to_the_process_not_an_account() -> None:
    text = (
        "[channels_config.email]\n"
        'imap_host = "imap.example.com"\nsmtp_host = "smtp.example.com"\n'
        'username = "bot@example.com"\npassword = "pw"\nfrom_address = "bot@example.com"\n'
        'health_listen = "127.0.0.1:9100"\n'
        "[channels_config.email.accounts.sales]\n"
        'username = "sales@example.com"\nfrom_address = "sales@example.com"\n'
        'health_listen = "127.0.0.1:9200"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_accounts(text)
    message = str(info.value)
    assert "health_listen cannot differ per account" in message
    assert "$.channels_config.email.accounts.sales.health_listen" in message
